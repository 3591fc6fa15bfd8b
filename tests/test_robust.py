"""CenteredClip (peer.robust) and the replica sync's robust exact aggregation over an in-process exchange."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import PeerID

from peer import robust
from peer.replica_sync import SUSPECT_EXCESS, SyncExchange, _check_gathered

D = 4096


def honest(n: int, seed: int = 0, signal: float = 1.0, tokens: tuple[int, ...] | None = None) -> tuple[list[torch.Tensor], list[float]]:
    """``n`` noisy per-token gradients around one true gradient; noise shrinks with each replica's tokens."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(D, generator=g)
    true *= signal / true.norm()
    tokens = tokens or tuple(128 for _ in range(n))
    xs = [true + torch.randn(D, generator=g) / D**0.5 * (128 / t) ** 0.5 for t in tokens]
    return xs, [float(t) for t in tokens]


def weighted_mean(xs: list[torch.Tensor], ws: list[float]) -> torch.Tensor:
    acc = torch.zeros(D, dtype=torch.float64)
    for x, w in zip(xs, ws):
        acc += x.double() * w
    return (acc / sum(ws)).float()


def attacked(x: torch.Tensor, attack: str) -> torch.Tensor:
    if attack == "scale":
        return x * 100
    if attack == "signflip":
        return -x
    return torch.randn(D, generator=torch.Generator().manual_seed(99)) * 10 * x.norm() / D**0.5  # random, 10x the norm


def test_equals_the_weighted_mean_bit_for_bit_when_nothing_is_beyond_tau():
    xs, ws = honest(4, tokens=(64, 128, 192, 256))
    result = robust.centered_clip(xs, ws, tau=1e6, iterations=10)
    assert torch.equal(result.aggregate, weighted_mean(xs, ws))
    assert all(e <= 1 for e in result.excess) and result.clipped == (0.0,) * 4


def test_robust_mean_of_honest_replicas_is_their_token_weighted_mean_counts_capped_at_the_median():
    for n in (3, 4):
        xs, ws = honest(n, seed=n, tokens=(64, 128, 160, 96)[:n])
        result = robust.robust_mean(xs, ws, tau=3.0, iterations=10)
        assert max(result.excess) <= 1
        assert torch.equal(result.aggregate, weighted_mean(xs, robust.capped_weights(ws)))
    assert robust.capped_weights([64, 128, 160]) == [64, 128, 128] and robust.capped_weights([64, 128, 160, 96]) == [64, 112, 112, 96]
    xs, ws = honest(4, seed=1)  # equal token counts: the plain token-weighted mean
    assert torch.equal(robust.robust_mean(xs, ws, tau=3.0, iterations=10).aggregate, weighted_mean(xs, ws))


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("attack", ["scale", "signflip", "random"])
def test_one_bad_input_moves_the_result_by_at_most_the_bound(n, attack):
    xs, ws = honest(n, seed=7)
    good_mean = weighted_mean(xs[1:], ws[1:])
    bad = [attacked(xs[0], attack), *xs[1:]]
    result = robust.robust_mean(bad, ws, tau=3.0, iterations=10)
    assert max(result.excess[1:]) <= 1  # the bound's premise: the good inputs are within tau
    share = ws[0] / sum(ws)
    bound = robust.influence_bound(share, result.tau)
    assert float((result.aggregate - good_mean).norm()) <= bound * (1 + 1e-6)
    assert bound == pytest.approx(result.tau / (n - 1))  # one bad replica of n, equal weights
    if attack != "signflip":  # far outside the honest spread: clipped, and its sender is a suspect
        assert result.excess[0] > SUSPECT_EXCESS
        plain = weighted_mean(bad, ws)
        assert float((plain - good_mean).norm()) > 2 * bound  # what the plain mean would have let through


def test_a_bad_weight_claim_buys_no_more_than_the_median_weight():
    xs, ws = honest(3, seed=3)
    bad = [attacked(xs[0], "scale"), *xs[1:]]
    result = robust.robust_mean(bad, [1e12, *ws[1:]], tau=3.0, iterations=10)
    assert max(result.excess[1:]) <= 1
    bound = robust.influence_bound(1 / 3, result.tau)  # the claim counts as the median: a third of the weight
    assert float((result.aggregate - weighted_mean(xs[1:], ws[1:])).norm()) <= bound * (1 + 1e-6)


def test_inputs_of_weight_zero_take_no_part():
    xs, ws = honest(4, seed=5)
    result = robust.robust_mean([xs[0] * 1e6, *xs[1:]], [0.0, *ws[1:]], tau=3.0, iterations=10)
    assert torch.equal(result.aggregate, robust.robust_mean(xs[1:], ws[1:], tau=3.0, iterations=10).aggregate)
    assert result.excess[0] == 0.0


def test_same_inputs_same_bits_whatever_the_thread_count():
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(robust.CHUNK + 12345, generator=g) for _ in range(4)]
    xs[2] = xs[2] * 100
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            outs.append(robust.robust_mean(xs, [1.0, 2.0, 3.0, 4.0], tau=2.0, iterations=5))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o.aggregate, outs[0].aggregate) and o.excess == outs[0].excess for o in outs)


def test_rejects_what_it_cannot_aggregate():
    x = torch.zeros(4)
    with pytest.raises(ValueError):
        robust.centered_clip([x, x], [1.0, -1.0], tau=1.0, iterations=1)
    with pytest.raises(ValueError):
        robust.centered_clip([x, torch.zeros(5)], [1.0, 1.0], tau=1.0, iterations=1)
    with pytest.raises(ValueError):
        robust.centered_clip([x], [1.0], tau=float("nan"), iterations=1)


# ---------------------------------------------------------------- the exact sync's robust reduce over loopback


class Loopback:
    """Frames between SyncExchanges of one process: ``call`` hands the frame to the receiver's handler."""

    def __init__(self) -> None:
        self.handlers: dict[str, object] = {}

    def transport(self, me: str) -> "Loopback.Transport":
        net = self

        class Transport:
            async def serve(self, name, handler, **kwargs):
                net.handlers[me] = handler

            async def call(self, peer, handler, header, tensors, *args):
                return await net.handlers[peer.to_base58()](header, {k: v.clone() for k, v in tensors.items()}, PeerID.from_base58(me))

        return Transport()


def peer_ids(n: int) -> list[str]:
    return sorted(PeerID(bytes([0x00, 0x04, i, i, i, i])).to_base58() for i in range(1, n + 1))


async def reduce_group(contributions: dict[str, torch.Tensor], weights: dict[str, float], forge: str = "", factor: float = 100.0):
    """Every member's ``all_reduce_robust``; ``forge`` names an owner that sends everyone ``factor`` x its part's aggregate."""
    import peer.replica_sync as replica_sync

    net, group = Loopback(), sorted(contributions)
    exchanges = {m: SyncExchange(net.transport(m), "run", m) for m in group}
    for e in exchanges.values():
        await e.start()
    honest_part = replica_sync._robust_part

    async def compute(fn, *args):
        return fn(*args)

    def compute_for(member):
        async def run(fn, *args):
            if fn is honest_part and member == forge:
                reduced, suspects = fn(*args)
                return reduced * factor, suspects
            return fn(*args)
        return run

    return await asyncio.gather(*(exchanges[m].all_reduce_robust(contributions[m], weights[m], group, 1, 0, 5.0, 0, compute_for(m), 3.0, 10)
                                  for m in group))


@pytest.mark.parametrize("attack", ["scale", "random"])
def test_a_bad_contribution_is_clipped_and_named_by_every_owner(attack):
    group = peer_ids(4)
    xs, ws = honest(4, seed=21)
    contributions = dict(zip(group, xs))
    bad = group[1]
    contributions[bad] = attacked(contributions[bad], attack)
    results = asyncio.run(reduce_group(contributions, dict(zip(group, ws))))
    assert all(torch.equal(r.mean, results[0].mean) for r in results)  # one aggregate per part: every replica holds the same
    for member, r in zip(group, results):
        assert r.suspects == (() if member == bad else (bad,))
    good = weighted_mean([x for m, x in zip(group, xs) if m != bad], [w for m, w in zip(group, ws) if m != bad])
    parts = [torch.tensor_split(contributions[m], 4) for m in group]
    radii = [robust.robust_mean([p[i] for p in parts], ws, 3.0, 10).tau for i in range(4)]
    bound = sum((tau / 3) ** 2 for tau in radii) ** 0.5  # one bad of 4 in every part
    assert float((results[0].mean - good).norm()) <= bound * (1 + 1e-6)
    assert float((weighted_mean(list(contributions.values()), ws) - good).norm()) > 2 * bound


def test_honest_replicas_reduce_to_the_token_weighted_mean_and_name_nobody():
    group = peer_ids(3)
    xs, ws = honest(3, seed=4, tokens=(100, 128, 128))
    results = asyncio.run(reduce_group(dict(zip(group, xs)), dict(zip(group, ws))))
    for r in results:
        assert r.suspects == ()
        assert torch.equal(r.mean, weighted_mean(xs, ws))


@pytest.mark.parametrize("factor", [100.0, -1.0])
def test_a_forged_part_from_its_owner_is_not_applied_and_the_owner_is_named(factor):
    group = peer_ids(4)
    xs, ws = honest(4, seed=8)
    owner = group[2]
    results = asyncio.run(reduce_group(dict(zip(group, xs)), dict(zip(group, ws)), forge=owner, factor=factor))
    honest_results = [r for m, r in zip(group, results) if m != owner]
    assert all(r.suspects == (owner,) for r in honest_results)
    assert all(torch.equal(r.mean, honest_results[0].mean) for r in honest_results)  # the honest replicas still agree
    part = torch.tensor_split(honest_results[0].mean, 4)[2]
    assert torch.equal(part, torch.zeros_like(part))  # the forged part moves nothing this round


def test_the_owner_check_accepts_an_honest_aggregate_of_uneven_replicas():
    group = peer_ids(4)
    xs, ws = honest(4, seed=9, tokens=(32, 128, 256, 256), signal=0.2)
    parts = [list(torch.tensor_split(x, 4)) for x in xs]
    aggregate = [robust.robust_mean([p[i] for p in parts], ws, 3.0, 10).aggregate for i in range(4)]
    for j, me in enumerate(group):
        _, forged = _check_gathered(list(aggregate), parts[j], group, me, True)
        assert forged == ()


def test_the_sync_mailbox_keeps_only_nearby_rounds_and_a_few_frames_per_sender():
    """Frames nobody asked for cannot pile up: a round far from the current one is refused, and so is a sender's frame
    beyond MAILBOX_PER_SENDER waiting ones; the receiver still takes the frames it does ask for."""
    import asyncio

    from peer.replica_sync import MAILBOX_PER_SENDER, MAILBOX_ROUNDS
    from proto import codec
    from proto import hometrain_pb2 as pb

    me, stranger = peer_ids(2)
    net = Loopback()
    exchange = SyncExchange(net.transport(me), "run", me, current_round=lambda: 50)

    async def main():
        await exchange.start()
        handler = net.handlers[me]

        def frame(round: int, part: int):
            return handler(pb.FrameHeader(kind=pb.SYNC_REDUCE, run_id="run", round=round, part=part), {"part": torch.ones(4)},
                           PeerID.from_base58(stranger))

        with pytest.raises(codec.FrameError, match="round 1000"):
            await frame(1000, 0)
        for part in range(MAILBOX_PER_SENDER):
            await frame(50 + MAILBOX_ROUNDS, part)
        with pytest.raises(codec.FrameError, match="waiting"):
            await frame(50, MAILBOX_PER_SENDER)
        taken = await exchange._take((50 + MAILBOX_ROUNDS, 0, 0, pb.SYNC_REDUCE, 0, stranger), timeout=1)
        assert torch.equal(taken["part"], torch.ones(4))
        await frame(50, MAILBOX_PER_SENDER)  # one was taken: room for one more

    asyncio.run(main())
