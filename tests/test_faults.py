"""Churn on loopback: peers killed with SIGKILL, a stage emptied and refilled, the coordinator killed and restarted."""

from __future__ import annotations

import pytest

from .swarm import Swarm

pytestmark = pytest.mark.swarm
FAST = ("--heartbeat-interval", "1", "--heartbeat-timeout", "4", "--sync-timeout", "5", "--deadline-floor", "5", "--round-timeout", "30")


def by_name(status: dict | None) -> dict[str, dict]:
    """Peers by name; none while the status page does not answer (a loaded machine can delay it past a poll's timeout)."""
    return {p["name"]: p for p in (status or {}).get("peers", [])}


def state_of(swarm: Swarm, name: str) -> str | None:
    return by_name(swarm.status()).get(name, {}).get("state")


def finished_rounds(swarm: Swarm) -> int:
    return (swarm.status() or {}).get("round", 0)


def training_with(swarm: Swarm, rounds: int, online_per_stage: int) -> bool:
    """At least ``rounds`` finished and every stage with at least ``online_per_stage`` replicas online."""
    status = swarm.status()
    return status is not None and status["round"] >= rounds and all(s["online"] >= online_per_stage for s in status["stages"])


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
        swarm.wait_for(lambda: training_with(swarm, 3, 2), 180, "2 x 2 replicas training")

        # SIGKILL one replica of stage 1 mid-run: the round completes, the peer is marked gone.
        stage1 = [p for p in swarm.status()["peers"] if p["stage"] == 1 and p["state"] == "online"]
        victim = stage1[0]["name"]
        swarm.kill(swarm.peers[int(victim.split("-")[1])])
        killed_at = swarm.status()["current_round"]
        swarm.wait_for(lambda: state_of(swarm, victim) == "gone", 30, f"{victim} marked gone")
        swarm.wait_for(lambda: finished_rounds(swarm) >= killed_at + 2, 120, "two rounds after the kill")

        # SIGKILL the last replica of stage 1: a stage-0 peer is moved there and training resumes.
        survivor = next(p["name"] for p in swarm.status()["peers"] if p["stage"] == 1 and p["state"] == "online")
        swarm.kill(swarm.peers[int(survivor.split("-")[1])])
        emptied_at = swarm.status()["current_round"]
        swarm.wait_for(lambda: state_of(swarm, survivor) == "gone", 30, f"{survivor} marked gone")
        swarm.wait_for(
            lambda: training_with(swarm, emptied_at + 2, 1), 180, "training again with stage 1 refilled",
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
        swarm.wait_for(lambda: finished_rounds(swarm) >= 4, 180, "4 rounds")
        swarm.kill(swarm.coordinator)
        swarm.start_coordinator()
        resumed_from = swarm.status()["round"]
        # Every peer rejoins by itself (a peer given another stage first loads it): rounds go on meanwhile.
        swarm.wait_for(lambda: sum(p["state"] == "online" for p in by_name(swarm.status()).values()) == 3, 120,
                       "all 3 peers to reconnect by themselves")
        swarm.wait_for(lambda: finished_rounds(swarm) >= resumed_from + 3, 180, "three rounds after the restart")
        rounds = swarm.get("/api/rounds")
        assert_rounds_contiguous(rounds)
        assert_replicas_identical(rounds)
        assert all(p.poll() is None for p in swarm.peers), "a peer died with the coordinator"
    finally:
        swarm.stop()
