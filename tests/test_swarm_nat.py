"""Peers behind NAT on loopback: a relayed peer listens nowhere, so every frame and sync it takes part in
goes over a connection it dialled or through the coordinator's circuit relay."""

from __future__ import annotations

import pytest

from .swarm import Swarm

pytestmark = pytest.mark.swarm
DATA = ("--ul2-tokens", "0", "--instruction-share", "0")


def test_relayed_peers_train_and_the_status_says_how_each_is_reached(tmp_path):
    rounds = 8
    swarm = Swarm(tmp_path, "--stages", "2", "--rounds", str(rounds), "--linger", *DATA)
    try:
        swarm.add_peer("--stage", "0", "--reachability", "relayed")   # two NATed peers: they can only meet through the relay
        swarm.add_peer("--stage", "1", "--reachability", "relayed")
        swarm.add_peer("--stage", "1")                                # probed by the coordinator: direct on loopback
        swarm.wait_for(lambda: len(swarm.rounds()) >= rounds, 300, f"{rounds} rounds")
        status, history = swarm.status(), swarm.rounds()
    finally:
        swarm.stop()
    reached = {p["name"]: p["reachability"] for p in status["peers"]}
    assert reached == {"peer-0": "relayed", "peer-1": "relayed", "peer-2": "direct"}, reached
    assert all(r["tokens"] > 0 for r in history) and history[-1]["loss"] < history[0]["loss"], history
    logs = {name: (tmp_path / "logs" / f"{name}.log").read_text() for name in ("peer-0", "peer-2")}
    assert "reachability: relayed" in logs["peer-0"] and "reachability: direct" in logs["peer-2"]
