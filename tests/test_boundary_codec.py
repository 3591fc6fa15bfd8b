"""Stage-boundary codec: plain, direct and AQ-SGD frames decode to what was meant; first visits get more bits."""

from __future__ import annotations

import pytest
import torch

from peer.compression.aqsgd import MissingEntries
from peer.compression.boundary import FIRST_ROWS, MASK_BITS, BoundaryCodec, Outgoing, pack_extras, unpack_extras
from proto.codec import FrameError
from proto.run_config import TrainConfig


def codecs(**train):
    config = TrainConfig(**train)
    return BoundaryCodec(config, 1 << 24, None, torch.device("cpu")), BoundaryCodec(config, 1 << 24, None, torch.device("cpu"))


def send(sender, receiver, ids, hidden):
    out = Outgoing(ids, hidden, {})
    tensors = sender.encode_activations("B", out)
    decoded = receiver.decode_activations("A", ids, tensors)
    sender.acknowledged("B", out)
    return tensors, decoded


def test_plain_and_direct_round_trip():
    hidden = torch.randn(3, 5, 16)
    a, b = codecs()
    _, got = send(a, b, [1, 2, 3], hidden)
    assert torch.equal(got, hidden)
    a, b = codecs(activation_compression="direct", activation_bits=8)
    _, got = send(a, b, [1, 2, 3], hidden)
    assert (got - hidden).norm() / hidden.norm() < 0.02


def test_aqsgd_first_visits_travel_apart_and_caches_agree():
    a, b = codecs(activation_compression="aqsgd", activation_bits=2, activation_first_bits=8)
    torch.manual_seed(0)
    base = torch.randn(4, 6, 32)
    tensors, first = send(a, b, [10, 11, 12, 13], base)
    assert "aqf.base" in tensors and "aq.base" not in tensors  # all first visits: 8 bits
    assert (first - base).norm() / base.norm() < 0.02
    # Next visit of 10 and 11 plus two new samples: revisits at 2 bits, new rows at 8, in one frame.
    batch = torch.cat([base[:2] + 0.01 * torch.randn(2, 6, 32), torch.randn(2, 6, 32)])
    tensors, got = send(a, b, [10, 11, 20, 21], batch)
    assert FIRST_ROWS in tensors and tensors[FIRST_ROWS].tolist() == [2, 3]
    assert (got - batch).norm() / batch.norm() < 0.03
    revisit_sender = a._senders["B"][0]
    revisit_receiver = b._receivers["A"][0]
    for sid in (10, 11, 20, 21):
        sent = revisit_sender.cache.get(sid)
        kept = revisit_receiver.cache.get((sid, sent.version))
        assert kept is not None and torch.equal(sent.tensor, kept.tensor), f"caches of sample {sid} differ"


def test_receiver_that_lost_its_cache_asks_for_direct_frames():
    a, b = codecs(activation_compression="aqsgd")
    hidden = torch.randn(2, 4, 8)
    send(a, b, [1, 2], hidden)
    fresh = codecs(activation_compression="aqsgd")[1]
    out = Outgoing([1, 2], hidden, {})
    with pytest.raises(MissingEntries) as missing:
        fresh.decode_activations("A", [1, 2], a.encode_activations("B", out))
    a.missing("B", out, missing.value.sample_ids)
    again = Outgoing([1, 2], hidden, {})
    got = fresh.decode_activations("A", [1, 2], a.encode_activations("B", again))
    a.acknowledged("B", again)
    assert got.shape == hidden.shape


def test_gradients_quantized_when_asked():
    grad = torch.randn(2, 4, 8)
    a, b = codecs(gradient_bits=4)
    tensors = a.encode_gradient(grad)
    assert "grad" not in tensors
    assert (b.decode_gradient(tensors) - grad).norm() / grad.norm() < 0.15
    assert torch.equal(codecs()[0].decode_gradient({"grad": grad}), grad)


def frame_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_extras_travel_packed_and_decode_to_what_was_sent():
    targets = torch.randint(0, 1000, (3, 5))
    mask = (torch.rand(3, 5) > 0.4).float()
    extras = {"target_ids": targets, "loss_mask": mask, "prefix_lengths": torch.tensor([0, 2, 5])}
    a, b = codecs(activation_compression="direct", activation_bits=2)
    tensors = a.encode_activations("B", Outgoing([1, 2, 3], torch.randn(3, 5, 16), extras))
    assert tensors["target_ids"].dtype == torch.int16 and MASK_BITS in tensors and "loss_mask" not in tensors
    got = unpack_extras(tensors)
    for name, value in extras.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    # Ids that need 32 bits, or a weighted mask, still arrive exactly.
    wide = {"target_ids": torch.tensor([[0, 50_000]]), "loss_mask": torch.tensor([[0.5, 1.0]])}
    got = unpack_extras(pack_extras(wide))
    assert got["target_ids"].dtype == torch.int64 and torch.equal(got["target_ids"], wide["target_ids"])
    assert torch.equal(got["loss_mask"], wide["loss_mask"])
    # Uncompressed runs send the extras as they are (the fp32/int64 reference).
    plain = codecs()[0].encode_activations("B", Outgoing([1, 2, 3], torch.randn(3, 5, 16), extras))
    assert plain["target_ids"].dtype == torch.int64 and plain["loss_mask"].dtype == torch.float32


def test_malformed_packed_mask_is_refused():
    tensors = pack_extras({"target_ids": torch.zeros(2, 9, dtype=torch.int64), "loss_mask": torch.ones(2, 9)})
    tensors[MASK_BITS] = tensors[MASK_BITS][:1]
    with pytest.raises(FrameError, match="uint8 bytes"):
        unpack_extras(tensors)


def test_larger_boundary_blocks_spend_fewer_bytes_on_scales():
    hidden, grad = torch.randn(4, 64, 128), torch.randn(4, 64, 128)
    sizes = {}
    for block in (64, 256):
        a, b = codecs(activation_compression="direct", activation_bits=2, gradient_bits=2, boundary_block=block)
        acts, decoded = send(a, b, [1, 2, 3, 4], hidden)
        grads = a.encode_gradient(grad)
        sizes[block] = frame_bytes(acts) + frame_bytes(grads)
        assert (decoded - hidden).norm() / hidden.norm() < 0.6
        assert (b.decode_gradient(grads) - grad).norm() / grad.norm() < 0.6
    assert sizes[256] < 0.9 * sizes[64], sizes


def test_the_activation_cache_budget_is_shared_by_every_neighbour():
    """With more neighbours than a fixed split assumed, all caches together still hold at most the budget in memory."""
    budget = 64 * 1024
    codec = BoundaryCodec(TrainConfig(activation_compression="aqsgd"), budget, None, torch.device("cpu"))
    receiver = BoundaryCodec(TrainConfig(activation_compression="aqsgd"), 1 << 24, None, torch.device("cpu"))
    for neighbour in range(6):
        for batch in range(4):
            ids = [100 * neighbour + 10 * batch + i for i in range(4)]
            out = Outgoing(ids, torch.randn(4, 8, 64), {})
            receiver.decode_activations(f"src-{neighbour}", ids, codec.encode_activations(f"peer-{neighbour}", out))
            codec.acknowledged(f"peer-{neighbour}", out)
        assert codec.cache_memory_bytes <= budget, (neighbour, codec.cache_memory_bytes)
    assert len(codec._caches) == 6 and codec.cache_memory_bytes > budget // 2  # one cache per neighbour, the budget in use


def test_caches_are_bounded_in_number_and_on_disk(tmp_path):
    """A crowd of senders cannot grow the receiver's caches: at most MAX_NEIGHBOUR_CACHES are kept, spilled bytes stay
    within the disk budget, and a sender whose cache was dropped is told to send its samples whole again."""
    from peer.compression.boundary import MAX_NEIGHBOUR_CACHES

    config = TrainConfig(activation_compression="aqsgd")
    memory, disk = 16 * 1024, 256 * 1024
    receiver = BoundaryCodec(config, memory, tmp_path, torch.device("cpu"), disk_bytes=disk)
    senders = {}
    for neighbour in range(MAX_NEIGHBOUR_CACHES + 8):
        senders[neighbour] = BoundaryCodec(config, 1 << 24, None, torch.device("cpu"))
        for batch in range(3):
            ids = [10 * batch + i for i in range(4)]
            out = Outgoing(ids, torch.randn(4, 8, 64), {})
            receiver.decode_activations(f"src-{neighbour}", ids, senders[neighbour].encode_activations("receiver", out))
            senders[neighbour].acknowledged("receiver", out)
        assert len(receiver._caches) <= MAX_NEIGHBOUR_CACHES
        assert receiver.cache_memory_bytes <= memory and receiver.cache_disk_bytes <= disk, neighbour
    assert receiver.cache_disk_bytes > 0  # the budgets were in use, not idle
    ids = [0, 1, 2, 3]
    with pytest.raises(MissingEntries):  # the first neighbour's cache was dropped: its revisit cannot be decoded
        receiver.decode_activations("src-0", ids, senders[0].encode_activations("receiver", Outgoing(ids, torch.randn(4, 8, 64), {})))
    receiver.close()
    assert not any(tmp_path.rglob("*.safetensors"))
