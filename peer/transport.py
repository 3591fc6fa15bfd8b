"""Peer-to-peer frames over hivemind's libp2p streams, with every byte counted by kind.

A call sends one streamed ``Frame`` (header + tensors) to a named handler of another peer
and receives one frame back. Frames are streamed in 1 MiB slices because hivemind caps a
unary message at 4 MiB while a GPT-J-6B boundary is 16 MiB per sample in fp16. Turning a
large frame into bytes and back (a stage's state is gigabytes) happens in a worker thread, so
the event loop keeps answering heartbeats meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping

import torch
from hivemind.p2p import P2P, P2PContext, P2PHandlerError, PeerID
from hivemind.utils.multiaddr import Multiaddr

from proto import codec
from proto import hometrain_pb2 as pb
from proto.codec import WireKind

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
OFF_LOOP_BYTES = 4 << 20  # frames larger than this are encoded and decoded in a worker thread
MAX_STREAMS_PER_PEER = 64  # frames one caller may be sending at once (a stage-0 peer pipelines --max-inflight of them)
RECEIVE_TIMEOUT = 600.0    # seconds one frame may take to arrive (a slow sender cannot hold a stream open for ever)
# A relayed peer dials a caller that reached it over the relay: checks this often, this many times (about 5 s),
# and looks again after a quiet spell.
DIAL_BACK_EVERY, DIAL_BACK_TRIES, DIAL_BACK_QUIET = 0.25, 20, 10.0
# A refused caller's small frame is read to its end before the refusal is sent: closing a stream with bytes still
# unread can reset it, and the caller then sees a broken pipe instead of why it was refused. Larger frames are cut off.
REFUSAL_DRAIN_BYTES, REFUSAL_DRAIN_SECONDS = 1 << 20, 2.0
Handler = Callable[[pb.FrameHeader, Tensors, PeerID], Awaitable[tuple[pb.FrameHeader, Mapping[str, torch.Tensor]]]]
Admits = Callable[[str], Awaitable[bool]]  # base58 libp2p id of a caller -> may it use the data plane


class NotAMember(PermissionError):
    """A data-plane call from a libp2p peer that is not in the run's member set."""


def fp32_equivalent(tensors: Mapping[str, torch.Tensor]) -> int:
    """What these tensors would cost sent plainly: floats as fp32, everything else as is.

    A compressed frame says what it stands for in ``FrameHeader.raw_bytes`` instead."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in tensors.values())


@dataclass
class WireCounters:
    """Bytes sent and received per kind (activations, gradients, sync, state, control), beside their fp32 cost."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    uncompressed_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    uncompressed_received: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def count_sent(self, kind: WireKind, nbytes: int, uncompressed: int) -> None:
        self.sent[kind] += nbytes
        self.uncompressed_sent[kind] += uncompressed

    def count_received(self, kind: WireKind, nbytes: int, uncompressed: int) -> None:
        self.received[kind] += nbytes
        self.uncompressed_received[kind] += uncompressed


def dialable(maddr: str) -> str:
    """A multiaddr without its trailing /p2p/<id>: p2pd refuses a connect whose addresses end in it
    ('length greater than remaining number of bytes in buffer'), and announced addresses do. A relay
    address keeps the relay's own id: ``/ip4/R/tcp/P/p2p/<relay>/p2p-circuit/p2p/<id>`` dials as
    ``/ip4/R/tcp/P/p2p/<relay>/p2p-circuit``."""
    head, sep, tail = maddr.rpartition("/p2p/")
    return head if sep and "/" not in tail else maddr


def relayed_address(maddr: str) -> bool:
    """A circuit-relay multiaddr (``.../p2p-circuit/...``): a path through a relay, not to the peer itself."""
    return "/p2p-circuit" in maddr


async def connection_addresses(p2p: P2P, peer: PeerID) -> list[str]:
    """The remote address of each open connection to ``peer`` (p2pd lists one per connection)."""
    return [str(a) for info in await p2p.list_peers() if info.peer_id == peer for a in info.addrs]


P2P_CODE, CIRCUIT_CODE = 421, 290  # multiaddr protocol codes of /p2p/<id> and /p2p-circuit


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _EncodedMaddr:
    """A multiaddr already in binary form, for p2pd's connect (which only calls ``to_bytes``)."""

    def __init__(self, data: bytes, text: str) -> None:
        self.data, self.text = data, text

    def to_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return self.text


def connect_address(maddr: str):
    """What p2pd's connect takes for an announced address. The multiaddr library writes a /p2p/ part as a CID,
    which p2pd cannot parse, so a relay address (which must name its relay) is encoded here with the raw
    multihash that the multiaddr spec (and p2pd) use."""
    addr = dialable(maddr)
    if not relayed_address(addr):
        return Multiaddr(addr)
    transport, _, rest = addr.partition("/p2p/")
    relay_id = rest.split("/", 1)[0]
    multihash = PeerID.from_base58(relay_id).to_bytes()
    data = Multiaddr(transport).to_bytes() + _varint(P2P_CODE) + _varint(len(multihash)) + multihash + _varint(CIRCUIT_CODE)
    return _EncodedMaddr(data, addr)


@dataclass
class LinkMeter:
    """Bytes/s this peer's link carried, from calls that moved at least ``min_bytes`` (smaller ones
    measure latency, not bandwidth); a moving average, 0 until the first such call. The time
    includes the remote handler's work, so the figure errs low."""

    min_bytes: int = 256 * 1024
    smoothing: float = 0.3
    bytes_per_second: float = 0.0

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes < self.min_bytes or seconds <= 0:
            return
        rate = nbytes / seconds
        self.bytes_per_second = rate if not self.bytes_per_second else (1 - self.smoothing) * self.bytes_per_second + self.smoothing * rate


class FrameTransport:
    """Sends frames to other peers' handlers and serves this peer's handlers."""

    def __init__(self, p2p: P2P, counters: WireCounters, max_frame_bytes: int = codec.DEFAULT_MAX_FRAME_BYTES,
                 max_streams_per_peer: int = MAX_STREAMS_PER_PEER, receive_timeout: float = RECEIVE_TIMEOUT) -> None:
        self.p2p = p2p
        self.counters = counters
        self.max_frame_bytes = max_frame_bytes
        self.max_streams_per_peer = max_streams_per_peer  # frames one caller may be sending this peer at once
        self.receive_timeout = receive_timeout            # longest a caller may take to send one frame
        self.limits: dict[str, Callable[[], int]] = {}     # handler -> the largest frame it takes now (bytes)
        self.open_streams: dict[str, int] = defaultdict(int)
        self.frames_rejected = 0
        self.admits: Admits | None = None  # set once the peer knows its run's member set (peer.members)
        self.addresses: dict[str, list[str]] = {}  # peer id -> multiaddrs it announced (from the stage directory)
        self.link = LinkMeter()
        self.dial_back = False  # set for a peer behind NAT: callers that came over the relay are dialled directly
        self._dialled_back: dict[str, float] = {}  # caller -> when this peer last made sure it has a direct link
        self._dialling: set[asyncio.Task] = set()  # dial-backs under way (held here: the loop keeps only weak references)

    async def call(
        self, peer: PeerID, handler: str, header: pb.FrameHeader, tensors: Mapping[str, torch.Tensor],
        send_kind: WireKind, receive_kind: WireKind, timeout: float, measure_link: bool = True,
    ) -> tuple[pb.FrameHeader, Tensors]:
        """Send a frame to ``handler`` at ``peer`` and return its answer (raises on error or timeout).

        ``measure_link=False`` for calls whose answer waits on remote compute (pipeline hops)."""

        sent = codec.frame_nbytes(tensors)
        messages = await _encode(header, tensors, sent)

        async def requests():
            for message in messages:
                yield message
            # Counted once libp2p has taken the whole frame: a resend counts again, a dial that never connected does not.
            self.counters.count_sent(send_kind, sent, header.raw_bytes or fp32_equivalent(tensors))

        async def exchange() -> tuple[pb.FrameHeader, Tensors, int]:
            responses = await self.p2p.iterate_protobuf_handler(peer, handler, requests(), pb.Frame)
            return await self._decode(responses)

        started = time.monotonic()
        try:
            reply_header, reply, nbytes = await asyncio.wait_for(exchange(), timeout)
        except Exception as exc:
            # libp2p may not know where the peer is (it joined through another bootstrap node, or
            # came back on a new address): dial the addresses it announced, then try once more.
            # (Not when it answered with an error, or took the whole timeout: neither is about finding it.)
            addresses = self.addresses.get(peer.to_base58())
            if not addresses or isinstance(exc, (P2PHandlerError, asyncio.TimeoutError, codec.FrameError)):
                raise
            await self.p2p._client.connect(peer, [connect_address(a) for a in addresses])
            reply_header, reply, nbytes = await asyncio.wait_for(exchange(), timeout)
        self.counters.count_received(receive_kind, nbytes, reply_header.raw_bytes or fp32_equivalent(reply))
        if measure_link:
            self.link.observe(sent + nbytes, time.monotonic() - started)
        return reply_header, reply

    async def serve(self, name: str, handler: Handler, receive_kind: WireKind, send_kind: WireKind) -> None:
        """Register ``handler`` under ``name``: frames in, frames out; bad frames are refused and counted."""

        async def stream_handler(requests, context: P2PContext):
            caller = context.remote_id.to_base58()
            if self.admits is not None and not await self.admits(caller):
                await _drain(requests, REFUSAL_DRAIN_BYTES, REFUSAL_DRAIN_SECONDS)
                raise NotAMember(f"{caller} is not a member of this run: its data plane serves the peers the coordinator admitted")
            if self.dial_back and time.monotonic() - self._dialled_back.get(caller, -DIAL_BACK_QUIET) >= DIAL_BACK_QUIET:
                self._dialled_back[caller] = time.monotonic()
                task = asyncio.ensure_future(self._dial_directly(context.remote_id))
                self._dialling.add(task)
                task.add_done_callback(self._dialling.discard)
            if self.open_streams.get(caller, 0) >= self.max_streams_per_peer:
                self.frames_rejected += 1
                raise codec.FrameError(f"{caller} already sends {self.open_streams[caller]} frames to this peer at once "
                                       f"(at most {self.max_streams_per_peer}): refused")
            self.open_streams[caller] = self.open_streams.get(caller, 0) + 1
            try:  # counted until the answer is sent: a caller holds a stream open as long as its handler runs
                async for message in answer(requests, caller):
                    yield message
            finally:
                self.open_streams[caller] -= 1
                if not self.open_streams[caller]:
                    del self.open_streams[caller]

        async def answer(requests, caller: str):
            try:
                limit = self.limits[name]() if name in self.limits else self.max_frame_bytes
                header, tensors, nbytes = await asyncio.wait_for(self._decode(requests, limit), self.receive_timeout)
            except asyncio.TimeoutError:
                self.frames_rejected += 1
                log.warning("dropped a %s frame from %s: not received within %.0fs", receive_kind, caller, self.receive_timeout)
                raise codec.FrameError(f"the frame took longer than {self.receive_timeout:.0f}s to arrive: dropped") from None
            except codec.FrameError as exc:
                self.frames_rejected += 1
                log.warning("dropped a bad %s frame from %s: %s", receive_kind, caller, exc)
                raise
            self.counters.count_received(receive_kind, nbytes, header.raw_bytes or fp32_equivalent(tensors))
            try:
                reply_header, reply = await handler(header, tensors, PeerID.from_base58(caller))
            except codec.StaleFrame:
                raise  # well-formed, just late: the sender reroutes or drops it
            except codec.FrameError as exc:  # the handler's schema check refused what the frame holds
                self.frames_rejected += 1
                log.warning("dropped a bad %s frame from %s: %s", receive_kind, caller, exc)
                raise
            size = codec.frame_nbytes(reply)
            self.counters.count_sent(send_kind, size, reply_header.raw_bytes or fp32_equivalent(reply))
            for message in await _encode(reply_header, reply, size):
                yield message

        await self.p2p.add_protobuf_handler(name, stream_handler, pb.Frame, stream_input=True, stream_output=True)

    async def _dial_directly(self, peer: PeerID) -> None:
        """Give a caller that reached this (relayed) peer over the relay a direct connection to it, dialled from here.

        hivemind's p2pd starts two relay services, one with its flags' limits and one with libp2p's defaults
        (128 KiB each way and 2 minutes a connection); which one answers depends on start-up order. Under the
        defaults a larger frame over the relay is cut off ("empty stream"). libp2p dials only where no
        connection is left and then prefers the direct one, so this waits for the gap after a relayed
        connection closes."""
        key = peer.to_base58()
        announced = self.addresses.get(key)
        addresses = [connect_address(a) for a in announced or [] if not relayed_address(a)]
        if announced and not addresses:  # the caller is relayed too: there is no direct path to dial
            return
        try:
            for _ in range(DIAL_BACK_TRIES):
                links = await connection_addresses(self.p2p, peer)
                if not all(relayed_address(a) for a in links):
                    return
                if not links:
                    try:  # no addresses (a caller not in this peer's directory yet): those libp2p learnt from it
                        await self.p2p._client.connect(peer, addresses)
                    except Exception as exc:  # noqa: BLE001 - frames still go over the relay meanwhile
                        log.debug("could not dial %s directly: %s", key, exc)
                        return
                await asyncio.sleep(DIAL_BACK_EVERY)
        except Exception as exc:  # noqa: BLE001 - best effort; frames still go over the relay meanwhile
            log.debug("dialling %s back failed: %s", key, exc)

    async def _decode(self, messages, max_bytes: int | None = None) -> tuple[pb.FrameHeader, Tensors, int]:
        header, payload = await codec.receive_frame(messages, max_bytes=min(max_bytes or self.max_frame_bytes, self.max_frame_bytes))
        if len(payload) > OFF_LOOP_BYTES:
            return header, await asyncio.to_thread(codec.frame_tensors, header, payload), len(payload)
        return header, codec.frame_tensors(header, payload), len(payload)


async def _drain(messages, max_bytes: int, seconds: float) -> None:
    """Read and drop what a caller sends, until its stream ends, ``max_bytes`` have come, or ``seconds`` pass."""

    async def read() -> None:
        seen = 0
        async for message in messages:
            seen += message.ByteSize()
            if seen > max_bytes:
                return

    try:
        await asyncio.wait_for(read(), seconds)
    except Exception:  # noqa: BLE001 - the refusal that follows is what matters, not how the caller's stream ended
        pass


async def _encode(header: pb.FrameHeader, tensors: Mapping[str, torch.Tensor], nbytes: int) -> list[pb.Frame]:
    """The stream messages of a frame; a large one is built in a worker thread."""
    if nbytes > OFF_LOOP_BYTES:
        return await asyncio.to_thread(lambda: list(codec.encode_frame(header, tensors)))
    return list(codec.encode_frame(header, tensors))
