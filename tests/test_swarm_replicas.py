"""2 stages x 2 replicas: identical replicas after every step; a late joiner trains; Ctrl-C leaves cleanly."""

from __future__ import annotations

import signal
import time

import pytest

from .swarm import Swarm

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("replicas"), "--stages", "2", "--rounds", "0", "--checkpoint-every", "5")
    for _ in range(3):
        s.add_peer()
    try:
        yield s
    finally:
        s.stop()


def online_by_stage(status: dict) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for p in status["peers"]:
        if p["state"] == "online":
            out.setdefault(p["stage"], []).append(p["id"])
    return out


def test_late_joiner_gets_a_stage_and_replicas_stay_identical(swarm):
    swarm.wait_for(lambda: swarm.status()["round"] >= 3, 180, "3 rounds with 3 peers")
    before = {p["id"] for p in swarm.status()["peers"]}
    joined_at = swarm.status()["round"]
    swarm.add_peer()
    newcomer = swarm.wait_for(lambda: [p for p in swarm.status()["peers"] if p["id"] not in before], 60, "the fourth peer to join")[0]
    swarm.wait_for(
        lambda: any(newcomer["id"] in r["participants"] for r in swarm.rounds()), 180, "a round the newcomer contributes to"
    )
    target = swarm.status()["round"] + 3
    swarm.wait_for(lambda: swarm.status()["round"] >= target, 180, f"round {target}")

    by_stage = online_by_stage(swarm.status())
    assert sorted(len(v) for v in by_stage.values()) == [2, 2], by_stage
    rounds = swarm.rounds()
    assert all(r["dropped"] == 0 for r in rounds)
    for r in rounds:
        for stage, checksums in r["checksums"].items():
            assert len(set(checksums)) == 1, f"round {r['round']} stage {stage}: replicas differ {checksums}"
    late = [r for r in rounds if r["round"] > joined_at + 1]
    assert any(len(r["checksums"][str(newcomer["stage"])]) == 2 for r in late), "the newcomer never averaged with its stage"
    # Replicas that averaged (and the newcomer, which fetched a stage's state) measured their links.
    links = {p["name"]: p["link_bytes_per_second"] for p in swarm.status()["peers"] if p["state"] == "online"}
    assert sum(rate > 0 for rate in links.values()) >= 3, links


def test_ctrl_c_leaves_within_five_seconds(swarm):
    peer = swarm.peers[-1]
    started = time.monotonic()
    peer.send_signal(signal.SIGINT)
    peer.wait(timeout=10)
    assert time.monotonic() - started < 5.0
    assert peer.returncode == 0
    states = {p["name"]: p["state"] for p in swarm.status()["peers"]}
    assert states[f"peer-{len(swarm.peers) - 1}"] == "left"
    # The run goes on with the remaining replica of that stage.
    now = swarm.status()["round"]
    swarm.wait_for(lambda: swarm.status()["round"] >= now + 2, 120, "two more rounds after a peer left")
