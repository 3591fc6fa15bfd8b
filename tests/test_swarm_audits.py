"""Forward audits in a live swarm: a stage-1 replica that skews its training forwards (its audit answers honest) is found
and flagged by the coordinator, the honest replicas are not, and the run trains on without it."""

from __future__ import annotations

import sys

import pytest

from .swarm import ROOT, Swarm

pytestmark = pytest.mark.swarm


def test_a_replica_whose_training_forwards_disagree_with_its_stage_is_flagged(tmp_path):
    swarm = Swarm(tmp_path / "run", "--stages", "2", "--min-replicas", "1", "--rounds", "0", "--audit-rate", "1",
                  "--robust-aggregation", "off", "--global-batch-size", "16")
    try:
        swarm.add_peer("--stage", "0")
        swarm.add_peer("--stage", "1")
        swarm.add_peer("--stage", "1")
        cmd = [sys.executable, str(ROOT / "bench" / "byzantine_peer.py"), "forward", "join", "--coordinator", f"127.0.0.1:{swarm.port}",
               "--gpu", "cpu", "--threads", "1", "--host", "127.0.0.1", "--name", "bad", "--stage", "1"]
        swarm.peers.append(swarm._spawn(cmd, "bad"))
        try:
            bad = swarm.wait_for(lambda: [p for p in swarm.status()["peers"] if p["name"] == "bad" and p["flagged"]], 300,
                                 "the skewing replica to be flagged")[0]
        except TimeoutError as exc:
            status = swarm.status()
            raise AssertionError(f"audits {status['audits']}; per peer {[(p['name'], p['audits']) for p in status['peers']]}\n{exc}") from None
        flagged_at = swarm.status()["current_round"]
        swarm.wait_for(lambda: swarm.status()["round"] >= flagged_at + 2, 120, "two rounds after the flag")
        status, last = swarm.status(), swarm.rounds()[-1]
    finally:
        swarm.stop()
    assert "forward audits" in bad["flagged"] and bad["audits"].get("first_disagreed", 0) >= 6, bad
    honest = [p for p in status["peers"] if p["name"] != "bad"]
    assert not any(p["flagged"] for p in honest), [(p["name"], p["flagged"], p["audits"]) for p in honest]
    assert status["audits"]["agreed"] > 0 and status["audits"]["disagreed"] >= 6, status["audits"]
    assert status["audits"]["dropped"] <= status["audits"]["agreed"] + status["audits"]["disagreed"], status["audits"]
    assert bad["id"] not in last["participants"], "a flagged peer still trains"
