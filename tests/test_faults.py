"""Churn on loopback: peers killed with SIGKILL, a stage emptied and refilled, the coordinator killed and restarted."""

from __future__ import annotations

import pytest

from .swarm import Swarm

pytestmark = pytest.mark.swarm
FAST = ("--heartbeat-interval", "1", "--heartbeat-timeout", "4", "--sync-timeout", "5", "--deadline-floor", "5", "--round-timeout", "30")


def by_name(status: dict) -> dict[str, dict]:
    return {p["name"]: p for p in status["peers"]}


def assert_replicas_identical(rounds: list[dict]) -> None:
    for r in rounds:
        for stage, checksums in r["checksums"].items():
            assert len(set(checksums)) <= 1, f"round {r['round']} stage {stage}: replicas differ {checksums}"


def assert_rounds_contiguous(rounds: list[dict]) -> None:
    numbers = [r["round"] for r in rounds]
    assert numbers == list(range(1, len(numbers) + 1)), f"rounds numbered {numbers}"


def test_killed_replica_and_emptied_stage(tmp_path):
    swarm = Swarm(tmp_path / "run", "--stages", "2", "--rounds", "0", "--checkpoint-every", "2", *FAST)
    try:
        for _ in range(4):  # two replicas per stage
            swarm.add_peer()
        swarm.wait_for(lambda: swarm.status()["round"] >= 3 and all(s["online"] == 2 for s in swarm.status()["stages"]), 180, "2 x 2 replicas training")

        # SIGKILL one replica of stage 1 mid-run: the round completes, the peer is marked gone.
        stage1 = [p for p in swarm.status()["peers"] if p["stage"] == 1 and p["state"] == "online"]
        victim = stage1[0]["name"]
        swarm.kill(swarm.peers[int(victim.split("-")[1])])
        killed_at = swarm.status()["current_round"]
        swarm.wait_for(lambda: by_name(swarm.status())[victim]["state"] == "gone", 30, f"{victim} marked gone")
        swarm.wait_for(lambda: swarm.status()["round"] >= killed_at + 2, 120, "two rounds after the kill")

        # SIGKILL the last replica of stage 1: a stage-0 peer is moved there and training resumes.
        survivor = next(p["name"] for p in swarm.status()["peers"] if p["stage"] == 1 and p["state"] == "online")
        swarm.kill(swarm.peers[int(survivor.split("-")[1])])
        emptied_at = swarm.status()["current_round"]
        swarm.wait_for(lambda: by_name(swarm.status())[survivor]["state"] == "gone", 30, f"{survivor} marked gone")
        swarm.wait_for(
            lambda: swarm.status()["round"] >= emptied_at + 2 and all(s["online"] >= 1 for s in swarm.status()["stages"]),
            180, "training again with stage 1 refilled",
        )
        stages = {s["index"]: s for s in swarm.status()["stages"]}
        assert stages[0]["online"] == 1 and stages[1]["online"] == 1
        rounds = swarm.get("/api/rounds")
        assert_rounds_contiguous(rounds)
        assert_replicas_identical(rounds)
        assert all(r["loss"] is not None for r in rounds[-2:])
    finally:
        swarm.stop()


def test_coordinator_killed_and_restarted(tmp_path):
    swarm = Swarm(tmp_path / "run", "--stages", "2", "--rounds", "0", "--checkpoint-every", "3", *FAST)
    try:
        for _ in range(3):
            swarm.add_peer()
        swarm.wait_for(lambda: swarm.status()["round"] >= 4, 180, "4 rounds")
        swarm.kill(swarm.coordinator)
        swarm.start_coordinator()
        resumed_from = swarm.status()["round"]
        swarm.wait_for(lambda: swarm.status()["round"] >= resumed_from + 3, 180, "three rounds after the restart")
        status = swarm.status()
        assert sum(1 for p in status["peers"] if p["state"] == "online") == 3, "peers did not reconnect by themselves"
        rounds = swarm.get("/api/rounds")
        assert_rounds_contiguous(rounds)
        assert_replicas_identical(rounds)
        assert all(p.poll() is None for p in swarm.peers), "a peer died with the coordinator"
    finally:
        swarm.stop()
