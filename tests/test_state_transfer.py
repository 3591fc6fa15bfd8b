"""A stage's state handed over in parts: any size, each part checked by hash, one snapshot per round."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import P2P

from peer.state_transfer import Piece, StateServer, TooOld, cut_into_parts, fetch_state, part_digest, part_tensors
from peer.transport import FrameTransport, WireCounters


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "anchor": torch.randn(1000, generator=g),                      # 4000 bytes: spans parts of 1024
        "w": torch.randn(7, 5, generator=g),
        "optim.w.state1": torch.randint(0, 255, (7, 5), dtype=torch.uint8, generator=g),
        "optim.w.qmap1": torch.randn(256, generator=g),
        "empty": torch.empty(0),
    }


def test_parts_cover_every_element_once_and_stay_under_the_part_size():
    state = _state()
    parts = cut_into_parts(state, part_bytes=1024)
    covered: dict[str, list[tuple[int, int]]] = {}
    for pieces in parts:
        assert sum((p.stop - p.start) * state[p.name].element_size() for p in pieces) <= 1024
        for p in pieces:
            covered.setdefault(p.name, []).append((p.start, p.stop))
    for name, tensor in state.items():
        spans = sorted(covered[name])
        assert spans[0][0] == 0 and spans[-1][1] == tensor.numel()
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), name
    assert len([p for pieces in parts for p in pieces if p.name == "anchor"]) >= 4  # 4000 bytes in 1024-byte parts


def test_a_changed_byte_changes_the_part_digest():
    state = _state()
    pieces = cut_into_parts(state, part_bytes=1024)[0]
    sliced = part_tensors(state, pieces)
    before = part_digest(pieces, sliced)
    sliced[pieces[0].key][3] += 1
    assert part_digest(pieces, sliced) != before


def _serve_and_fetch(state, next_round=5, at_least=-1, corrupt_first=0, part_bytes=1024):
    async def main():
        a = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        b = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        exports = []
        try:
            served, joiner = FrameTransport(a, WireCounters()), FrameTransport(b, WireCounters())
            joiner.addresses[a.peer_id.to_base58()] = [str(m) for m in await a.get_visible_maddrs()]

            async def export():
                exports.append(1)
                return next_round, {k: v.clone() for k, v in state.items()}, {"checksum": "abc"}

            server = StateServer(served, "run", lambda: (1, next_round), export, part_bytes=part_bytes)
            await server.start()
            if corrupt_first:  # a link that flips a bit in the first few parts it carries
                call, left = joiner.call, [corrupt_first]

                async def flipping(*args, **kwargs):
                    header, tensors = await call(*args, **kwargs)
                    if tensors and left[0] > 0:
                        left[0] -= 1
                        next(iter(tensors.values())).view(torch.uint8).view(-1)[0] ^= 1
                    return header, tensors

                joiner.call = flipping
            got = await fetch_state(joiner, a.peer_id.to_base58(), "run", 1, at_least=at_least)
            again = await fetch_state(joiner, a.peer_id.to_base58(), "run", 1, at_least=at_least)
            return got, again, len(exports), len(server.snapshots)
        finally:
            await a.shutdown()
            await b.shutdown()

    return asyncio.run(main())


def test_a_joiner_gets_the_state_bit_identical_from_many_parts():
    state = _state()
    got, again, exports, left = _serve_and_fetch(state)
    assert got.next_round == 5 and got.extras == {"checksum": "abc"}
    assert set(got.tensors) == set(state)
    for name, tensor in state.items():
        assert got.tensors[name].dtype == tensor.dtype and got.tensors[name].shape == tensor.shape
        assert torch.equal(got.tensors[name].view(torch.uint8) if tensor.numel() else got.tensors[name],
                           tensor.view(torch.uint8) if tensor.numel() else tensor)
    assert exports == 2 and left == 0  # the first joiner's "done" dropped its snapshot; the second got a fresh one


def test_a_part_that_fails_its_hash_is_asked_for_again():
    state = _state()
    got, _, _, _ = _serve_and_fetch(state, corrupt_first=2)
    assert torch.equal(got.tensors["anchor"], state["anchor"])


def test_a_replica_older_than_the_checkpoint_is_refused_before_anything_is_copied():
    got, _, exports, _ = _serve_and_fetch(_state(), next_round=5, at_least=4)  # at the checkpoint's round: as good
    assert got.next_round == 5 and exports == 2
    with pytest.raises(TooOld):
        _serve_and_fetch(_state(), next_round=5, at_least=5)


def test_piece_keys_name_the_tensor_and_offset():
    assert Piece("transformer.h.0.attn.q_proj.weight", 64, 128).key == "transformer.h.0.attn.q_proj.weight@64"


def test_a_part_that_keeps_failing_its_hash_gives_up_on_the_replica():
    from proto.codec import FrameError

    with pytest.raises(FrameError, match="hashes to"):
        _serve_and_fetch(_state(), corrupt_first=3)
