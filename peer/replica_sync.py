"""Replica gradient sync: a reduce-scatter + all-gather sum among one stage's replicas.

The flat gradient is cut into one part per member (members sorted by DHT id, the order the
coordinator gives). Member i receives part i from everyone, sums the parts in member order,
and sends the sum back to everyone. Every replica therefore ends with bit-identical sums,
so identical optimizer steps keep identical weights. Each member sends and receives
(k - 1) / k of the gradient twice, as in a ring or butterfly all-reduce.

With ``--sync-compression cocktail`` the members instead exchange compressed gradients
(``all_gather_compressed``): each sends its payload to every other member, and every member
decompresses and sums all payloads in member order.

Messages that arrive before their receiver asks for them wait in a mailbox keyed by
(round, stage, phase, part, sender); the sender is the authenticated libp2p id, not a field
the sender could forge.
"""

from __future__ import annotations

import asyncio
import math
import logging
from collections import defaultdict

import torch
from hivemind.p2p import PeerID

from proto import codec
from proto import hometrain_pb2 as pb

from .sync_compression import ErrorFeedbackCompressor
from .transport import FrameTransport, Tensors

log = logging.getLogger(__name__)

SYNC_HANDLER = "hometrain.sync"
Key = tuple[int, int, int, int, int, str]  # round, attempt, stage, frame kind, part, sender


class SyncError(RuntimeError):
    """The group could not finish averaging (a member vanished or timed out)."""


class ReplicaSync:
    """Serves incoming sync parts and runs the sum for this peer's group."""

    def __init__(self, transport: FrameTransport, run_id: str, my_id: str) -> None:
        self.transport = transport
        self.run_id = run_id
        self.my_id = my_id
        self._mailbox: dict[Key, asyncio.Future] = defaultdict(lambda: asyncio.get_running_loop().create_future())

    async def start(self) -> None:
        await self.transport.serve(SYNC_HANDLER, self._receive, receive_kind="sync", send_kind="control")

    async def _receive(self, header: pb.FrameHeader, tensors: Tensors, sender: PeerID) -> tuple[pb.FrameHeader, Tensors]:
        if header.run_id != self.run_id:
            raise codec.FrameError(f"sync frame of run {header.run_id!r}, this peer trains run {self.run_id!r}")
        if header.kind not in (pb.SYNC_REDUCE, pb.SYNC_GATHER):
            raise codec.FrameError(f"expected a SYNC_REDUCE or SYNC_GATHER frame, received {pb.FrameKind.Name(header.kind)}")
        part = tensors.get("part")
        if part is not None and (part.dtype != torch.float32 or part.dim() != 1):
            raise codec.FrameError("a plain sync frame carries one 1-D float32 tensor named 'part'")
        codec.require_finite(tensors)
        key = (header.round, header.attempt, header.stage, header.kind, header.part, sender.to_base58())
        future = self._mailbox[key]
        if not future.done():
            future.set_result(tensors)
        return pb.FrameHeader(kind=pb.ACK, run_id=self.run_id, round=header.round), {}

    async def _take_frame(self, key: Key, timeout: float) -> Tensors:
        try:
            return await asyncio.wait_for(asyncio.shield(self._mailbox[key]), timeout)
        except asyncio.TimeoutError:
            raise SyncError(f"no {pb.FrameKind.Name(key[3])} part {key[4]} from {key[5]} within {timeout:.0f}s") from None
        finally:
            self._mailbox.pop(key, None)

    async def _take(self, key: Key, numel: int, timeout: float) -> torch.Tensor:
        part = (await self._take_frame(key, timeout)).get("part")
        if part is None or part.numel() != numel:
            raise SyncError(f"part {key[4]} from {key[5]} has {None if part is None else part.numel()} values, expected {numel}")
        return part

    async def _send_frame(self, to: str, kind: int, round: int, attempt: int, stage: int, index: int, tensors: Tensors,
                          timeout: float, raw_bytes: int = 0) -> None:
        header = pb.FrameHeader(kind=kind, run_id=self.run_id, round=round, attempt=attempt, stage=stage, part=index, raw_bytes=raw_bytes)
        await self.transport.call(PeerID.from_base58(to), SYNC_HANDLER, header, tensors, "sync", "control", timeout)

    async def _send(self, to: str, kind: int, round: int, attempt: int, stage: int, index: int, part: torch.Tensor, timeout: float) -> None:
        await self._send_frame(to, kind, round, attempt, stage, index, {"part": part.contiguous()}, timeout)

    async def all_reduce_sum(self, flat: torch.Tensor, group: list[str], round: int, stage: int, timeout: float, attempt: int = 0) -> torch.Tensor:
        """Sum ``flat`` (1-D fp32, CPU) over ``group``; every member gets the same result."""
        if self.my_id not in group:
            raise SyncError(f"this peer ({self.my_id}) is not in the sync group {group}")
        if len(group) == 1:
            return flat
        parts = list(torch.tensor_split(flat, len(group)))
        me = group.index(self.my_id)
        others = [m for m in group if m != self.my_id]
        try:
            await asyncio.gather(*(self._send(m, pb.SYNC_REDUCE, round, attempt, stage, group.index(m), parts[group.index(m)], timeout) for m in others))
            received = {self.my_id: parts[me]}
            for m in others:
                received[m] = await self._take((round, attempt, stage, pb.SYNC_REDUCE, me, m), parts[me].numel(), timeout)
            reduced = torch.zeros_like(parts[me])
            for m in group:  # fixed order: the owner's sum is the only sum, so all replicas agree bit for bit
                reduced += received[m]
            await asyncio.gather(*(self._send(m, pb.SYNC_GATHER, round, attempt, stage, me, reduced, timeout) for m in others))
            gathered = [reduced if m == self.my_id else await self._take((round, attempt, stage, pb.SYNC_GATHER, i, m), parts[i].numel(), timeout)
                        for i, m in enumerate(group)]
        except SyncError:
            raise
        except Exception as exc:  # a member unreachable: the caller decides what to do with the round
            raise SyncError(f"sync with {others} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._forget_before(round)
        return torch.cat(gathered)

    async def all_gather_compressed(
        self, flat: torch.Tensor, group: list[str], round: int, stage: int, timeout: float, attempt: int,
        compressor: ErrorFeedbackCompressor, seed: int, weight: float = 1.0,
    ) -> torch.Tensor:
        """CocktailSGD-style: every member sends its compressed vector (error feedback kept locally)
        and its ``weight`` to every other; each decompresses all payloads and averages them,
        weighted, in member order, so all replicas get the same mean (the plain mean if every
        weight is 0). On failure the compressor's residual is restored, so a retry compresses
        the same vector again instead of losing or double-counting it."""
        if not weight >= 0:
            raise ValueError(f"sync weight must be >= 0, got {weight}")
        if self.my_id not in group:
            raise SyncError(f"this peer ({self.my_id}) is not in the sync group {group}")
        saved = compressor.error.clone()
        payload = {**compressor.compress(flat, seed), "weight": torch.tensor([float(weight)], dtype=torch.float64)}
        others = [m for m in group if m != self.my_id]
        me = group.index(self.my_id)
        config, numel = compressor.config, flat.numel()
        try:
            await asyncio.gather(*(self._send_frame(m, pb.SYNC_GATHER, round, attempt, stage, me, payload, timeout, raw_bytes=4 * numel)
                                   for m in others))
            parts, weights = [], []
            for i, m in enumerate(group):
                frame = dict(payload if m == self.my_id else await self._take_frame((round, attempt, stage, pb.SYNC_GATHER, i, m), timeout))
                w = frame.pop("weight", None)
                if w is None or w.dtype != torch.float64 or w.shape != (1,) or not w.item() >= 0 or not math.isfinite(w.item()):
                    raise SyncError(f"sync payload from {m} needs a finite float64 'weight' >= 0, got {None if w is None else w.tolist()}")
                try:
                    parts.append(ErrorFeedbackCompressor.decompress(frame, numel, seed, config, device=flat.device))
                except ValueError as exc:
                    raise SyncError(f"undecodable sync payload from {m}: {exc}") from None
                weights.append(w.item())
            norm = sum(weights)
            total = torch.zeros_like(flat)
            for part, w in zip(parts, weights):
                total += part * (w / norm if norm > 0 else 1 / len(group))
        except Exception as exc:
            compressor.error = saved
            if isinstance(exc, SyncError):
                raise
            raise SyncError(f"compressed sync with {others} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._forget_before(round)
        return total

    def _forget_before(self, round: int) -> None:
        for key in [k for k in self._mailbox if k[0] < round]:
            self._mailbox.pop(key).cancel()
