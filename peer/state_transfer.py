"""A stage's whole state handed from a live replica to a joiner, in parts of bounded size, each checked by hash.

A GPT-J-6B stage's weights and AdamW moments run to many gigabytes, more than any single frame
should hold. So the replica takes one *snapshot* (a CPU copy of one round's state, made under
the stage's state lock, so training goes on while it is sent) and lists it: every tensor's
name, dtype and shape, and the parts it is cut into. A part is a run of flat element ranges
(``Piece``) of at most ``PART_BYTES``; one large tensor (cocktail's flat anchor) spans several
parts. The joiner asks for the parts one by one, checks each against the sha256 in the listing,
retries a part that fails, and copies it into tensors allocated once. No frame carries more than
a part, so there is no cap on the state's size, and neither side holds more than one part's
bytes on top of the state itself.

The replica keeps a snapshot while joiners fetch from it (one snapshot serves all joiners of the
same round), drops it when the last says it is done or after ``SNAPSHOT_IDLE_SECONDS`` without a
request, and holds at most ``MAX_SNAPSHOTS``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import torch
from hivemind.p2p import PeerID

from proto import codec
from proto import hometrain_pb2 as pb
from proto.codec import WireKind

from .transport import FrameTransport, Tensors

log = logging.getLogger(__name__)

STATE_HANDLER = "hometrain.state"
PART_BYTES = 64 << 20           # a part's payload at most (well under any frame limit; a few seconds on a home link)
MAX_SNAPSHOTS = 2               # snapshots a replica holds at once (each is a copy of the stage's state)
PART_ATTEMPTS = 3               # tries per part before the joiner gives up on this replica
REQUEST_TIMEOUT = 60.0          # the listing (the snapshot is made first)
PART_TIMEOUT = 300.0            # one part (64 MiB in 300 s: a link of 1.8 Mbit/s)
SNAPSHOT_IDLE_SECONDS = PART_TIMEOUT + 60.0  # a snapshot nobody asked about for this long is dropped (a part may take PART_TIMEOUT)


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of the flattened tensor ``name``."""

    name: str
    start: int
    stop: int

    @property
    def key(self) -> str:
        return f"{self.name}@{self.start}"


def cut_into_parts(tensors: dict[str, torch.Tensor], part_bytes: int = PART_BYTES) -> list[list[Piece]]:
    """Cut tensors (in name order) into parts of at most ``part_bytes``; a tensor larger than that spans parts."""
    if part_bytes < 8:
        raise ValueError(f"a part of {part_bytes} bytes cannot hold one element")
    parts: list[list[Piece]] = [[]]
    room = part_bytes
    for name in sorted(tensors):
        tensor = tensors[name]
        size, numel = tensor.element_size(), tensor.numel()
        if numel == 0:
            parts[-1].append(Piece(name, 0, 0))
            continue
        start = 0
        while start < numel:
            fits = room // size
            if fits == 0:
                parts.append([])
                room = part_bytes
                continue
            stop = min(numel, start + fits)
            parts[-1].append(Piece(name, start, stop))
            room -= (stop - start) * size
            start = stop
    return [p for p in parts if p]


def part_tensors(tensors: dict[str, torch.Tensor], pieces: list[Piece]) -> dict[str, torch.Tensor]:
    """The flat slices a part carries, keyed ``name@start``."""
    return {p.key: tensors[p.name].reshape(-1)[p.start : p.stop] for p in pieces}


def part_digest(pieces: list[Piece], sliced: dict[str, torch.Tensor]) -> str:
    """sha256 over a part's bytes, piece by piece in order."""
    digest = hashlib.sha256()
    for p in pieces:
        digest.update(codec.tensor_bytes(sliced[p.key]))
    return digest.hexdigest()


@dataclass
class Snapshot:
    """One round's state of a stage, as listed to joiners and served part by part."""

    id: str
    stage: int
    next_round: int
    extras: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    parts: list[list[Piece]]
    digests: list[str]
    holders: set[str] = field(default_factory=set)
    touched: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def listing(self) -> dict[str, Any]:
        return {
            "snapshot": self.id,
            "extras": self.extras,
            "tensors": [[n, codec.DTYPE_NAMES[t.dtype], list(t.shape)] for n, t in sorted(self.tensors.items())],
            "parts": [{"pieces": [[p.name, p.start, p.stop] for p in pieces], "sha256": digest}
                      for pieces, digest in zip(self.parts, self.digests)],
        }


def take_snapshot(stage: int, next_round: int, tensors: dict[str, torch.Tensor], extras: dict[str, Any],
                  part_bytes: int = PART_BYTES) -> Snapshot:
    """Cut a copy of the state (CPU tensors nobody else writes) into parts and hash each (worker thread: it reads
    every byte once)."""
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    parts = cut_into_parts(tensors, part_bytes)
    digests = [part_digest(pieces, part_tensors(tensors, pieces)) for pieces in parts]
    return Snapshot(uuid.uuid4().hex, stage, next_round, extras, tensors, parts, digests)


class StateServer:
    """The replica's side: snapshots made on request, listed, and served part by part.

    ``current()`` names the stage this peer holds now (stage, next round; 0 while loading);
    ``export()`` copies its state under the state lock: (next round, tensors, extras)."""

    def __init__(self, transport: FrameTransport, run_id: str, current: Callable[[], tuple[int, int]],
                 export: Callable[[], Awaitable[tuple[int, dict[str, torch.Tensor], dict[str, Any]]]],
                 part_bytes: int = PART_BYTES) -> None:
        self.transport = transport
        self.run_id = run_id
        self.current = current
        self.export = export
        self.part_bytes = part_bytes
        self.snapshots: dict[str, Snapshot] = {}
        self._making = asyncio.Lock()
        self._expiry: asyncio.Task | None = None

    async def start(self) -> None:
        await self.transport.serve(STATE_HANDLER, self._handle, receive_kind=WireKind.CONTROL, send_kind=WireKind.STATE)
        self._expiry = asyncio.create_task(self._expire_idle())

    async def _expire_idle(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_IDLE_SECONDS / 4)
            self.expire()

    def expire(self) -> None:
        """Drop snapshots nobody asked about for SNAPSHOT_IDLE_SECONDS (a joiner that went away)."""
        now = time.monotonic()
        for sid, snap in list(self.snapshots.items()):
            if now - snap.touched > SNAPSHOT_IDLE_SECONDS:
                del self.snapshots[sid]
                log.info("dropped an idle stage %d state snapshot of round %d", snap.stage, snap.next_round - 1)

    async def _handle(self, header: pb.FrameHeader, tensors: Tensors, sender: PeerID) -> tuple[pb.FrameHeader, Tensors]:
        if header.kind != pb.STATE_REQUEST or header.run_id != self.run_id:
            raise codec.FrameError(f"expected a STATE_REQUEST of run {self.run_id}, received {pb.FrameKind.Name(header.kind)} of run {header.run_id!r}")
        try:
            request = json.loads(header.json or "{}")
        except json.JSONDecodeError as exc:
            raise codec.FrameError(f"a state request's JSON does not parse: {exc}") from None
        self.expire()
        who = sender.to_base58()
        if "snapshot" not in request:
            return await self._list(header.stage, who, int(request.get("at_least", -1)))
        snap = self.snapshots.get(str(request["snapshot"]))
        if snap is None or snap.stage != header.stage:
            raise codec.StaleFrame(f"state snapshot {request['snapshot']} is gone (idle over {SNAPSHOT_IDLE_SECONDS:.0f}s, or this peer "
                                   "restarted); ask for a new listing")
        snap.touched = time.monotonic()
        if request.get("done"):
            snap.holders.discard(who)
            if not snap.holders:
                del self.snapshots[snap.id]
            log.info("sent stage %d state of round %d (%.1f MiB in %d parts) to %s", snap.stage, snap.next_round - 1,
                     snap.nbytes / 2**20, len(snap.parts), who[-8:])
            return pb.FrameHeader(kind=pb.ACK, run_id=self.run_id, stage=snap.stage), {}
        index = request.get("part")
        if not isinstance(index, int) or not 0 <= index < len(snap.parts):
            raise codec.FrameError(f"part {index!r} asked for; snapshot {snap.id} has parts 0..{len(snap.parts) - 1}")
        header = pb.FrameHeader(kind=pb.STATE, run_id=self.run_id, stage=snap.stage, round=snap.next_round, part=index)
        return header, part_tensors(snap.tensors, snap.parts[index])

    async def _list(self, stage: int, who: str, at_least: int) -> tuple[pb.FrameHeader, Tensors]:
        held, next_round = self.current()
        if stage != held:
            raise codec.StaleFrame(f"this peer serves stage {held}; asked for stage {stage}")
        if next_round == 0:
            raise codec.StaleFrame("this peer is still loading its own weights")
        if next_round - 1 < at_least:  # older than the joiner's other source: say so before copying anything
            return pb.FrameHeader(kind=pb.STATE, run_id=self.run_id, stage=stage, round=next_round, json="{}"), {}
        async with self._making:  # two joiners at once share one snapshot
            snap = next((s for s in self.snapshots.values() if s.stage == stage and s.next_round == self.current()[1]), None)
            if snap is None:
                if len(self.snapshots) >= MAX_SNAPSHOTS:
                    raise codec.StaleFrame(f"this peer is already sending {MAX_SNAPSHOTS} snapshots of its state; try another replica")
                next_round, tensors, extras = await self.export()
                snap = await asyncio.to_thread(take_snapshot, stage, next_round, tensors, extras, self.part_bytes)
                self.snapshots[snap.id] = snap
        snap.holders.add(who)
        snap.touched = time.monotonic()
        header = pb.FrameHeader(kind=pb.STATE, run_id=self.run_id, stage=stage, round=snap.next_round, json=json.dumps(snap.listing()))
        return header, {}


@dataclass
class ReceivedState:
    next_round: int
    tensors: dict[str, torch.Tensor]
    extras: dict[str, Any]


class TooOld(Exception):
    """The replica's state is no newer than what the joiner could load otherwise."""


async def fetch_state(transport: FrameTransport, replica: str, run_id: str, stage: int, at_least: int = -1,
                      progress: Callable[[int, int], None] | None = None) -> ReceivedState:
    """The joiner's side: list the replica's snapshot, fetch and check every part, assemble the tensors.

    Raises TooOld (before any part moves) if the replica's round is older than ``at_least`` (the checkpoint's:
    one at that round is as good and saves the download); FrameError when a part keeps failing its hash or the
    listing does not add up."""
    peer = PeerID.from_base58(replica)

    async def ask(request: dict[str, Any], timeout: float) -> tuple[pb.FrameHeader, Tensors]:
        return await transport.call(peer, STATE_HANDLER, pb.FrameHeader(kind=pb.STATE_REQUEST, run_id=run_id, stage=stage, json=json.dumps(request)),
                                    {}, WireKind.CONTROL, WireKind.STATE, timeout=timeout)

    header, _ = await ask({"at_least": at_least}, REQUEST_TIMEOUT)
    if header.kind != pb.STATE:
        raise codec.FrameError(f"the replica answered a state request with {pb.FrameKind.Name(header.kind)}")
    listing = json.loads(header.json or "{}")
    if "snapshot" not in listing:
        raise TooOld(f"the replica holds round {header.round - 1}, older than round {at_least}")
    sid = listing["snapshot"]
    try:
        out = _allocate(listing["tensors"])
        parts = [([Piece(n, int(a), int(b)) for n, a, b in part["pieces"]], part["sha256"]) for part in listing["parts"]]
        total, got = sum(_part_bytes(out, pieces) for pieces, _ in parts), 0
        for index, (pieces, digest) in enumerate(parts):
            for attempt in range(PART_ATTEMPTS):
                try:
                    _, sliced = await ask({"snapshot": sid, "part": index}, PART_TIMEOUT)
                    _check_part(out, pieces, sliced, digest, index)
                    break
                except Exception as exc:  # a bad part, a dropped stream, a timeout: ask again
                    if attempt + 1 == PART_ATTEMPTS:
                        raise codec.FrameError(f"part {index} of the replica's state failed {PART_ATTEMPTS} times: {exc}") from None
                    log.warning("part %d of the replica's state failed (%s); asking again", index, exc)
            for p in pieces:
                out[p.name].view(-1)[p.start : p.stop].copy_(sliced[p.key])
            got += _part_bytes(out, pieces)
            if progress:
                progress(got, total)
    finally:  # done or given up: the replica can drop its copy now rather than when it goes idle
        try:
            await ask({"snapshot": sid, "done": True}, REQUEST_TIMEOUT)
        except Exception as exc:
            log.debug("could not tell the replica the transfer is over: %s", exc)
    return ReceivedState(header.round, out, listing.get("extras", {}))


def _allocate(described: list) -> dict[str, torch.Tensor]:
    out = {}
    for name, dtype, shape in described:
        if any(int(s) < 0 for s in shape):
            raise codec.FrameError(f"tensor {name} listed with shape {shape}")
        out[name] = torch.empty([int(s) for s in shape], dtype=codec.dtype_from_name(dtype))
    return out


def _part_bytes(out: dict[str, torch.Tensor], pieces: list[Piece]) -> int:
    return sum((p.stop - p.start) * out[p.name].element_size() for p in pieces if p.name in out)


def _check_part(out: dict[str, torch.Tensor], pieces: list[Piece], sliced: Tensors, digest: str, index: int) -> None:
    """A part holds exactly the listed pieces, in the listed dtypes, and hashes to the listed sha256."""
    if set(sliced) != {p.key for p in pieces}:
        raise codec.FrameError(f"part {index} carries {sorted(sliced)[:3]}, the listing says {[p.key for p in pieces][:3]}")
    for p in pieces:
        target = out.get(p.name)
        if target is None or not 0 <= p.start <= p.stop <= target.numel():
            raise codec.FrameError(f"part {index} names elements [{p.start}, {p.stop}) of {p.name}, which the listing does not hold")
        got = sliced[p.key]
        if got.dtype != target.dtype or got.numel() != p.stop - p.start:
            raise codec.FrameError(f"piece {p.key} is {got.numel()} {got.dtype}, the listing says {p.stop - p.start} {target.dtype}")
    actual = part_digest(pieces, sliced)
    if actual != digest:
        raise codec.FrameError(f"part {index} hashes to {actual[:12]}, the listing says {digest[:12]}")

