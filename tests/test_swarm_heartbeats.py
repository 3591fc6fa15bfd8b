"""Heartbeats keep their interval while a stage big enough to take seconds computes, compresses and syncs.

The stage's torch work (forward, backward, the step, cocktail compression, sums, checksums)
runs on its compute thread, and large frames are encoded in a worker thread, so the asyncio
loop that sends heartbeats and answers frames never waits on them. Measured at the coordinator:
the longest gap between two heartbeats of each peer.
"""

from __future__ import annotations

import pytest

from .swarm import Swarm

pytestmark = pytest.mark.swarm
INTERVAL = 0.5


def test_heartbeats_keep_their_interval_while_a_large_stage_works(tmp_path):
    swarm = Swarm(tmp_path / "run", "--model", "small", "--stages", "1", "--seq-len", "256", "--micro-batch-size", "8",
                  "--global-batch-size", "16", "--rounds", "2", "--checkpoint-every", "2", "--linger", "--min-replicas", "2",
                  "--sync-compression", "cocktail", "--heartbeat-interval", str(INTERVAL), "--heartbeat-timeout", "20",
                  "--ul2-tokens", "0")
    try:
        swarm.add_peer()
        swarm.add_peer()
        swarm.wait_for(lambda: len(swarm.rounds()) >= 2, 600, "two rounds of the small model")
        status, rounds = swarm.status(), swarm.rounds()
    finally:
        swarm.stop()
    durations = [round(r["duration"], 1) for r in rounds]
    gaps = {p["name"]: round(p["heartbeat_gap_max"], 2) for p in status["peers"]}
    print(f"round durations {durations} s; largest heartbeat gap per peer {gaps} s (interval {INTERVAL} s)")
    assert min(durations) > 6 * INTERVAL, f"the stage was too small to show anything: rounds took {durations} s"
    assert all(0 < gap < 4 * INTERVAL for gap in gaps.values()), f"heartbeats stalled: {gaps}"


def test_peers_beat_as_the_coordinator_paces_them_and_are_not_taken_for_gone(tmp_path):
    # 2 peers at --heartbeat-rate 1: one beat a second in all, so each beats every 2 s, 4x the run's interval, and
    # its 1 s timeout stretches to 4 s. A peer that kept the run's interval would show gaps of 0.5 s; a coordinator
    # that kept the run's timeout would mark both gone after their first paced second of silence.
    swarm = Swarm(tmp_path / "run", "--stages", "1", "--rounds", "0", "--min-replicas", "2", "--heartbeat-interval", str(INTERVAL),
                  "--heartbeat-timeout", "1", "--heartbeat-rate", "1")
    try:
        swarm.add_peer()
        swarm.add_peer()
        swarm.wait_for(lambda: (swarm.status() or {}).get("round", 0) >= 3, 180, "3 rounds")

        def paced_gaps() -> list[float] | None:
            gaps = [p["heartbeat_gap_max"] for p in (swarm.status() or {}).get("peers", [])]
            return gaps if len(gaps) == 2 and all(gap > 1.5 for gap in gaps) else None

        swarm.wait_for(paced_gaps, 30, "both peers to beat at the coordinator's pace of 2 s (gaps over 1.5 s)")
        swarm.wait_for(lambda: swarm.status()["round"] >= 6, 180, "3 more rounds at that pace")
        status = swarm.status()
    finally:
        swarm.stop()
    assert status["heartbeat"] == {"interval": 2.0, "rate": 1.0, "timeout": 4.0}
    peers = status["peers"]
    assert [p["state"] for p in peers] == ["online", "online"], f"a paced peer was taken for gone: {peers}"
    gaps = [p["heartbeat_gap_max"] for p in peers]
    assert all(gap < 4 for gap in gaps), f"heartbeats came later than the pace of 2 s: largest gaps {gaps}"
