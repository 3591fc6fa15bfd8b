"""What peers report is bounded by what the coordinator handed out, and replicas that distrust one of theirs get it flagged (no network)."""

from __future__ import annotations

import asyncio
import time

from coordinator.membership import Membership
from coordinator.rounds import OpenRound, RoundEngine
from coordinator.store import Store
from proto import hometrain_pb2 as pb
from proto.run_config import CoordinatorConfig


def engine_with(tmp_path, replicas: int) -> tuple[RoundEngine, list]:
    membership = Membership(1, 10)
    peers = []
    for i in range(replicas):
        peer = membership.add(f"p{i}", "cpu", 1.0, 0)
        peer.state, peer.next_round, peer.dht_peer_id, peer.loads = pb.ONLINE, 1, f"dht-{i}", 1
        peers.append(peer)
    engine = RoundEngine(CoordinatorConfig(), Store(tmp_path / "db.sqlite"), None, membership, lambda *a: None, [(0, 4)])
    return engine, peers


def test_a_progress_report_cannot_claim_more_tokens_than_its_microbatch_holds(tmp_path):
    engine, (peer,) = engine_with(tmp_path, 1)
    asyncio.run(engine._maybe_open(time.time()))
    cur = engine.current
    for index, (tokens, loss) in enumerate([(10, 20.0), (10_000, 20.0), (10, -1.0), (10, 1e9)]):
        cur.in_flight[index], cur.loss_tokens[index] = peer.peer_id, 10
        report = pb.ProgressReport(peer_id=peer.peer_id, round=cur.number, microbatch_index=index, ok=True, loss_sum=loss, tokens=tokens,
                                   open_attempt=cur.attempt)
        assert asyncio.run(engine.report_progress(peer, report))
    assert cur.done == 1 and cur.tokens == 10 and cur.loss_sum == 20.0  # the three implausible reports were dropped
    assert cur.dropped == 3


def syncing(engine: RoundEngine, peers: list) -> OpenRound:
    cur = OpenRound(number=1, started=time.time(), target=4)
    cur.closed_at = time.time()
    cur.members = {p.peer_id: 0 for p in peers}
    cur.groups = {0: sorted(p.dht_peer_id for p in peers)}
    engine.current, engine.phase = cur, pb.SYNC
    return cur


def report(engine: RoundEngine, reporter, suspects: list[str]) -> None:
    asyncio.run(engine.report_step(reporter, pb.StepReport(peer_id=reporter.peer_id, round=1, checksum="0" * 64, suspects=suspects)))


def test_a_replica_named_by_most_of_its_group_is_flagged_and_gets_no_work(tmp_path):
    engine, peers = engine_with(tmp_path, 4)
    syncing(engine, peers)
    bad = peers[3]
    report(engine, peers[0], [bad.dht_peer_id])
    assert not bad.flagged  # one voice of three is not enough
    report(engine, peers[1], [bad.dht_peer_id])
    assert "2 of its 3" in bad.flagged
    assert bad not in engine.membership.online(0) and len(engine.membership.online(0)) == 3
    assert engine.membership.peers[bad.peer_id].as_json()["flagged"]


def test_one_bad_replica_cannot_get_an_honest_one_flagged(tmp_path):
    engine, peers = engine_with(tmp_path, 4)
    syncing(engine, peers)
    liar = peers[3]
    report(engine, liar, [peers[0].dht_peer_id, "dht-stranger", liar.dht_peer_id])
    report(engine, liar, [peers[0].dht_peer_id])  # naming twice counts once
    assert not any(p.flagged for p in peers)
