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
