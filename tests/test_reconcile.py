"""Lining peers up with the coordinator's round: who reloads, who adopts (no network)."""

from __future__ import annotations

import asyncio

from coordinator.membership import Membership
from coordinator.rounds import RoundEngine
from coordinator.store import Store
from proto import hometrain_pb2 as pb
from proto.run_config import CoordinatorConfig


def engine_with(tmp_path, rounds_by_peer: dict[str, int], round: int, checkpoint: int) -> tuple[RoundEngine, dict]:
    membership = Membership(1, 10)
    records = {}
    for name, next_round in rounds_by_peer.items():
        record = membership.add(name, "cpu", 1.0, 0)
        record.state, record.next_round, record.dht_peer_id, record.loads = pb.ONLINE, next_round, f"dht-{name}", 1
        records[name] = record
    engine = RoundEngine(CoordinatorConfig(), Store(tmp_path / "db.sqlite"), None, membership, lambda *a: None, [(0, 4)])
    engine.round = round
    engine.latest_checkpoint = ("http://x/checkpoints/round-%06d/" % checkpoint, checkpoint)
    return engine, records


def test_the_most_advanced_peers_adopt_the_round_when_nobody_is_at_it(tmp_path):
    engine, peers = engine_with(tmp_path, {"a": 18, "b": 15}, round=20, checkpoint=15)
    asyncio.run(engine._reconcile(0.0))
    assert peers["a"].adopt_round == 20 and peers["a"].state == pb.ONLINE
    assert peers["b"].state == pb.JOINING  # behind the best: reloads


def test_weights_older_than_the_newest_checkpoint_reload_it_instead_of_adopting(tmp_path):
    engine, peers = engine_with(tmp_path, {"a": 12}, round=20, checkpoint=15)
    asyncio.run(engine._reconcile(0.0))
    assert peers["a"].adopt_round == 0 and peers["a"].state == pb.JOINING
    # Reloaded from the checkpoint (next round 16), it is now the best the stage has.
    engine2, peers2 = engine_with(tmp_path / "again", {"a": 16}, round=20, checkpoint=15)
    asyncio.run(engine2._reconcile(0.0))
    assert peers2["a"].adopt_round == 20


def test_a_peer_behind_a_current_replica_reloads_from_it(tmp_path):
    engine, peers = engine_with(tmp_path, {"a": 20, "b": 19}, round=20, checkpoint=15)
    asyncio.run(engine._reconcile(0.0))
    assert peers["a"].state == pb.ONLINE and peers["a"].adopt_round == 0
    assert peers["b"].state == pb.JOINING
