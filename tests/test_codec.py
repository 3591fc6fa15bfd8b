"""Frames and tensors on the wire: round trips, and every malformed input refused with a reason."""

from __future__ import annotations

import asyncio

import pytest
import torch

from proto import PROTOCOL_VERSION, codec
from proto import hometrain_pb2 as pb


async def _aiter(items):
    for item in items:
        yield item


def decode(messages, **kwargs):
    return asyncio.run(codec.decode_frame(_aiter(messages), **kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_tensor_round_trip(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    back = codec.from_message(codec.to_message(t))
    assert back.dtype == dtype and torch.equal(back, t)


def test_frame_round_trip_spans_many_chunks():
    header = pb.FrameHeader(kind=pb.FORWARD, run_id="r", round=3, microbatch=7, stage=1, sample_ids=[4, 5])
    tensors = {"hidden": torch.randn(2, 300, 1000), "ids": torch.arange(10)}
    messages = list(codec.encode_frame(header, tensors, chunk_bytes=1 << 16))
    assert len(messages) > 10 and messages[0].HasField("header") and not messages[1].HasField("header")
    got_header, got, nbytes = decode(messages)
    assert got_header.round == 3 and list(got_header.sample_ids) == [4, 5]
    assert got_header.protocol_version == PROTOCOL_VERSION
    assert nbytes == codec.frame_nbytes(tensors)
    assert torch.equal(got["hidden"], tensors["hidden"]) and torch.equal(got["ids"], tensors["ids"])


def test_empty_frame_round_trip():
    header, tensors, nbytes = decode(list(codec.encode_frame(pb.FrameHeader(kind=pb.ACK), {})))
    assert header.kind == pb.ACK and tensors == {} and nbytes == 0


def _frame(**meta):
    header = pb.FrameHeader(kind=pb.FORWARD, protocol_version=PROTOCOL_VERSION)
    header.tensors.add(**meta)
    return header


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([], "empty stream"),
        ([pb.Frame(chunk=b"x")], "no header"),
        ([pb.Frame(header=pb.FrameHeader(protocol_version=PROTOCOL_VERSION + 1))], "protocol"),
        ([pb.Frame(header=_frame(name="x", dtype="complex64", shape=[1], nbytes=8))], "unknown dtype"),
        ([pb.Frame(header=_frame(name="x", dtype="float32", shape=[4], nbytes=8))], "does not make"),
        ([pb.Frame(header=_frame(name="x", dtype="float32", shape=[2], nbytes=8), chunk=b"1234")], "ended after 4 of 8"),
        ([pb.Frame(header=_frame(name="x", dtype="float32", shape=[1], nbytes=4), chunk=b"12345678")], "exceeds"),
        ([pb.Frame(header=_frame(name="x", dtype="float32", shape=[-1], nbytes=0))], "does not make"),
    ],
)
def test_malformed_frames_are_refused(messages, reason):
    with pytest.raises(codec.FrameError, match=reason):
        decode(messages)


def test_oversized_frame_refused_before_reading_payload():
    header = _frame(name="x", dtype="float32", shape=[1 << 20], nbytes=4 << 20)
    with pytest.raises(codec.FrameError, match="over the limit"):
        decode([pb.Frame(header=header)], max_bytes=1 << 20)


def test_non_finite_and_wrong_shapes_are_refused():
    with pytest.raises(codec.FrameError, match="NaN or Inf"):
        codec.require_finite({"g": torch.tensor([1.0, float("nan")])})
    with pytest.raises(codec.FrameError, match="NaN or Inf"):
        codec.require_finite({"g": torch.tensor([float("inf")])})
    codec.require_finite({"ids": torch.tensor([1, 2])})
    with pytest.raises(codec.FrameError, match="shape"):
        codec.require_shape("m", torch.zeros(2, 3), (2, 4))
    with pytest.raises(codec.FrameError, match="dtype"):
        codec.require_shape("m", torch.zeros(2, 3), (2, 3), torch.int64)


def test_link_meter_ignores_small_calls_and_averages_large_ones():
    from peer.transport import LinkMeter

    meter = LinkMeter(min_bytes=1000, smoothing=0.5)
    meter.observe(999, 0.001)  # too small to say anything about bandwidth
    assert meter.bytes_per_second == 0
    meter.observe(4000, 1.0)
    meter.observe(2000, 1.0)
    assert meter.bytes_per_second == 3000


def test_announced_addresses_are_dialled_without_their_peer_id():
    from peer.transport import dialable

    assert dialable("/ip4/127.0.0.1/tcp/37365/p2p/12D3KooWL9q96AJFpitWdc9STkfSDsVvtpCHp2dqua5v7rYFndK1") == "/ip4/127.0.0.1/tcp/37365"
    assert dialable("/ip4/10.0.0.2/tcp/4001") == "/ip4/10.0.0.2/tcp/4001"


def test_a_relay_address_is_encoded_as_p2pd_reads_it():
    from hivemind.p2p import PeerID

    from peer.transport import connect_address, dialable

    relay = "12D3KooWS4ikruusyM48AkxpHhvWJESSCho1UmPNexVz8ZubURM1"
    target = "12D3KooWL9q96AJFpitWdc9STkfSDsVvtpCHp2dqua5v7rYFndK1"
    announced = f"/ip4/10.0.0.1/tcp/31337/p2p/{relay}/p2p-circuit/p2p/{target}"
    assert dialable(announced) == f"/ip4/10.0.0.1/tcp/31337/p2p/{relay}/p2p-circuit"
    raw = connect_address(announced).to_bytes()
    multihash = PeerID.from_base58(relay).to_bytes()
    # /ip4 (4) 10.0.0.1, /tcp (6) 31337, /p2p (421: a5 03) <len> <multihash>, /p2p-circuit (290: a2 02)
    assert raw == bytes([4, 10, 0, 0, 1, 6]) + (31337).to_bytes(2, "big") + b"\xa5\x03" + bytes([len(multihash)]) + multihash + b"\xa2\x02"
