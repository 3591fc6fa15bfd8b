"""Replica sync: how the replicas of one stage agree on their weights each round, all of it here.

Three forms, by ``--sync-compression``:

- ``none`` (exact): the replicas sum the round's gradients with a reduce-scatter then an
  all-gather over P2P (member i sums part i from everyone, in member order, and sends the sum
  back), so every replica holds bit-identical sums; each divides by the round's token count and
  steps. That is the step one process would take on the whole batch.
- ``cocktail``: each replica first steps on its own gradient; then the replicas average their
  parameter deltas against the weights they last agreed on (the anchor), compressed
  (``peer.compression.cocktail``) and weighted by the tokens behind each, as CocktailSGD's code
  does. The anchor moves by that average, bit-identically on every replica. Each replica's own
  weights stay the anchor plus what its delta did not send, which goes out in a later delta:
  that is the error feedback, and it lives in the weights and nowhere else. A stage skips a
  round's sync with probability ``p_skip`` (the same draw on every replica) unless the round
  re-aligns (``resync_every``); the local steps of skipped rounds are part of the next delta.
- ``sparseloco`` (local steps, the DiLoCo family as SparseLoCo runs it): each replica steps on
  its own gradient every round (the inner steps); every ``sync_every`` rounds it folds its drift
  from the shared weights (the pseudo-gradient, anchor - weights) into an error-feedback
  accumulator decayed by ``sync_error_decay``, sends the accumulator's chunk-wise top-k at
  ``sync_bits`` (``peer.compression.sparseloco``) and keeps the rest of it. The shared weights
  move by ``outer_lr`` times the token-weighted mean of what the replicas sent (the outer step),
  and every replica continues from them; in between, replicas differ by design ("skipped").

Rounds 1..``sync_warmup_rounds`` of either compressed form sum gradients exactly, the anchor
following the weights. Every step, local or not, clips by one factor shared by all stages (the
``clip`` callback asks the coordinator, which sums every stage's squared norm): see
``peer.optimizer``.

With ``--robust-aggregation centered_clip`` (the default) a group of 3 or more replicas that
trained tokens combines their contributions with CenteredClip (``peer.robust``) instead of the
plain sum, so one bad replica (scaled, sign-flipped or random updates) moves the result by a
bounded amount. Exact: each replica sends part i of its own per-token gradient (its gradient
divided by its own loss tokens) with its token count; owner i clips part i from everyone and
sends the result back, which is the token-weighted mean when nobody is beyond the radius.
Cocktail and sparseloco: every replica clips the decoded payloads itself. Replicas whose
contribution lay beyond ``SUSPECT_EXCESS`` clip radii are the round's ``suspects`` (their DHT
ids go to the coordinator in the step report). A bad OWNER could send everyone a forged part:
each replica checks every part it gathers against its own contribution (``_check_gathered``:
within 2 x its own part's norm plus its whole contribution's norm, and a positive inner product
with its own part) and, if it is not, steps with that part zeroed and names the owner. Not
covered: a forged part that passes both checks on every honest replica (the owner saw every
input, so it can craft one: within the distance bound, not against any honest part) moves its
part by up to that bound, unnoticed; an owner sending
different parts to different replicas makes them disagree, which the checksum majority then
settles by reloads; and a stage where one bad replica is among only 2 that trained tokens in a
round is summed plainly (2 cannot outvote 1). Groups of 1 or 2, and ``off``, sum exactly as
before, bit for bit.

Checksums, checkpoints and hand-offs carry the agreed weights: the anchor under cocktail.
``StageSync`` holds the policy and the anchor and does all tensor arithmetic on the stage's
compute thread; ``SyncExchange`` only moves frames between replicas. If a group cannot finish
(a member vanished), nothing is applied: the coordinator starts another attempt without the
missing member, or has this replica reload.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import torch
from hivemind.p2p import P2PHandlerError, PeerID

from proto import NO_GRADIENT, codec
from proto import hometrain_pb2 as pb
from proto.codec import WireKind
from proto.manifest import parameter_checksum
from proto.run_config import TrainConfig
from proto.schedule import resyncs, skips_sync, sync_seed

from . import robust
from .compression import cocktail, sparseloco
from .compression.cocktail import SyncCompressionConfig
from .compression.sparseloco import SparseLoCoConfig
from .stage_runtime import StageRuntime
from .transport import FrameTransport, Tensors

log = logging.getLogger(__name__)

SYNC_HANDLER = "hometrain.sync"
ANCHOR = "anchor"  # the name the agreed weights travel under in a state hand-off
Key = tuple[int, int, int, int, int, str]  # round, attempt, stage, frame kind, part, sender
Compute = Callable[..., Awaitable[Any]]    # runs a function on the stage's compute thread
SEND_RETRY_FIRST, SEND_RETRY_MAX = 0.5, 4.0  # seconds between attempts to deliver a sync frame
PAYLOAD_NAMES = {"mask", "offsets", "meta", "values.codes", "values.scales", "values.meta", "weight"}
Clip = Callable[[int, int, float], Awaitable[float | None]]  # (round, attempt, squared norm) -> clip factor (None: skip the step)
MAILBOX_ROUNDS = 4        # frames are kept only for rounds within this many of the one this peer is in
MAILBOX_PER_SENDER = 8    # frames one sender may have waiting here, unasked for (a sync sends each member 2 per attempt)
ROBUST_MIN_GROUP = 3   # CenteredClip needs a majority of good replicas: with 2, neither can be told from a bad one
SUSPECT_EXCESS = 2.0   # a contribution farther than this many clip radii from the aggregate names its sender a suspect


class SyncError(RuntimeError):
    """The group could not finish averaging (a member vanished, timed out or sent garbage)."""


class SyncExchange:
    """Moves sync frames among a stage's replicas. Frames that arrive before their receiver asks for them
    wait in a mailbox keyed by (round, attempt, stage, kind, part, sender); the sender is the authenticated
    libp2p id, not a field the sender could forge. The mailbox is bounded: only rounds near ``current_round()``
    (0: not known yet, any round), and at most ``MAILBOX_PER_SENDER`` unasked-for frames per sender."""

    def __init__(self, transport: FrameTransport, run_id: str, my_id: str, current_round: Callable[[], int] = lambda: 0) -> None:
        self.transport = transport
        self.run_id = run_id
        self.my_id = my_id
        self.current_round = current_round
        self._mailbox: dict[Key, asyncio.Future] = defaultdict(lambda: asyncio.get_running_loop().create_future())

    async def start(self) -> None:
        await self.transport.serve(SYNC_HANDLER, self._receive, receive_kind=WireKind.SYNC, send_kind=WireKind.CONTROL)

    async def _receive(self, header: pb.FrameHeader, tensors: Tensors, sender: PeerID) -> tuple[pb.FrameHeader, Tensors]:
        """Accept a part or a payload of the right shape; its values are checked where they are summed."""
        if header.run_id != self.run_id:
            raise codec.FrameError(f"sync frame of run {header.run_id!r}, this peer trains run {self.run_id!r}")
        if header.kind not in (pb.SYNC_REDUCE, pb.SYNC_GATHER):
            raise codec.FrameError(f"expected a SYNC_REDUCE or SYNC_GATHER frame, received {pb.FrameKind.Name(header.kind)}")
        part = tensors.get("part")
        if part is not None:
            if not {"part"} <= set(tensors) <= {"part", "weight"} or part.dtype != torch.float32 or part.dim() != 1:
                raise codec.FrameError("a plain sync frame carries one 1-D float32 tensor named 'part' (and, robust, its 'weight')")
        elif not set(tensors) <= PAYLOAD_NAMES or "weight" not in tensors:
            raise codec.FrameError(f"a compressed sync frame carries {sorted(PAYLOAD_NAMES)}, received {sorted(tensors)}")
        now, who = self.current_round(), sender.to_base58()
        if now and abs(header.round - now) > MAILBOX_ROUNDS:
            raise codec.FrameError(f"sync frame for round {header.round}; this peer is in round {now} and keeps frames only "
                                   f"within {MAILBOX_ROUNDS} rounds of it")
        key = (header.round, header.attempt, header.stage, header.kind, header.part, who)
        if key not in self._mailbox and sum(1 for k, f in self._mailbox.items() if k[5] == who and f.done()) >= MAILBOX_PER_SENDER:
            raise codec.FrameError(f"{who} already has {MAILBOX_PER_SENDER} sync frames waiting here that nobody asked for: refused")
        future = self._mailbox[key]
        if not future.done():
            future.set_result(tensors)
        return pb.FrameHeader(kind=pb.ACK, run_id=self.run_id, round=header.round), {}

    async def _take(self, key: Key, timeout: float) -> Tensors:
        try:
            return await asyncio.wait_for(asyncio.shield(self._mailbox[key]), timeout)
        except asyncio.TimeoutError:
            raise SyncError(f"no {pb.FrameKind.Name(key[3])} part {key[4]} from {key[5]} within {timeout:.0f}s") from None
        finally:
            self._mailbox.pop(key, None)

    async def _send(self, to: str, kind: int, round: int, attempt: int, stage: int, part: int, tensors: Tensors,
                    timeout: float, raw_bytes: int = 0) -> None:
        """Deliver one frame, trying again within ``timeout`` when the stream breaks (a relayed link that is still
        being set up answers with an empty stream): the receiver keeps the first copy, so a resend is harmless.
        A refusal by the receiver's handler is final."""
        header = pb.FrameHeader(kind=kind, run_id=self.run_id, round=round, attempt=attempt, stage=stage, part=part, raw_bytes=raw_bytes)
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + timeout, SEND_RETRY_FIRST
        while True:
            try:
                await self.transport.call(PeerID.from_base58(to), SYNC_HANDLER, header, tensors, WireKind.SYNC, WireKind.CONTROL,
                                          max(0.1, deadline - loop.time()))
                return
            except (P2PHandlerError, asyncio.TimeoutError):
                raise
            except Exception as exc:
                if loop.time() + delay >= deadline:
                    raise
                log.info("sync frame to %s failed (%s: %s); sending it again in %.1fs", to, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, SEND_RETRY_MAX)

    async def all_reduce_sum(self, flat: torch.Tensor, group: list[str], round: int, stage: int, timeout: float, attempt: int,
                             compute: Compute) -> torch.Tensor:
        """Sum ``flat`` (1-D fp32, CPU) over ``group``; every member gets the same result. Each member sends
        and receives (k - 1) / k of the vector twice, as in a ring or butterfly all-reduce."""
        if self.my_id not in group:
            raise SyncError(f"this peer ({self.my_id}) is not in the sync group {group}")
        if len(group) == 1:
            return flat
        parts = list(torch.tensor_split(flat, len(group)))
        numel = parts[group.index(self.my_id)].numel()

        async def reduce(frames: list[Tensors]) -> tuple[torch.Tensor, None]:
            return await compute(_sum_in_order, [f["part"] for f in frames], numel, group), None

        gathered, _ = await self._reduce_then_gather([{"part": p.contiguous()} for p in parts], group, round, stage, timeout, attempt, reduce)
        return await compute(_concatenate, gathered, [p.numel() for p in parts], group)

    async def all_reduce_robust(self, contribution: torch.Tensor, weight: float, group: list[str], round: int, stage: int,
                                timeout: float, attempt: int, compute: Compute, tau: float, iterations: int) -> RobustReduction:
        """The robust twin of ``all_reduce_sum``: ``contribution`` is this replica's per-token gradient (1-D fp32, CPU),
        ``weight`` its loss tokens. Owner i combines part i of every member's contribution by CenteredClip (``_robust_part``)
        and sends it back; every part gathered from another owner is checked against this replica's own contribution
        (``_check_gathered``). Returns the per-token aggregate and the members this replica found suspect."""
        if self.my_id not in group:
            raise SyncError(f"this peer ({self.my_id}) is not in the sync group {group}")
        parts = list(torch.tensor_split(contribution, len(group)))
        numel = parts[group.index(self.my_id)].numel()
        claim = torch.tensor([float(weight)], dtype=torch.float64)

        async def reduce(frames: list[Tensors]) -> tuple[torch.Tensor, tuple[str, ...]]:
            return await compute(_robust_part, frames, numel, group, tau, iterations)

        gathered, suspects = await self._reduce_then_gather([{"part": p.contiguous(), "weight": claim} for p in parts], group, round,
                                                            stage, timeout, attempt, reduce)
        flat, forged = await compute(_check_gathered, gathered, parts, group, self.my_id, weight > 0)
        return RobustReduction(flat, tuple(sorted((set(suspects) | set(forged)) - {self.my_id})))

    async def _reduce_then_gather(self, outgoing: list[Tensors], group: list[str], round: int, stage: int, timeout: float, attempt: int,
                                  reduce: Callable[[list[Tensors]], Awaitable[tuple[torch.Tensor, Any]]]) -> tuple[list[torch.Tensor], Any]:
        """Member i gets frame i of every member's ``outgoing`` (its own included, in member order), reduces them to part i
        (``reduce``, which also returns what else it found), and sends that back to all: returns every reduced part, in
        member order, and what this member's ``reduce`` found."""
        me = group.index(self.my_id)
        others = [m for m in group if m != self.my_id]
        try:
            await asyncio.gather(*(self._send(m, pb.SYNC_REDUCE, round, attempt, stage, group.index(m), outgoing[group.index(m)], timeout)
                                   for m in others))
            received = [outgoing[me] if m == self.my_id else await self._take((round, attempt, stage, pb.SYNC_REDUCE, me, m), timeout)
                        for m in group]
            reduced, found = await reduce(received)
            await asyncio.gather(*(self._send(m, pb.SYNC_GATHER, round, attempt, stage, me, {"part": reduced}, timeout) for m in others))
            gathered = [reduced if m == self.my_id else (await self._take((round, attempt, stage, pb.SYNC_GATHER, i, m), timeout))["part"]
                        for i, m in enumerate(group)]
            return gathered, found
        except SyncError:
            raise
        except Exception as exc:  # a member unreachable: the caller decides what to do with the round
            raise SyncError(f"sync with {others} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._forget_before(round)

    async def all_gather(self, payload: Tensors, group: list[str], round: int, stage: int, timeout: float, attempt: int,
                         raw_bytes: int) -> list[Tensors]:
        """Send ``payload`` to every other member and return every member's payload, in member order."""
        if self.my_id not in group:
            raise SyncError(f"this peer ({self.my_id}) is not in the sync group {group}")
        others = [m for m in group if m != self.my_id]
        me = group.index(self.my_id)
        try:
            await asyncio.gather(*(self._send(m, pb.SYNC_GATHER, round, attempt, stage, me, payload, timeout, raw_bytes) for m in others))
            return [payload if m == self.my_id else await self._take((round, attempt, stage, pb.SYNC_GATHER, i, m), timeout)
                    for i, m in enumerate(group)]
        except SyncError:
            raise
        except Exception as exc:
            raise SyncError(f"compressed sync with {others} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._forget_before(round)

    def _forget_before(self, round: int) -> None:
        for key in [k for k in self._mailbox if k[0] < round]:
            self._mailbox.pop(key).cancel()


def _sum_in_order(parts: list[torch.Tensor], numel: int, group: list[str]) -> torch.Tensor:
    """The owner's sum of one part, in member order: the only sum, so all replicas agree bit for bit."""
    reduced = torch.zeros(numel, dtype=torch.float32)
    for member, part in zip(group, parts):
        if part.numel() != numel or not torch.isfinite(part).all():
            raise SyncError(f"part from {member} has {part.numel()} values (expected {numel}) or holds NaN/Inf")
        reduced += part
    return reduced


@dataclass(frozen=True)
class RobustReduction:
    """A robust exact sync's result on one replica: the per-token aggregate, and whom this replica found suspect."""

    mean: torch.Tensor
    suspects: tuple[str, ...]


def _claimed_weight(member: str, frame: Tensors) -> float:
    w = frame.get("weight")
    if w is None or w.dtype != torch.float64 or w.shape != (1,) or not w.item() >= 0 or not math.isfinite(w.item()):
        raise SyncError(f"sync frame from {member} needs a finite float64 'weight' >= 0, got {None if w is None else w.tolist()}")
    return w.item()


def _robust_mean(parts: list[torch.Tensor], weights: list[float], group: list[str], tau: float,
                 iterations: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """CenteredClip of the members' ``parts`` (``peer.robust.robust_mean``) and the members beyond ``SUSPECT_EXCESS`` radii;
    with fewer than ``ROBUST_MIN_GROUP`` members of positive weight, the plain weighted mean in member order (no suspects)."""
    if sum(1 for w in weights if w > 0) < ROBUST_MIN_GROUP:
        total = sum(weights)
        mean = torch.zeros(parts[0].numel(), dtype=torch.float32)
        for part, w in zip(parts, weights):
            mean += part * (w / total if total > 0 else 1 / len(parts))
        return mean, ()
    result = robust.robust_mean(parts, weights, tau, iterations)
    return result.aggregate, tuple(m for m, e in zip(group, result.excess) if e > SUSPECT_EXCESS)


def _robust_part(frames: list[Tensors], numel: int, group: list[str], tau: float, iterations: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The owner's robust aggregate of one part, from every member's (part, weight) in member order."""
    parts, weights = [], []
    for member, frame in zip(group, frames):
        part = frame["part"]
        if part.numel() != numel or not torch.isfinite(part).all():
            raise SyncError(f"part from {member} has {part.numel()} values (expected {numel}) or holds NaN/Inf")
        parts.append(part.float())
        weights.append(_claimed_weight(member, frame))
    return _robust_mean(parts, weights, group, tau, iterations)


def _check_gathered(gathered: list[torch.Tensor], own: list[torch.Tensor], group: list[str], me: str,
                    has_own: bool) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The gathered parts as one vector, after checking each part another owner sent against this replica's own
    contribution: an honest aggregate lies within 2 ||own part|| + ||own whole|| of it, and points along it (it holds this
    replica's own part with a positive pull, which on a part of any realistic size outweighs the products of independent
    noise). A part that fails either is taken as forged: it is zeroed (this round does not move it) and its owner named.
    A replica that trained no tokens has nothing to check against."""
    sizes = [p.numel() for p in own]
    for member, part, size in zip(group, gathered, sizes):
        if part.numel() != size or not torch.isfinite(part).all():
            raise SyncError(f"summed part from {member} has {part.numel()} values (expected {size}) or holds NaN/Inf")
    forged = []
    if has_own:
        whole = math.sqrt(sum(robust.squared_norm(p) for p in own))
        for i, (member, part) in enumerate(zip(group, gathered)):
            if member == me:
                continue
            distance = math.sqrt(robust.squared_norm(part.double() - own[i].double()))
            bound = 2 * math.sqrt(robust.squared_norm(own[i])) + whole
            along = float((part.double() * own[i].double()).sum())
            if distance > bound or along < 0:
                log.warning("part %d from its owner %s is %.3g from this replica's own contribution (at most %.3g for an honest "
                            "aggregate) and points %s it: it is not applied this round, and %s is reported as a suspect",
                            i, member, distance, bound, "away from" if along < 0 else "along", member)
                gathered[i] = torch.zeros(sizes[i], dtype=torch.float32)
                forged.append(member)
    return torch.cat(gathered), tuple(forged)


def _concatenate(parts: list[torch.Tensor], sizes: list[int], group: list[str]) -> torch.Tensor:
    for member, part, size in zip(group, parts, sizes):
        if part.numel() != size or not torch.isfinite(part).all():
            raise SyncError(f"summed part from {member} has {part.numel()} values (expected {size}) or holds NaN/Inf")
    return torch.cat(parts)


@dataclass(frozen=True)
class StepOutcome:
    """What a replica did with a round: synced (with whom), skipped its sync (diverged), or failed."""

    synced: bool
    diverged: bool
    how: str
    checksum: str
    error: str = ""
    overflow: bool = False  # the gradient was not finite (fp16): the step was skipped
    suspects: tuple[str, ...] = ()  # DHT ids of replicas whose contribution robust aggregation clipped beyond SUSPECT_EXCESS radii


class StageSync:
    """One stage's replica sync on this peer: the policy, the anchor (cocktail), the step."""

    state_names = (ANCHOR,)  # what of a hand-off is this sync's (``state``), not the runtime's

    def __init__(self, runtime: StageRuntime, exchange: SyncExchange, train: TrainConfig, stage: int, clip: Clip | None = None) -> None:
        self.runtime = runtime
        self.clip = clip                         # the global clip factor for this replica's squared norm (None: no clipping)
        self.exchange = exchange
        self.train = train
        self.stage = stage
        self.anchor: torch.Tensor | None = None  # cocktail: the weights all replicas last agreed on (flat fp32, CPU)
        self.stepped_round = 0                   # cocktail: the round whose local step is done (a retry must not step again)
        self.unsynced_tokens = 0                 # cocktail: loss tokens behind params - anchor (the weight of this replica's delta)
        self.loss_scale = 1.0                    # the round's (fp16)
        self.overflowed = False                  # this round's gradient was not finite: no step
        self.error: torch.Tensor | None = None   # sparseloco: the error-feedback accumulator of pseudo-gradients (flat fp32, CPU)
        self.sent_round: tuple[int, dict[str, torch.Tensor]] = (0, {})  # sparseloco: the round whose payload left the accumulator
        self.suspects: tuple[str, ...] = ()      # this round's: replicas robust aggregation found beyond SUSPECT_EXCESS radii

    # ------------------------------------------------------------ the agreed weights (compute thread)

    def agreed_weights(self) -> dict[str, torch.Tensor]:
        """The weights every replica shares: the anchor under cocktail, else the weights themselves."""
        if self.anchor is None:
            return self.runtime.weights()
        out, offset = {}, 0
        for name, p in self.runtime.trainable():
            out[name] = self.anchor[offset : offset + p.numel()].view(p.shape).to(p.dtype)
            offset += p.numel()
        return out

    def checksum(self) -> str:
        """sha256 of the agreed weights: equal on replicas that agree (each one's residual stays its own)."""
        return parameter_checksum(self.agreed_weights())

    def state(self) -> dict[str, torch.Tensor]:
        """What a joiner needs of this sync besides the weights: the anchor, under cocktail."""
        return {ANCHOR: self.anchor.clone()} if self.anchor is not None else {}

    def adopt(self, state: dict[str, torch.Tensor], next_round: int) -> None:
        """After the weights were loaded (from a replica, with its ``state()``, or from a checkpoint): agree on them."""
        anchor = state.get(ANCHOR)
        numel = sum(p.numel() for _, p in self.runtime.trainable())
        if anchor is not None and (anchor.dtype != torch.float32 or tuple(anchor.shape) != (numel,) or not torch.isfinite(anchor).all()):
            raise codec.FrameError(f"anchor must be {numel} finite float32 values, received {anchor.dtype} {list(anchor.shape)}")
        self.anchor, self.error = None, None
        if self.train.sync_compression != "none":
            self.anchor = anchor.clone() if anchor is not None else self.runtime.flat_params()
        self.unsynced_tokens = 0
        self.stepped_round = next_round - 1

    def _reset_anchor(self) -> None:
        self.anchor = self.runtime.flat_params()
        self.unsynced_tokens = 0
        self.error = None

    # ------------------------------------------------------------ one round

    async def step_round(self, round: int, group: list[str], tokens: int, attempt: int, open_attempt: int,
                         loss_scale: float = 1.0) -> StepOutcome:
        """Close ``round`` here, sync with ``group`` and step (gradients divided by ``loss_scale`` too, fp16's);
        says what happened and the checksum after it."""
        self.loss_scale, self.overflowed, self.suspects = loss_scale, False, ()
        runtime, train = self.runtime, self.train
        runtime.closed_round = round
        deadline = time.monotonic() + train.sync_timeout
        while runtime.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        async with runtime.state_lock:
            # Gradients of an earlier opening of the round (this stage saw none of the last one) are stale.
            await runtime.run(runtime.keep_only_attempt, open_attempt)
            synced, diverged, error = True, False, ""
            try:
                if train.compresses_sync(round):
                    local_steps = self._outer if train.sync_compression == "sparseloco" else self._delta
                    how = await local_steps(round, group, attempt)
                    diverged = how == "skipped"
                else:
                    how = await self._exact(round, group, tokens, attempt)
                runtime.finish_round(round)
            except SyncError as exc:
                synced, error, how = False, str(exc), "failed"
                log.warning("round %d: sync (attempt %d) failed: %s", round, attempt + 1, exc)
            checksum = await runtime.run(self.checksum)
        return StepOutcome(synced, diverged, how, checksum, error, self.overflowed, self.suspects)

    async def _step(self, round: int, attempt: int, summed: torch.Tensor, divisor: float) -> None:
        """The recipe's order (``peer.optimizer``): gradients in, one clip factor for every stage (the coordinator's,
        from all stages' squared norms), the round's step. A gradient that is not finite here or on any stage
        skips the step (``overflowed``)."""
        runtime = self.runtime
        squared = await runtime.run(runtime.load_gradients, summed, divisor)
        if self.clip is not None:
            factor = await self.clip(round, attempt, squared)
        else:
            factor = 1.0 if math.isfinite(squared) else None
        self.overflowed = not await runtime.run(runtime.apply_step, round, factor)

    async def _exact(self, round: int, group: list[str], tokens: int, attempt: int) -> str:
        """Sum gradients over the group, divide by the round's tokens, one step."""
        runtime = self.runtime
        flat = await runtime.run(lambda: runtime.flat_gradients().cpu())
        if self._robust(group):
            return await self._exact_robust(round, group, tokens, attempt, flat)
        summed = flat if len(group) == 1 else await self.exchange.all_reduce_sum(
            flat, group, round, self.stage, self.train.sync_timeout, attempt, runtime.run)
        if tokens > 0:
            await self._step(round, attempt, summed, tokens * self.loss_scale)
        else:
            await runtime.run(runtime.discard_gradients)
        if self.anchor is not None:  # the compressed syncs' warm-up: the exact weights are what the replicas agree on
            await runtime.run(self._reset_anchor)
        return f"group of {len(group)}, {tokens} tokens"

    def _robust(self, group: list[str]) -> bool:
        return self.train.robust_aggregation == "centered_clip" and len(group) >= ROBUST_MIN_GROUP

    async def _exact_robust(self, round: int, group: list[str], tokens: int, attempt: int, flat: torch.Tensor) -> str:
        """The exact sync under robust aggregation: the per-token gradients of the group, CenteredClipped part by part,
        then one step on that (already per token, so divided only by the loss scale)."""
        runtime, train = self.runtime, self.train
        local = runtime.round_tokens
        contribution = await runtime.run(lambda: flat.div_(local) if local > 0 else flat.zero_())
        reduction = await self.exchange.all_reduce_robust(contribution, float(local), group, round, self.stage, train.sync_timeout,
                                                          attempt, runtime.run, train.robust_tau, train.robust_iterations)
        self.suspects = reduction.suspects
        if self.suspects:
            log.warning("round %d: robust aggregation clipped %s far beyond the radius; reported as suspect", round, ", ".join(self.suspects))
        if tokens > 0:
            await self._step(round, attempt, reduction.mean, self.loss_scale)
        else:
            await runtime.run(runtime.discard_gradients)
        if self.anchor is not None:
            await runtime.run(self._reset_anchor)
        return f"robust group of {len(group)}, {tokens} tokens"

    async def _local_step(self, round: int, attempt: int) -> None:
        """Step on this replica's own gradient (once per round: a retried attempt must not step twice)."""
        runtime = self.runtime
        if self.stepped_round >= round:
            return
        local = runtime.round_tokens
        if local > 0:
            await self._step(round, attempt, await runtime.run(runtime.flat_gradients), local * self.loss_scale)
            if not self.overflowed:  # a skipped step adds nothing to the delta, so its tokens must not weight it
                self.unsynced_tokens += local
        else:
            if self.clip is not None:  # the other stages wait for every replica's norm: say there is none
                await self.clip(round, attempt, NO_GRADIENT)
            await runtime.run(runtime.discard_gradients)
        self.stepped_round = round

    async def _delta(self, round: int, group: list[str], attempt: int) -> str:
        """A local step, then (unless this round skips) the weighted average of compressed parameter deltas."""
        runtime, train = self.runtime, self.train
        await self._local_step(round, attempt)
        if len(group) == 1:
            await runtime.run(self._reset_anchor)
            return "alone"
        if skips_sync(train.seed, round, self.stage, train.p_skip) and not resyncs(round, train.resync_every):
            return "skipped"
        config = SyncCompressionConfig(train.sync_random_ratio, train.sync_topk_ratio, train.sync_bits)
        seed = sync_seed(train.seed, round, self.stage, attempt)
        payload, residual = await runtime.run(self._compress_delta, seed, config)
        payload["weight"] = torch.tensor([float(self.unsynced_tokens)], dtype=torch.float64)  # deltas weigh by the tokens behind them
        payloads = await self.exchange.all_gather(payload, group, round, self.stage, train.sync_timeout, attempt,
                                                  raw_bytes=4 * residual.numel())
        await runtime.run(self._apply_average, payloads, group, seed, config, residual)
        self.unsynced_tokens = 0
        return f"delta sync with {len(group)}"

    async def _outer(self, round: int, group: list[str], attempt: int) -> str:
        """sparseloco: a local (inner) step; every ``sync_every`` rounds, the outer step on the replicas' mean
        compressed pseudo-gradient, after which every replica holds the shared weights again."""
        runtime, train = self.runtime, self.train
        await self._local_step(round, attempt)
        if len(group) == 1:
            await runtime.run(self._reset_anchor)
            return "alone"
        if round % train.sync_every:
            return "skipped"
        config = SparseLoCoConfig(train.sync_density, train.sync_chunk, train.sync_bits)
        if self.sent_round[0] != round:  # a retried attempt resends what the first took from the accumulator
            self.sent_round = (round, await runtime.run(self._compress_pseudo_gradient, config))
        payload = dict(self.sent_round[1])
        payload["weight"] = torch.tensor([float(self.unsynced_tokens)], dtype=torch.float64)
        payloads = await self.exchange.all_gather(payload, group, round, self.stage, train.sync_timeout, attempt,
                                                  raw_bytes=4 * self.anchor.numel())
        await runtime.run(self._outer_step, payloads, group, config)
        self.unsynced_tokens = 0
        return f"outer step with {len(group)}"

    def _compress_pseudo_gradient(self, config: SparseLoCoConfig) -> dict[str, torch.Tensor]:
        """Fold this replica's drift since the shared weights into its error-feedback accumulator (decayed first);
        send the accumulator's chunk-wise top-k; keep the rest of it for later syncs."""
        if self.error is None:
            self.error = torch.zeros_like(self.anchor)
        self.error.mul_(self.train.sync_error_decay).add_(self.anchor - self.runtime.flat_params())
        payload, sent = sparseloco.compress(self.error, config)
        self.error.sub_(sent)
        return payload

    def _outer_step(self, payloads: list[dict[str, torch.Tensor]], group: list[str], config: SparseLoCoConfig) -> None:
        """The shared weights move by ``outer_lr`` times the token-weighted mean pseudo-gradient; every replica
        continues from them."""
        numel = self.anchor.numel()
        mean = self._weighted_mean(payloads, group, lambda frame: sparseloco.decompress(frame, numel, config), numel)
        self.anchor = self.anchor - self.train.outer_lr * mean
        self.runtime.load_flat_params(self.anchor)

    def _compress_delta(self, seed: int, config: SyncCompressionConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This replica's delta against the anchor, compressed; and what the payload leaves unsent (the residual)."""
        delta = self.runtime.flat_params() - self.anchor
        payload, sent = cocktail.compress(delta, seed, config)
        return payload, delta - sent

    def _apply_average(self, payloads: list[dict[str, torch.Tensor]], group: list[str], seed: int, config: SyncCompressionConfig,
                       residual: torch.Tensor) -> None:
        """Move the anchor by the token-weighted mean of the deltas (in member order); keep the residual in the weights."""
        numel = residual.numel()
        mean = self._weighted_mean(payloads, group, lambda frame: cocktail.decompress(frame, numel, seed, config), numel)
        self.anchor = self.anchor + mean
        self.runtime.load_flat_params(self.anchor + residual)

    def _weighted_mean(self, payloads: list[dict[str, torch.Tensor]], group: list[str],
                       decode: Callable[[dict[str, torch.Tensor]], torch.Tensor], numel: int) -> torch.Tensor:
        """The mean of the members' decoded payloads (in member order), each weighted by the tokens behind it; under robust
        aggregation (3 or more members), their CenteredClip, the members far beyond its radius kept as ``suspects``."""
        parts, weights = [], []
        for member, frame in zip(group, payloads):
            frame = dict(frame)
            w = frame.pop("weight", None)
            if w is None or w.dtype != torch.float64 or w.shape != (1,) or not w.item() >= 0 or not math.isfinite(w.item()):
                raise SyncError(f"sync payload from {member} needs a finite float64 'weight' >= 0, got {None if w is None else w.tolist()}")
            try:
                parts.append(decode(frame))
            except ValueError as exc:
                raise SyncError(f"undecodable sync payload from {member}: {exc}") from None
            weights.append(w.item())
        if self._robust(group):
            mean, suspects = _robust_mean([p.float() for p in parts], weights, group, self.train.robust_tau,
                                          self.train.robust_iterations)
            self.suspects = tuple(m for m in suspects if m != self.exchange.my_id)
            if self.suspects:
                log.warning("robust aggregation clipped %s far beyond the radius; reported as suspect", ", ".join(self.suspects))
            return mean
        norm = sum(weights)
        mean = torch.zeros(numel, dtype=torch.float32)
        for part, w in zip(parts, weights):
            mean += part * (w / norm if norm > 0 else 1 / len(group))
        return mean
