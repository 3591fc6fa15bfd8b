"""The pipeline data plane: forward frames to the next stage, gradient frames back along the same route.

Stage k sends a microbatch's activations straight to a peer of stage k+1 (found in the stage
directory, chosen by ``peer.routing``) and gets the activation gradients back as the answer to
the same call, so a microbatch goes backward along the route it went forward. Nothing passes
the coordinator. A forward reads recursively: ``run_stage`` computes this stage, calls
``send_forward``, whose frame lands in the next stage's ``_handle_forward``, which calls its own
``run_stage``, and so on to the last stage's loss. The boundary codec (compression, caches)
runs on the stage's compute thread, like the stage's own work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Mapping

import torch
from hivemind.p2p import PeerID
from transformers import GPTJConfig

from proto import codec
from proto import hometrain_pb2 as pb
from proto.codec import WireKind
from proto.run_config import TrainConfig

from .compression.boundary import BoundaryCodec, MissingEntries, Outgoing
from .directory import StageDirectory
from .failures import FailureLog, StageFailed, describe
from .routing import Router
from .stage_runtime import StageRuntime, StaleRoundError
from .transport import FrameTransport, Tensors, fp32_equivalent

log = logging.getLogger(__name__)

FORWARD_HANDLER = "hometrain.forward"
INFER_HANDLER = "hometrain.infer"
FRAME_SLACK = 1 << 20  # bytes a boundary frame may carry beyond its activations (header, ids, AQ-SGD scales)


def infer_batch_limit(train: TrainConfig) -> int:
    """Most samples one INFER frame may hold: a stage computes it in one go."""
    return max(train.micro_batch_size, 8)


def boundary_frame_limit(train: TrainConfig, config: GPTJConfig) -> int:
    """The largest FORWARD or INFER frame a stage takes: fp32 activations of the larger of a microbatch and an INFER batch."""
    return 4 * infer_batch_limit(train) * max(train.seq_len, config.n_positions) * config.n_embd + FRAME_SLACK


MAX_ROUTE = 64  # DHT ids a route (or an audit's list of peers to avoid) may name: far more stages than a model has


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise codec.FrameError(f"the frame's JSON does not parse: {exc}") from None
    if not isinstance(value, dict):
        raise codec.FrameError(f"the frame's JSON must be an object, received {type(value).__name__}")
    return value


def route_of(reply: pb.FrameHeader) -> list[str]:
    """The DHT ids of the peers a reply says it came through, in stage order ([] if it names none, or not plausibly)."""
    try:
        route = json.loads(reply.json).get("route", []) if reply.json else []
    except (json.JSONDecodeError, AttributeError):
        return []
    if not isinstance(route, list) or len(route) > MAX_ROUTE or not all(isinstance(p, str) and len(p) <= 128 for p in route):
        return []
    return route


class NoRouteError(RuntimeError):
    """No peer of the next stage could take the microbatch."""


class Pipeline:
    """Runs microbatches through this peer's stage and on to the next ones."""

    def __init__(
        self, runtime: StageRuntime, transport: FrameTransport, directory: StageDirectory, router: Router, boundary: BoundaryCodec,
        run_id: str, stage: int, hop_timeout: float, failures: FailureLog,
    ) -> None:
        self.runtime = runtime
        self.failures = failures
        self.boundary = boundary
        self.transport = transport
        self.directory = directory
        self.router = router
        self.run_id = run_id
        self.stage = stage
        self.hop_timeout = hop_timeout
        self.max_attempts = 3

    async def start(self) -> None:
        # Registered whatever the stage: a peer may be moved to another stage later.
        await self.transport.serve(FORWARD_HANDLER, self._handle_forward, receive_kind=WireKind.ACTIVATIONS, send_kind=WireKind.GRADIENTS)
        await self.transport.serve(INFER_HANDLER, self._handle_infer, receive_kind=WireKind.INFERENCE, send_kind=WireKind.INFERENCE)

    async def send_forward(
        self, header: pb.FrameHeader, payload: Outgoing | Mapping[str, torch.Tensor], handler: str = FORWARD_HANDLER,
        receive_kind: WireKind = WireKind.GRADIENTS, avoid: frozenset[str] = frozenset(),
    ) -> tuple[pb.FrameHeader, Tensors]:
        """Send a frame to a peer of stage ``header.stage``; reroute to another replica on failure. Peers in ``avoid``
        are taken only when the stage has no other (an audit's second route keeps off the first one's peers).

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
            records = await self.directory.replicas(header.stage)
            candidates = {p: r.throughput for p, r in records.items() if p not in tried}
            target = self.router.choose({p: t for p, t in candidates.items() if p not in avoid} or candidates,
                                        {p for p, r in records.items() if r.relayed})
            if target is None:
                if tried:
                    break
                await asyncio.sleep(0.5)  # nobody announced yet (startup, or the stage is being refilled)
                continue
            tried.add(target)
            codec_ = self.boundary
            try:
                for _ in range(2):  # a second time only if the receiver lacked cache entries
                    tensors = await self.runtime.run(codec_.encode_activations, target, payload) if isinstance(payload, Outgoing) else payload
                    reply_header, reply = await self.transport.call(
                        PeerID.from_base58(target), handler, header, tensors,
                        WireKind.INFERENCE if handler == INFER_HANDLER else WireKind.ACTIVATIONS, receive_kind,
                        timeout=max(1.0, deadline - time.monotonic()), measure_link=False,
                    )
                    missing = json.loads(reply_header.json).get("missing") if reply_header.json else None
                    if not missing:
                        break
                    log.info("stage %d peer %s lacks cached activations of %d samples; sending them directly", header.stage, target[-8:], len(missing))
                    await self.runtime.run(codec_.missing, target, payload, [int(m) for m in missing])
                else:
                    raise codec.FrameError("receiver still lacks cached activations after a direct re-send")
                if reply_header.HasField("failure"):
                    if isinstance(payload, Outgoing):
                        await self.runtime.run(codec_.failed, target, payload)
                    failed = StageFailed(reply_header.failure)
                    errors.append(f"{target[-8:]}: {failed}")
                    continue
                if isinstance(payload, Outgoing):
                    await self.runtime.run(codec_.acknowledged, target, payload)
                self.router.succeeded(target)
                return reply_header, reply
            except Exception as exc:
                if isinstance(payload, Outgoing):
                    await self.runtime.run(codec_.failed, target, payload)
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

    async def _handle_infer(self, header: pb.FrameHeader, tensors: Tensors, sender: PeerID) -> tuple[pb.FrameHeader, Tensors]:
        """Forward-only pass for evaluation: this stage, then the rest of the pipeline; logits come back."""
        if header.kind != pb.INFER or header.run_id != self.run_id or header.stage != self.stage:
            raise codec.FrameError(f"expected an INFER frame of run {self.run_id} for stage {self.stage}, received {pb.FrameKind.Name(header.kind)} for stage {header.stage}")
        config = self.runtime.model.config
        inputs = tensors.get("input_ids" if self.stage == 0 else "hidden")
        prefix = tensors.get("prefix_lengths")
        if inputs is None or prefix is None or inputs.dim() != (2 if self.stage == 0 else 3) or inputs.shape[1] > config.n_positions:
            raise codec.FrameError(f"INFER frame for stage {self.stage} needs {'input_ids [batch, seq]' if self.stage == 0 else 'hidden [batch, seq, d_model]'} and prefix_lengths [batch]")
        if inputs.shape[0] > infer_batch_limit(self.runtime.train):
            raise codec.FrameError(f"INFER frame of {inputs.shape[0]} samples: this stage answers at most {infer_batch_limit(self.runtime.train)} at once")
        codec.require_shape("prefix_lengths", prefix, (inputs.shape[0],), torch.int64)
        if self.stage == 0 and (inputs.dtype != torch.int64 or int(inputs.min()) < 0 or int(inputs.max()) >= config.vocab_size):
            raise codec.FrameError(f"input_ids must be int64 token ids in [0, {config.vocab_size})")
        if self.stage > 0 and (tuple(inputs.shape[2:]) != (config.n_embd,) or not inputs.is_floating_point()):
            raise codec.FrameError(f"hidden must be float [batch, seq, {config.n_embd}], received {list(inputs.shape)} {inputs.dtype}")
        codec.require_finite(tensors)
        targets = self._audit_targets(tensors, tuple(inputs.shape[:2]))
        request = _json_object(header.json)
        avoid = frozenset(str(p) for p in request.get("avoid", [])[:MAX_ROUTE] if isinstance(p, str))
        if header.round:  # an audit: this round's weights, before anyone steps (else the comparison would mean nothing)
            self.runtime.require_round(header.round, header.open_attempt)
        me = [self.failures.peer_id]
        if targets and self.runtime.model.is_last:
            loss_sum, tokens = await self.runtime.run(self.runtime.audit_loss, inputs, prefix, targets["target_ids"], targets["loss_mask"])
            return pb.FrameHeader(kind=pb.LOGITS, run_id=self.run_id, stage=self.stage, round=header.round, loss_sum=loss_sum,
                                  tokens=tokens, json=json.dumps({"route": me})), {}
        outputs = await self.runtime.run(self.runtime.infer, inputs, prefix)
        if self.runtime.model.is_last:
            return pb.FrameHeader(kind=pb.LOGITS, run_id=self.run_id, stage=self.stage, json=json.dumps({"route": me})), {"logits": outputs}
        onward = pb.FrameHeader(kind=pb.INFER, run_id=self.run_id, stage=self.stage + 1, round=header.round, open_attempt=header.open_attempt,
                                json=json.dumps({"avoid": sorted(avoid)}))
        reply_header, reply = await self.send_forward(onward, {"hidden": outputs, "prefix_lengths": prefix, **targets}, handler=INFER_HANDLER,
                                                      receive_kind=WireKind.INFERENCE, avoid=avoid)
        reply_header.json = json.dumps({"route": me + route_of(reply_header)})
        return reply_header, reply

    async def rerun(self, header: pb.FrameHeader, tensors: Tensors, avoid: frozenset[str]) -> pb.FrameHeader:
        """Stage 0: an audit's forward-only run (INFER with targets) along peers not in ``avoid`` where a stage has others;
        starts at another stage-0 replica if there is one, else here. Returns the last stage's answer (loss, route)."""
        header.json = json.dumps({"avoid": sorted(avoid)})
        others = [p for p in await self.directory.replicas(0) if p not in avoid]
        if others:
            reply, _ = await self.send_forward(header, tensors, handler=INFER_HANDLER, receive_kind=WireKind.INFERENCE, avoid=avoid)
        else:
            reply, _ = await self._handle_infer(header, tensors, PeerID.from_base58(self.failures.peer_id))
        if reply.kind != pb.LOGITS:
            raise codec.FrameError(f"an audit's run answered {pb.FrameKind.Name(reply.kind)}, expected LOGITS with the loss")
        return reply

    def _audit_targets(self, tensors: Tensors, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """An audit's INFER frame carries the microbatch's targets and loss mask (the last stage answers with the loss)."""
        if "target_ids" not in tensors and "loss_mask" not in tensors:
            return {}
        targets, mask = tensors.get("target_ids"), tensors.get("loss_mask")
        if targets is None or mask is None:
            raise codec.FrameError("an audit's INFER frame carries both target_ids and loss_mask")
        codec.require_shape("target_ids", targets, batch_shape, torch.int64)
        codec.require_shape("loss_mask", mask, batch_shape, torch.float32)
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.runtime.model.config.vocab_size):
            raise codec.FrameError(f"target_ids must be token ids in [0, {self.runtime.model.config.vocab_size})")
        return {"target_ids": targets, "loss_mask": mask}

    async def _handle_forward(self, header: pb.FrameHeader, tensors: Tensors, sender: PeerID) -> tuple[pb.FrameHeader, Tensors]:
        self._check_header(header)
        try:
            hidden, tensors = await self.runtime.run(self.boundary.decode_forward, sender.to_base58(), header, tensors, self.runtime.model.config)
        except MissingEntries as exc:
            return pb.FrameHeader(kind=pb.BACKWARD, run_id=self.run_id, round=header.round, json=json.dumps({"missing": exc.sample_ids})), {}
        try:
            loss_sum, tokens, grad, route = await self.run_stage(header, hidden, tensors)
        except (StageFailed, NoRouteError) as exc:  # said to the sender as a failure of this route, not of this hop
            failure = exc.failure if isinstance(exc, StageFailed) else pb.StageFailure(
                stage=self.stage, peer=self.failures.peer_id, error=describe(exc))
            return pb.FrameHeader(kind=pb.BACKWARD, run_id=self.run_id, round=header.round, microbatch=header.microbatch,
                                  stage=self.stage - 1, failure=failure), {}
        reply = pb.FrameHeader(kind=pb.BACKWARD, run_id=self.run_id, round=header.round, microbatch=header.microbatch,
                               stage=self.stage - 1, loss_sum=loss_sum, tokens=tokens, raw_bytes=fp32_equivalent({"grad": grad}),
                               json=json.dumps({"route": [self.failures.peer_id] + route}))
        return reply, await self.runtime.run(self.boundary.encode_gradient, grad)

    async def _compute(self, what: str, header: pb.FrameHeader, fn, *args):
        """This stage's own work on the compute thread; what it raises (but a refused frame) is a StageFailure."""
        try:
            return await self.runtime.run_timed(fn, *args)
        except (StaleRoundError, codec.FrameError):
            raise
        except Exception as exc:
            raise self.failures.record(self.stage, f"the {what} of microbatch {header.microbatch} of round {header.round}", exc,
                                       self.runtime.microbatches_done) from exc

    def _decode_gradient(self, reply: Tensors, shape: tuple[int, ...], loss_scaled: bool) -> torch.Tensor:
        """The activation gradient a BACKWARD frame carries, checked against this stage's output (compute thread).

        Under fp16's loss scale (``loss_scaled``) a gradient that is not finite is an overflow downstream, not a bad
        frame: it goes through the backward, so this stage's gradient is not finite either and its step is skipped
        (and reported as an overflow), as the stage that overflowed skips its own."""
        grad = self.boundary.decode_gradient(reply)
        if grad is None or tuple(grad.shape) != shape:
            raise codec.FrameError(f"stage {self.stage + 1} returned a gradient of shape {None if grad is None else list(grad.shape)}, expected {list(shape)}")
        if not loss_scaled:
            codec.require_finite({"grad": grad})
        return grad

    async def run_stage(self, header: pb.FrameHeader, inputs: torch.Tensor,
                        batch: Tensors) -> tuple[float, int, torch.Tensor | None, list[str]]:
        """Forward through this stage, on through the rest of the pipeline, and backward; returns (loss_sum, tokens,
        input grad, the DHT ids of the later stages' peers the microbatch went through, as they said)."""
        runtime = self.runtime
        runtime.in_flight += 1
        try:
            ctx = await self._compute("forward", header, runtime.forward, header.round, inputs, batch["prefix_lengths"], batch["loss_mask"],
                                      header.microbatch, header.open_attempt)
            if runtime.model.is_last:
                loss_sum, tokens, grad = await self._compute("loss and backward", header, runtime.loss_backward, ctx, batch["target_ids"],
                                                             batch["loss_mask"], header.loss_scale or 1.0)
                return loss_sum, tokens, grad, []
            next_header = pb.FrameHeader(kind=pb.FORWARD, run_id=self.run_id, round=header.round, microbatch=header.microbatch,
                                         stage=self.stage + 1, sample_ids=header.sample_ids, open_attempt=header.open_attempt,
                                         loss_scale=header.loss_scale)
            extras = {name: batch[name] for name in ("target_ids", "loss_mask", "prefix_lengths")}
            outgoing = Outgoing(list(header.sample_ids), ctx.outputs.detach(), extras)
            reply_header, reply = await self.send_forward(next_header, outgoing)
            grad = await runtime.run(self._decode_gradient, reply, tuple(ctx.outputs.shape), header.loss_scale > 1)
            input_grad = await self._compute("backward", header, runtime.backward, ctx, grad)
            return reply_header.loss_sum, reply_header.tokens, input_grad, route_of(reply_header)
        finally:
            runtime.in_flight -= 1
