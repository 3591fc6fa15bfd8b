"""The pipeline data plane: stage directory in the DHT, next-hop choice, forward/backward frames.

Stage k sends a microbatch's activations straight to a peer of stage k+1 that it finds in
the DHT (SWARM's stochastic wiring: weighted by measured throughput, failing peers banned
with backoff) and gets the activation gradients back as the answer to the same call, so a
microbatch goes backward along the route it went forward. Nothing passes the coordinator.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import hivemind
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from proto import codec
from proto import hometrain_pb2 as pb

from .boundary_codec import BoundaryCodec, MissingEntries, Outgoing, unpack_extras
from .failures import FailureLog, StageFailed, describe
from .stage_runtime import StageRuntime, StaleRoundError
from .transport import FrameTransport, Tensors, fp32_equivalent

log = logging.getLogger(__name__)

FORWARD_HANDLER = "hometrain.forward"
INFER_HANDLER = "hometrain.infer"
RECORD_TTL = 30.0
MAX_ADDRESSES = 8   # multiaddrs kept per peer
TOLD_MAX_AGE = 15.0  # seconds the coordinator's list of a stage stands in for the DHT's records


def stage_key(run_id: str, stage: int) -> str:
    return f"hometrain:{run_id}:stage:{stage}"


def choose_next_hop(candidates: Mapping[str, float], banned: Mapping[str, float], now: float, rng: random.Random) -> str | None:
    """Pick a peer id, weighted by throughput; unmeasured peers weigh as the median (so they get measured).

    ``banned`` maps peer id -> time its ban ends. Returns None when no candidate is usable.
    Candidates are visited in sorted order so the same rng state gives the same choice.
    """
    usable = sorted(p for p in candidates if banned.get(p, 0.0) <= now)
    if not usable:
        return None
    measured = sorted(candidates[p] for p in usable if candidates[p] > 0)
    default = measured[len(measured) // 2] if measured else 1.0
    weights = [candidates[p] if candidates[p] > 0 else default for p in usable]
    return rng.choices(usable, weights=weights, k=1)[0]


class StageDirectory:
    """Per-stage membership records in the hivemind DHT: key per stage, subkey per peer, with expiry."""

    def __init__(self, dht: hivemind.DHT, run_id: str, addresses: dict[str, list[str]] | None = None) -> None:
        self.dht = dht
        self.run_id = run_id
        self.addresses = addresses if addresses is not None else {}  # filled with each record's "maddrs"
        self._cache: dict[int, tuple[float, dict[str, dict[str, Any]]]] = {}
        self._told: dict[int, tuple[float, dict[str, dict[str, Any]]]] = {}  # stage -> (when, records) from the coordinator

    def learn(self, stage: int, records: dict[str, dict[str, Any]]) -> None:
        """The coordinator's list of a stage's online peers (id -> throughput, maddrs). While recent,
        it is what ``replicas`` returns: the coordinator drops dead peers sooner than DHT records
        expire, and a peer whose DHT view is partitioned (after restarts) still finds the stage."""
        self._told[stage] = (time.monotonic(), records)
        for peer_id, info in records.items():
            self.remember(peer_id, info.get("maddrs"))

    def remember(self, peer_id: str, maddrs: Any) -> None:
        """Where ``peer_id`` can be dialled, if ``maddrs`` is a non-empty list of strings (the first few kept)."""
        if isinstance(maddrs, list) and maddrs and all(isinstance(m, str) for m in maddrs):
            self.addresses[peer_id] = maddrs[:MAX_ADDRESSES]

    async def announce(self, stage: int, peer_id: str, info: dict[str, Any]) -> None:
        await self.dht.store(stage_key(self.run_id, stage), info, get_dht_time() + RECORD_TTL, subkey=peer_id, return_future=True)

    async def withdraw(self, stage: int, peer_id: str) -> None:
        """Replace our record with a tombstone that routers skip (expiry cannot be shortened in a DHT)."""
        await self.dht.store(stage_key(self.run_id, stage), {"leaving": True}, get_dht_time() + RECORD_TTL, subkey=peer_id, return_future=True)

    async def replicas(self, stage: int, max_age: float = 1.0) -> dict[str, dict[str, Any]]:
        """Live records of ``stage`` (peer id -> info): the coordinator's recent list if there is one,
        else the DHT's records, cached for ``max_age`` seconds."""
        told = self._told.get(stage)
        if told and told[1] and time.monotonic() - told[0] < TOLD_MAX_AGE:
            return told[1]
        cached = self._cache.get(stage)
        if cached and time.monotonic() - cached[0] < max_age:
            return cached[1]
        found = await self.dht.get(stage_key(self.run_id, stage), latest=True, return_future=True)
        records: dict[str, dict[str, Any]] = {}
        if found is not None and isinstance(found.value, dict):
            for peer_id, item in found.value.items():
                info = item.value
                if isinstance(peer_id, str) and isinstance(info, dict) and not info.get("leaving"):
                    records[peer_id] = info
                    self.remember(peer_id, info.get("maddrs"))
        self._cache[stage] = (time.monotonic(), records)
        return records


@dataclass
class Router:
    """Chooses the next-stage peer for each hop; bans failures with exponential backoff."""

    directory: StageDirectory
    rng: random.Random = field(default_factory=random.Random)
    banned: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)

    async def choose(self, stage: int, exclude: set[str]) -> str | None:
        records = await self.directory.replicas(stage)
        candidates = {p: float(info.get("throughput", 0.0)) for p, info in records.items() if p not in exclude}
        return choose_next_hop(candidates, self.banned, time.monotonic(), self.rng)

    def ban(self, peer_id: str) -> float:
        self.strikes[peer_id] = self.strikes.get(peer_id, 0) + 1
        seconds = min(60.0, 2.0 ** (self.strikes[peer_id] - 1))
        self.banned[peer_id] = time.monotonic() + seconds
        return seconds

    def succeeded(self, peer_id: str) -> None:
        self.strikes.pop(peer_id, None)


class NoRouteError(RuntimeError):
    """No peer of the next stage could take the microbatch."""


class Pipeline:
    """Runs microbatches through this peer's stage and on to the next ones."""

    def __init__(
        self, runtime: StageRuntime, transport: FrameTransport, router: Router, boundary: BoundaryCodec, run_id: str, stage: int,
        hop_timeout: float, failures: FailureLog,
    ) -> None:
        self.runtime = runtime
        self.failures = failures
        self.boundary = boundary
        self.transport = transport
        self.router = router
        self.run_id = run_id
        self.stage = stage
        self.hop_timeout = hop_timeout
        self.max_attempts = 3

    async def start(self) -> None:
        # Registered whatever the stage: a peer may be moved to another stage later.
        await self.transport.serve(FORWARD_HANDLER, self._handle_forward, receive_kind="activations", send_kind="gradients")
        await self.transport.serve(INFER_HANDLER, self._handle_infer, receive_kind="activations", send_kind="activations")

    async def send_forward(
        self, header: pb.FrameHeader, payload: Outgoing | Mapping[str, torch.Tensor], handler: str = FORWARD_HANDLER, receive_kind: str = "gradients"
    ) -> tuple[pb.FrameHeader, Tensors]:
        """Send a frame to a peer of stage ``header.stage``; reroute to another replica on failure.

        An ``Outgoing`` payload is encoded for each destination (compressed activations); plain
        tensors go as they are. A receiver that lacks a sample's AQ-SGD entry says so and gets
        the frame again, those samples quantized directly. A receiver whose stage work failed
        (there or further on) answers with a ``StageFailure``: another replica is tried, without
        banning it (it is reachable), and if none succeeds that failure is raised as ``StageFailed``.
        """
        if isinstance(payload, Outgoing):
            header.raw_bytes = fp32_equivalent({"hidden": payload.hidden, **payload.extras})
        tried: set[str] = set()
        errors = []
        failed: StageFailed | None = None
        deadline = time.monotonic() + self.hop_timeout
        while len(tried) < self.max_attempts and time.monotonic() < deadline:
            target = await self.router.choose(header.stage, exclude=tried)
            if target is None:
                if tried:
                    break
                await asyncio.sleep(0.5)  # nobody announced yet (startup, or the stage is being refilled)
                continue
            tried.add(target)
            try:
                for _ in range(2):  # a second time only if the receiver lacked cache entries
                    tensors = self.boundary.encode_activations(target, payload) if isinstance(payload, Outgoing) else payload
                    reply_header, reply = await self.transport.call(
                        PeerID.from_base58(target), handler, header, tensors, "activations", receive_kind,
                        timeout=max(1.0, deadline - time.monotonic()), measure_link=False,
                    )
                    missing = json.loads(reply_header.json).get("missing") if reply_header.json else None
                    if not missing:
                        break
                    log.info("stage %d peer %s lacks cached activations of %d samples; sending them directly", header.stage, target[-8:], len(missing))
                    self.boundary.missing(target, payload, [int(m) for m in missing])
                else:
                    raise codec.FrameError("receiver still lacks cached activations after a direct re-send")
                if reply_header.HasField("failure"):
                    if isinstance(payload, Outgoing):
                        self.boundary.failed(target, payload)
                    failed = StageFailed(reply_header.failure)
                    errors.append(f"{target[-8:]}: {failed}")
                    continue
                if isinstance(payload, Outgoing):
                    self.boundary.acknowledged(target, payload)
                self.router.succeeded(target)
                return reply_header, reply
            except Exception as exc:
                if isinstance(payload, Outgoing):
                    self.boundary.failed(target, payload)
                seconds = self.router.ban(target)
                errors.append(f"{target[-8:]}: {type(exc).__name__}: {str(exc)[:200]}")
                log.warning("hop to stage %d peer %s failed (%s); banned %.0fs, rerouting", header.stage, target[-8:], errors[-1], seconds)
        if failed is not None:
            raise failed
        raise NoRouteError(f"no stage-{header.stage} peer took microbatch {header.microbatch} of round {header.round}: {'; '.join(errors) or 'none announced'}")

    def _check_header(self, header: pb.FrameHeader) -> None:
        if header.kind != pb.FORWARD or header.run_id != self.run_id or header.stage != self.stage or self.stage == 0:
            raise codec.FrameError(
                f"expected a FORWARD frame of run {self.run_id} for stage {self.stage}, "
                f"received {pb.FrameKind.Name(header.kind)} of run {header.run_id!r} for stage {header.stage}"
            )
        self.runtime.require_round(header.round, header.open_attempt)

    def _check_inputs(self, hidden: torch.Tensor, tensors: Tensors) -> None:
        if hidden.dim() != 3 or not hidden.is_floating_point():
            raise codec.FrameError("FORWARD frame needs a float tensor 'hidden' of shape [batch, seq, d_model]")
        batch, seq_len, width = hidden.shape
        config = self.runtime.model.config
        if width != config.n_embd or seq_len > config.n_positions or batch > 4096:
            raise codec.FrameError(f"'hidden' has shape {list(hidden.shape)}; this stage takes [batch, <= {config.n_positions}, {config.n_embd}]")
        codec.require_shape("target_ids", tensors.get("target_ids", torch.empty(0)), (batch, seq_len), torch.int64)
        codec.require_shape("loss_mask", tensors.get("loss_mask", torch.empty(0)), (batch, seq_len), torch.float32)
        codec.require_shape("prefix_lengths", tensors.get("prefix_lengths", torch.empty(0)), (batch,), torch.int64)
        if int(tensors["target_ids"].min()) < 0 or int(tensors["target_ids"].max()) >= config.vocab_size:
            raise codec.FrameError(f"target ids outside the vocabulary [0, {config.vocab_size})")
        codec.require_finite({"hidden": hidden, **tensors})

    async def _handle_infer(self, header: pb.FrameHeader, tensors: Tensors, sender: PeerID) -> tuple[pb.FrameHeader, Tensors]:
        """Forward-only pass for evaluation: this stage, then the rest of the pipeline; logits come back."""
        if header.kind != pb.INFER or header.run_id != self.run_id or header.stage != self.stage:
            raise codec.FrameError(f"expected an INFER frame of run {self.run_id} for stage {self.stage}, received {pb.FrameKind.Name(header.kind)} for stage {header.stage}")
        config = self.runtime.model.config
        inputs = tensors.get("input_ids" if self.stage == 0 else "hidden")
        prefix = tensors.get("prefix_lengths")
        if inputs is None or prefix is None or inputs.dim() != (2 if self.stage == 0 else 3) or inputs.shape[1] > config.n_positions:
            raise codec.FrameError(f"INFER frame for stage {self.stage} needs {'input_ids [batch, seq]' if self.stage == 0 else 'hidden [batch, seq, d_model]'} and prefix_lengths [batch]")
        codec.require_shape("prefix_lengths", prefix, (inputs.shape[0],), torch.int64)
        if self.stage == 0 and (inputs.dtype != torch.int64 or int(inputs.min()) < 0 or int(inputs.max()) >= config.vocab_size):
            raise codec.FrameError(f"input_ids must be int64 token ids in [0, {config.vocab_size})")
        if self.stage > 0 and (tuple(inputs.shape[2:]) != (config.n_embd,) or not inputs.is_floating_point()):
            raise codec.FrameError(f"hidden must be float [batch, seq, {config.n_embd}], received {list(inputs.shape)} {inputs.dtype}")
        codec.require_finite(tensors)
        outputs = await self.runtime.run(self.runtime.infer, inputs, prefix)
        if self.runtime.model.is_last:
            return pb.FrameHeader(kind=pb.LOGITS, run_id=self.run_id, stage=self.stage), {"logits": outputs}
        onward = pb.FrameHeader(kind=pb.INFER, run_id=self.run_id, stage=self.stage + 1)
        return await self.send_forward(onward, {"hidden": outputs, "prefix_lengths": prefix}, handler=INFER_HANDLER, receive_kind="activations")

    async def _handle_forward(self, header: pb.FrameHeader, tensors: Tensors, sender: PeerID) -> tuple[pb.FrameHeader, Tensors]:
        self._check_header(header)
        try:
            hidden = self.boundary.decode_activations(sender.to_base58(), list(header.sample_ids), tensors)
        except MissingEntries as exc:
            return pb.FrameHeader(kind=pb.BACKWARD, run_id=self.run_id, round=header.round, json=json.dumps({"missing": exc.sample_ids})), {}
        tensors = unpack_extras(tensors)
        self._check_inputs(hidden, tensors)
        try:
            loss_sum, tokens, grad = await self.run_stage(header, hidden, tensors)
        except (StageFailed, NoRouteError) as exc:  # said to the sender as a failure of this route, not of this hop
            failure = exc.failure if isinstance(exc, StageFailed) else pb.StageFailure(
                stage=self.stage, peer=self.failures.peer_id, error=describe(exc))
            return pb.FrameHeader(kind=pb.BACKWARD, run_id=self.run_id, round=header.round, microbatch=header.microbatch,
                                  stage=self.stage - 1, failure=failure), {}
        reply = pb.FrameHeader(kind=pb.BACKWARD, run_id=self.run_id, round=header.round, microbatch=header.microbatch,
                               stage=self.stage - 1, loss_sum=loss_sum, tokens=tokens, raw_bytes=fp32_equivalent({"grad": grad}))
        return reply, self.boundary.encode_gradient(grad)

    async def _compute(self, what: str, header: pb.FrameHeader, fn, *args):
        """This stage's own work on the compute thread; what it raises (but a refused frame) is a StageFailure."""
        try:
            return await self.runtime.run_timed(fn, *args)
        except (StaleRoundError, codec.FrameError):
            raise
        except Exception as exc:
            raise self.failures.record(self.stage, f"the {what} of microbatch {header.microbatch} of round {header.round}", exc,
                                       self.runtime.microbatches_done) from exc

    async def run_stage(self, header: pb.FrameHeader, inputs: torch.Tensor, batch: Tensors) -> tuple[float, int, torch.Tensor | None]:
        """Forward through this stage, on through the rest of the pipeline, and backward; returns (loss_sum, tokens, input grad)."""
        runtime = self.runtime
        runtime.in_flight += 1
        try:
            ctx = await self._compute("forward", header, runtime.forward, header.round, inputs, batch["prefix_lengths"], batch["loss_mask"],
                                      header.microbatch, header.open_attempt)
            if runtime.model.is_last:
                return await self._compute("loss and backward", header, runtime.loss_backward, ctx, batch["target_ids"], batch["loss_mask"])
            next_header = pb.FrameHeader(kind=pb.FORWARD, run_id=self.run_id, round=header.round, microbatch=header.microbatch,
                                         stage=self.stage + 1, sample_ids=header.sample_ids, open_attempt=header.open_attempt)
            extras = {name: batch[name] for name in ("target_ids", "loss_mask", "prefix_lengths")}
            outgoing = Outgoing(list(header.sample_ids), ctx.outputs.detach(), extras)
            reply_header, reply = await self.send_forward(next_header, outgoing)
            grad = self.boundary.decode_gradient(reply)
            if grad is None or tuple(grad.shape) != tuple(ctx.outputs.shape):
                raise codec.FrameError(f"stage {self.stage + 1} returned a gradient of shape {None if grad is None else list(grad.shape)}, expected {list(ctx.outputs.shape)}")
            codec.require_finite({"grad": grad})
            input_grad = await self._compute("backward", header, runtime.backward, ctx, grad)
            return reply_header.loss_sum, reply_header.tokens, input_grad
        finally:
            runtime.in_flight -= 1
