"""A peer behind NAT on loopback: a relayed peer listens nowhere, so every frame it sends and every answer it gets
rides connections it dialled itself; the status says how each peer is reached."""

from __future__ import annotations

import pytest

from .swarm import Swarm

pytestmark = pytest.mark.swarm
DATA = ("--ul2-tokens", "0", "--instruction-share", "0")


def test_a_relayed_peer_trains_by_dialling_out_and_the_status_says_how_each_is_reached(tmp_path):
    rounds = 8
    swarm = Swarm(tmp_path, "--stages", "2", "--rounds", str(rounds), "--linger", *DATA)
    try:
        swarm.add_peer("--stage", "0", "--reachability", "relayed")  # behind NAT: nobody can dial it
        swarm.add_peer("--stage", "1")                               # probed by the coordinator: direct on loopback
        swarm.wait_for(lambda: len(swarm.rounds()) >= rounds, 300, f"{rounds} rounds")
        status, history = swarm.status(), swarm.rounds()
    finally:
        swarm.stop()
    reached = {p["name"]: p["reachability"] for p in status["peers"]}
    assert reached == {"peer-0": "relayed", "peer-1": "direct"}, reached
    assert all(r["tokens"] > 0 for r in history) and history[-1]["loss"] < history[0]["loss"], history
    relayed = next(p for p in status["peers"] if p["name"] == "peer-0")
    assert relayed["bytes_sent"].get("activations", 0) > 0  # its frames went out over the connection it dialled
    logs = {name: (tmp_path / "logs" / f"{name}.log").read_text() for name in ("peer-0", "peer-1")}
    assert "reachability: relayed" in logs["peer-0"] and "reachability: direct" in logs["peer-1"]
