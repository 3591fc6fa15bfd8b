"""A round that trains nothing is opened again, after a growing wait, under the same number (no network)."""

from __future__ import annotations

import asyncio
import time

from coordinator.membership import Membership
from coordinator.rounds import RoundEngine
from coordinator.store import Store
from proto import hometrain_pb2 as pb
from proto.run_config import CoordinatorConfig


def engine_with_one_peer(tmp_path, **config):
    membership = Membership(1, 10)
    peer = membership.add("a", "cpu", 1.0, 0)
    peer.state, peer.next_round, peer.dht_peer_id, peer.loads = pb.ONLINE, 1, "dht-a", 1
    engine = RoundEngine(CoordinatorConfig(**config), Store(tmp_path / "db.sqlite"), None, membership, lambda *a: None, [(0, 4)])
    return engine, peer


def fail_all(engine: RoundEngine, peer, attempt: int) -> None:
    cur = engine.current
    for index in range(cur.target):
        cur.in_flight[index] = peer.peer_id
        failure = pb.StageFailure(stage=0, peer="dht-a", error="TypeError: cannot unpack non-iterable NoneType object")
        report = pb.ProgressReport(peer_id=peer.peer_id, round=cur.number, microbatch_index=index, ok=False, error="x",
                                   open_attempt=attempt, failure=failure)
        assert asyncio.run(engine.report_progress(peer, report))


def test_openings_back_off_and_keep_the_round_number(tmp_path):
    engine, peer = engine_with_one_peer(tmp_path)
    asyncio.run(engine._maybe_open(time.time()))
    waits = []
    for attempt in range(4):
        assert engine.phase == pb.OPEN and engine.round == 1 and engine.current.attempt == attempt
        fail_all(engine, peer, attempt)
        assert engine.phase == pb.WAITING and engine.round == 1 and engine.stall.attempts == attempt + 1
        now = time.time()
        waits.append(round(engine.stall.retry_at - now))
        asyncio.run(engine._maybe_open(now))  # too early: still waiting, and says why
        assert engine.phase == pb.WAITING and engine.waiting_reason.startswith("stalled: round 1 trained nothing")
        asyncio.run(engine._maybe_open(engine.stall.retry_at + 0.01))
    assert waits == [1, 2, 4, 8]
    status = engine.stall_status(time.time())
    assert status["stage"] == 0 and "cannot unpack" in status["error"] and status["attempts"] == 4
    assert engine.store.rounds() == [], "nothing trained, nothing recorded"


def test_reports_of_an_earlier_opening_are_refused_and_a_trained_opening_clears_the_stall(tmp_path):
    engine, peer = engine_with_one_peer(tmp_path)
    asyncio.run(engine._maybe_open(time.time()))
    fail_all(engine, peer, 0)
    asyncio.run(engine._maybe_open(engine.stall.retry_at + 0.01))
    cur = engine.current
    cur.in_flight[0] = peer.peer_id
    stale = pb.ProgressReport(peer_id=peer.peer_id, round=1, microbatch_index=0, ok=True, loss_sum=1.0, tokens=10, open_attempt=0)
    assert not asyncio.run(engine.report_progress(peer, stale))
    assert engine.next_microbatch(peer, 1, attempt=0).available is False  # a feeder of the old opening gets nothing
    for index in range(cur.target):
        cur.in_flight[index], cur.loss_tokens[index] = peer.peer_id, 10  # handed out: what a report may claim
        ok = pb.ProgressReport(peer_id=peer.peer_id, round=1, microbatch_index=index, ok=True, loss_sum=1.0, tokens=10, open_attempt=1)
        assert asyncio.run(engine.report_progress(peer, ok))
    assert engine.phase == pb.SYNC and engine.stall is None and engine.current.tokens == 10 * cur.target


def test_the_stall_limit_stops_the_run(tmp_path):
    engine, peer = engine_with_one_peer(tmp_path, stall_limit=2)
    asyncio.run(engine._maybe_open(time.time()))
    fail_all(engine, peer, 0)
    asyncio.run(engine._maybe_open(engine.stall.retry_at + 0.01))
    fail_all(engine, peer, 1)
    assert engine.phase == pb.STOPPED and engine.gave_up and "--stall-limit" in engine.waiting_reason


def test_a_stage_drops_what_an_earlier_opening_left():
    """Gradients of an opening the coordinator gave up on were never counted: the next opening starts clean."""
    import pytest
    import torch
    from transformers import GPTJConfig

    from peer.stage_runtime import StageRuntime, StaleRoundError
    from proto.run_config import TrainConfig

    cfg = GPTJConfig(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    rt = StageRuntime(cfg, TrainConfig(), 1, 2, torch.device("cpu"))
    rt.next_round = 1
    hidden, prefix = torch.randn(2, 8, 32), torch.zeros(2, dtype=torch.int64)
    targets, mask = torch.randint(0, 300, (2, 8)), torch.ones(2, 8)
    rt.loss_backward(rt.forward(1, hidden, prefix, mask, 0, attempt=0), targets, mask)
    pending = rt.forward(1, hidden, prefix, mask, 1, attempt=0)  # in flight when the round opens again
    assert rt.round_tokens == 16
    rt.loss_backward(rt.forward(1, hidden, prefix, mask, 0, attempt=1), targets, mask)
    assert rt.round_tokens == 16 and rt.open_attempt == 1  # opening 0's microbatch 0 is gone, opening 1's counted once
    with pytest.raises(StaleRoundError, match="opening 0"):
        rt.loss_backward(pending, targets, mask)
    with pytest.raises(StaleRoundError):
        rt.forward(1, hidden, prefix, mask, 2, attempt=0)
    # At SYNC, a stage that saw nothing of the final opening drops what it holds.
    rt.keep_only_attempt(2)
    assert rt.round_tokens == 0 and rt.flat_gradients().abs().sum() == 0
