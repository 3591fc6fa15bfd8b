"""sparseloco: chunk-wise top-k with packed offsets, its error feedback, its outer step, garbage refused."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import GPTJConfig

from peer.compression import sparseloco
from peer.compression.sparseloco import SparseLoCoConfig, nbytes
from peer.replica_sync import StageSync
from peer.stage_runtime import StageRuntime
from proto.run_config import TrainConfig

CONFIG = SparseLoCoConfig()  # 64 of every 4096 values, 2 bits, 128 values per scale
N = 100_003  # not a multiple of the chunk, the bucket or 8


def test_each_chunk_sends_its_largest_values_at_their_coordinates():
    v = torch.randn(N, generator=torch.Generator().manual_seed(0))
    config = SparseLoCoConfig(density=64 / 4096, chunk=4096, bits=8, bucket=128)
    payload, sent = sparseloco.compress(v, config)
    assert torch.equal(sent, sparseloco.decompress(payload, N, config))
    chunks = -(-N // 4096)
    for c in range(chunks):
        part, got = v[c * 4096:(c + 1) * 4096], sent[c * 4096:(c + 1) * 4096]
        keep = min(64, part.numel())
        chosen = set(got.nonzero().squeeze(1).tolist())
        assert chosen == set(part.abs().topk(keep).indices.tolist()), f"chunk {c}"
        assert torch.allclose(got[list(chosen)], part[list(chosen)], rtol=0.02, atol=0.02)  # 8-bit values
    assert int((sent != 0).sum()) == (chunks - 1) * 64 + min(64, N - (chunks - 1) * 4096)


def test_bytes_per_value_and_ratio_against_fp32():
    payload, _ = sparseloco.compress(torch.randn(1 << 20), CONFIG)
    per_value = nbytes(payload) / (1 << 20)
    # 1/64 of the values, each a 12-bit offset and a 2-bit code, plus a fp32 scale per 128 kept values
    expected = (1 / 64) * (12 + 2 + 32 / 128) / 8
    assert per_value == pytest.approx(expected, rel=0.01)
    assert 4 / per_value > 140  # what Covenant-72B's setting gives against fp32, per sync


def test_error_feedback_delays_but_never_loses():
    """What is not sent stays in the accumulator: sent + accumulator always equals everything fed in."""
    torch.manual_seed(1)
    error, fed, sent_total = torch.zeros(N), torch.zeros(N), torch.zeros(N)
    for _ in range(20):
        x = torch.randn(N)
        fed += x
        error += x
        payload, sent = sparseloco.compress(error, CONFIG)
        error -= sent
        sent_total += sent
    torch.testing.assert_close(sent_total + error, fed, rtol=0, atol=1e-4)
    assert error.abs().max() < fed.abs().max()  # the accumulator does not grow without bound


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("offsets"), "needs 'offsets'"),
    (lambda p: p.__setitem__("meta", torch.tensor([N, 65])), "kept per chunk"),
    (lambda p: p.__setitem__("offsets", p["offsets"][:-1]), "offsets must be uint8"),
    (lambda p: p.__setitem__("values.scales", p["values.scales"][:-1]), "scales"),
])
def test_decompress_refuses_garbage(change, message):
    payload, _ = sparseloco.compress(torch.randn(N), CONFIG)
    change(payload)
    with pytest.raises(ValueError, match=message):
        sparseloco.decompress(payload, N, CONFIG)


@pytest.mark.parametrize("kwargs, message", [
    (dict(density=0), "density"), (dict(density=1.5), "density"), (dict(chunk=1000), "chunk"), (dict(bits=3), "bits"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseLoCoConfig(**kwargs)


class LoopbackExchange:
    """Two replicas in one process: all_gather returns both payloads, in member order."""

    def __init__(self):
        self.payloads = {}

    def member(self, name):
        exchange = self

        class Member:
            async def all_gather(self, payload, group, *args, **kwargs):
                exchange.payloads[name] = payload
                while len(exchange.payloads) < len(group):
                    await asyncio.sleep(0.001)
                return [exchange.payloads[m] for m in group]
        return Member()


def test_outer_step_moves_the_shared_weights_by_the_mean_and_replicas_restart_from_them():
    train = TrainConfig(sync_compression="sparseloco", sync_every=2, sync_density=0.25, sync_chunk=64, sync_bits=8,
                        sync_error_decay=0.5, outer_lr=0.7, clip_grad_norm=0)
    config = GPTJConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, rotary_dim=8)
    exchange = LoopbackExchange()
    syncs = []
    for i, name in enumerate(("a", "b")):
        runtime = StageRuntime(config, train, 0, 2, torch.device("cpu"))
        runtime.initialise(seed=3)
        sync = StageSync(runtime, exchange.member(name), train, 0)
        sync.adopt({}, 1)
        syncs.append(sync)
    start = syncs[0].anchor.clone()
    assert torch.equal(start, syncs[1].anchor)

    async def round_of(round):
        for i, sync in enumerate(syncs):  # each replica trains on its own tokens
            ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10 * round + i))
            runtime = sync.runtime
            ctx = runtime.forward(round, ids, torch.zeros(2, dtype=torch.int64), torch.ones(2, 8))
            runtime.loss_backward(ctx, ids, torch.ones(2, 8))
        return await asyncio.gather(*(s.step_round(round, ["a", "b"], 0, 0, 0) for s in syncs))

    first = asyncio.run(round_of(1))
    assert all(o.diverged and o.how == "skipped" for o in first)  # round 1 of every 2: a local step only
    assert not torch.equal(syncs[0].runtime.flat_params(), syncs[1].runtime.flat_params())
    assert not exchange.payloads
    second = asyncio.run(round_of(2))
    assert all(o.synced and not o.diverged and o.how == "outer step with 2" for o in second)
    a, b = syncs
    codec = SparseLoCoConfig(density=0.25, chunk=64, bits=8)
    sent = {name: sparseloco.decompress({k: v for k, v in exchange.payloads[name].items() if k != "weight"}, start.numel(), codec)
            for name in ("a", "b")}
    assert exchange.payloads["a"]["weight"].item() == exchange.payloads["b"]["weight"].item() == 2 * 16  # two local steps of 16 tokens
    # The outer step: the shared weights move by outer_lr times the mean of what was sent; replicas restart from them.
    torch.testing.assert_close(a.anchor, start - 0.7 * (sent["a"] + sent["b"]) / 2, rtol=0, atol=1e-6)
    assert torch.equal(a.anchor, b.anchor) and a.checksum() == b.checksum()
    assert torch.equal(a.runtime.flat_params(), a.anchor) and torch.equal(b.runtime.flat_params(), b.anchor)
    # Error feedback: each replica sent the chunk-wise top-k of its accumulator and kept the rest.
    for sync, name in ((a, "a"), (b, "b")):
        whole = sync.error + sent[name]
        _, again = sparseloco.compress(whole, codec)
        torch.testing.assert_close(again, sent[name], rtol=0, atol=1e-6)
        assert sync.error.abs().sum() > 0
