"""A stage's training state on this peer: weights, optimizer, accumulated gradients, round.

Forward and backward of microbatches accumulate summed-loss gradients for the round in
progress; at SYNC the replicas combine them (``peer.replica_sync``) and the optimizer steps
(``peer.optimizer``). All torch work of the stage runs on its one compute thread (``run``), so
gradient accumulation, compression and the step never interleave, and the asyncio loop that
answers heartbeats and frames never waits on them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from transformers import GPTJConfig

from proto.codec import FrameError, StaleFrame
from proto.run_config import TrainConfig

from .lora import add_adapters, quantize_base, seed_adapters
from .optimizer import MOMENT_KEYS, STATE_PREFIX, StageOptimizer, state_key
from .stage_model import StageModel, seeded_init, summed_token_loss

log = logging.getLogger(__name__)

T = TypeVar("T")
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --compute-dtype -> autocast dtype


@dataclass
class ForwardContext:
    """What a stage keeps of a microbatch between its forward and its backward."""

    round: int
    inputs: torch.Tensor
    outputs: torch.Tensor
    tokens: int          # loss tokens of the microbatch
    microbatch: int = -1  # its index in the round (-1: not tracked)
    attempt: int = 0     # the opening of the round it belongs to


class StaleRoundError(StaleFrame):
    """A frame for a round this stage is not accumulating (closed, or weights not ready)."""


class StageRuntime:
    """Owns one stage's model and optimizer; every method that touches tensors runs on the compute thread."""

    def __init__(self, model_config: GPTJConfig, train: TrainConfig, layer_start: int, layer_end: int, device: torch.device) -> None:
        self.train = train
        self.device = device
        # Weights, gradients and optimizer state stay fp32 (the master copy); bf16 and fp16 are autocast's.
        self.autocast = AUTOCAST[train.compute_dtype]
        self.lora = train.lora_rank > 0                # adapters on a frozen base: they are all that trains and travels
        # A LoRA base is built and quantised on the host, then moved: the device never holds it in fp32.
        with torch.device("cpu" if self.lora else device):
            self.model = StageModel(model_config, layer_start, layer_end, checkpointing=train.activation_checkpointing)
        self.model.train()
        self.base_names = [name for name, _ in self.model.named_parameters()]  # the stage's tensors in a full checkpoint
        self.base_loaded = not self.lora
        self.optimizer = StageOptimizer(self.trainable(), train)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.next_round = 0            # round the weights are ready to accumulate; 0 until loaded
        self.closed_round = 0          # frames of rounds <= this are refused (SYNC began)
        self.open_attempt = 0          # which opening of next_round the accumulated gradients belong to
        self.loads = 0
        self.in_flight = 0             # microbatches between forward and backward on this stage
        self.microbatches_done = 0
        self.round_tokens = 0          # loss tokens this replica trained in the round (its local gradient divisor)
        self.accumulated: set[tuple[int, int]] = set()  # (round, microbatch) whose parameter gradients are accumulated
        self.samples_done = 0
        self.compute_seconds = 0.0     # time in forward/backward: throughput = samples_done / compute_seconds
        self.state_lock = asyncio.Lock()  # held while stepping and while serving the state to a joiner

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run_timed(self, fn: Callable[..., T], *args: Any) -> T:
        """Run training compute on the compute thread and count its time toward the stage's throughput."""

        def timed() -> T:
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.compute_seconds += time.perf_counter() - started

        return await self.run(timed)

    @property
    def throughput(self) -> float:
        """Samples per second of compute this device sustains on this stage (0 until measured).

        Time waiting for other peers is excluded: this measures what the peer could do, which is
        what stage assignment needs, not what the pipeline happened to feed it."""
        return self.samples_done / self.compute_seconds if self.compute_seconds > 0 else 0.0

    # ------------------------------------------------------------ microbatches

    def accepts(self, round: int, attempt: int | None = None) -> bool:
        """Whether frames of ``round`` (and of its opening ``attempt``, if given) are accumulated now."""
        return (self.next_round > 0 and round == self.next_round and round > self.closed_round
                and (attempt is None or attempt >= self.open_attempt))

    def require_round(self, round: int, attempt: int | None = None) -> None:
        if not self.accepts(round, attempt):
            accumulating = f"{self.next_round} (opening {self.open_attempt})" if self.next_round > self.closed_round else "none"
            raise StaleRoundError(f"stage is accumulating round {accumulating}, received a frame of round {round}"
                                  + (f" (opening {attempt})" if attempt is not None else ""))

    def forward(self, round: int, inputs: torch.Tensor, prefix_lengths: torch.Tensor, loss_mask: torch.Tensor,
                microbatch: int = -1, attempt: int = 0) -> ForwardContext:
        """Forward with autograd; the input is a leaf so its gradient can be sent back.

        The first frame of a later opening of the round (the coordinator opened it again after it
        trained nothing) drops what earlier openings left: their microbatches were never counted."""
        self.require_round(round, attempt)
        if attempt > self.open_attempt:
            self.keep_only_attempt(attempt)
        inputs = inputs.to(self.device)
        if inputs.is_floating_point():
            inputs = inputs.detach().float().requires_grad_(True)  # a leaf of its own, whoever holds the tensor
        with self._autocast():
            outputs = self.model(inputs, prefix_lengths.to(self.device))
        return ForwardContext(round, inputs, outputs, int(loss_mask.sum().item()), microbatch, attempt)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)

    @torch.no_grad()
    def infer(self, inputs: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
        """Forward without autograd (evaluation); reads the weights of the last completed step."""
        inputs = inputs.to(self.device)
        if inputs.is_floating_point():
            inputs = inputs.float()
        with self._autocast():
            return self.model(inputs, prefix_lengths.to(self.device)).float()

    @torch.no_grad()
    def audit_loss(self, inputs: torch.Tensor, prefix_lengths: torch.Tensor, targets: torch.Tensor,
                   loss_mask: torch.Tensor) -> tuple[float, int]:
        """Last stage: (summed token loss, tokens) of a forward without autograd, computed as training computes it (an
        audit's second run of a trained microbatch, whose loss it is compared with)."""
        inputs = inputs.to(self.device)
        if inputs.is_floating_point():
            inputs = inputs.float()
        with self._autocast():
            outputs = self.model(inputs, prefix_lengths.to(self.device))
        loss = summed_token_loss(outputs, targets.to(self.device), loss_mask.to(self.device))
        return float(loss.item()), int(loss_mask.sum().item())

    def _require_context(self, ctx: ForwardContext) -> None:
        self.require_round(ctx.round, ctx.attempt)
        if ctx.attempt != self.open_attempt:
            raise StaleRoundError(f"microbatch {ctx.microbatch} belongs to opening {ctx.attempt} of round {ctx.round}; "
                                  f"the stage accumulates opening {self.open_attempt}")

    def backward(self, ctx: ForwardContext, output_grad: torch.Tensor) -> torch.Tensor | None:
        """Accumulate parameter gradients; return the gradient of the stage input (None at stage 0)."""
        self._require_context(ctx)
        grad = output_grad.to(device=self.device, dtype=ctx.outputs.dtype)
        if self._accumulated_before(ctx):
            return self._input_gradient(ctx, ctx.outputs, grad)
        ctx.outputs.backward(grad)
        self._count(ctx)
        return ctx.inputs.grad if ctx.inputs.is_floating_point() else None

    def loss_backward(self, ctx: ForwardContext, targets: torch.Tensor, loss_mask: torch.Tensor,
                      loss_scale: float = 1.0) -> tuple[float, int, torch.Tensor | None]:
        """Last stage: summed token loss of the logits, its backward (of the loss times ``loss_scale``, fp16's);
        returns (loss_sum, tokens, input grad)."""
        self._require_context(ctx)
        loss = summed_token_loss(ctx.outputs, targets.to(self.device), loss_mask.to(self.device))
        scaled = loss * loss_scale if loss_scale != 1.0 else loss
        if self._accumulated_before(ctx):
            grad = self._input_gradient(ctx, scaled, None)
        else:
            scaled.backward()
            self._count(ctx)
            grad = ctx.inputs.grad if ctx.inputs.is_floating_point() else None
        return float(loss.item()), int(loss_mask.sum().item()), grad

    def _accumulated_before(self, ctx: ForwardContext) -> bool:
        """Whether this stage already holds the microbatch's parameter gradients for the round.

        A route that breaks upstream after this stage's backward makes the sender reroute the
        microbatch, and it can come through here again: its input gradient is needed once more,
        its parameter gradients must not be added twice."""
        return ctx.microbatch >= 0 and (ctx.round, ctx.microbatch) in self.accumulated

    def _input_gradient(self, ctx: ForwardContext, outputs: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
        log.info("microbatch %d of round %d came through again (its route broke upstream): input gradient only", ctx.microbatch, ctx.round)
        if not ctx.inputs.is_floating_point():
            return None
        return torch.autograd.grad(outputs, ctx.inputs, grad)[0]

    def _count(self, ctx: ForwardContext) -> None:
        self.microbatches_done += 1
        self.samples_done += ctx.inputs.shape[0]
        self.round_tokens += ctx.tokens
        if ctx.microbatch >= 0:
            self.accumulated.add((ctx.round, ctx.microbatch))

    # ------------------------------------------------------------ step

    def flat_gradients(self) -> torch.Tensor:
        """All parameter gradients as one fp32 vector (zeros where no microbatch touched a parameter)."""
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().reshape(-1) for _, p in self.trainable()
        ]
        return torch.cat(grads)

    def load_gradients(self, summed: torch.Tensor, divisor: float) -> float:
        """The gradients to step on: ``summed`` divided by ``divisor``. Returns their squared norm (inf: not finite)."""
        return self.optimizer.load_gradients(summed, divisor)

    def apply_step(self, round: int, clip_factor: float | None = 1.0) -> bool:
        """``round``'s optimizer step on the loaded gradients, scaled by ``clip_factor`` (None: skip it); clear
        gradients. False if nothing was stepped."""
        stepped = self.optimizer.step(round, clip_factor)
        self.discard_gradients()
        return stepped

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad()
        self.round_tokens = 0
        self.accumulated.clear()

    def keep_only_attempt(self, attempt: int) -> None:
        """Gradients accumulated for an earlier opening of the round are stale: drop them."""
        if attempt != self.open_attempt:
            self.discard_gradients()
            self.open_attempt = attempt

    def finish_round(self, round: int) -> None:
        """``round`` is stepped: accumulate the next one, from its first opening."""
        self.next_round = round + 1
        self.open_attempt = 0

    def initialise(self, seed: int) -> None:
        """Weights from the run's seed (``stage_model.seeded_init``), a fresh optimizer, ready for round 1."""
        if self.lora:
            seed_adapters(self.model, seed)
        else:
            seeded_init(self.model.named_parameters(), seed, self.model.config)
        self.optimizer.load_state({}, {})
        self.discard_gradients()
        self.next_round, self.closed_round, self.open_attempt = 1, 0, 0
        self.loads += 1

    def restart_at(self, next_round: int) -> None:
        """Continue as of ``next_round`` with the current weights, dropping unfinished gradients."""
        self.discard_gradients()
        self.next_round = next_round
        self.closed_round = next_round - 1
        self.open_attempt = 0

    def flat_params(self) -> torch.Tensor:
        """All weights as one fp32 CPU vector, in parameter order."""
        return torch.cat([p.detach().float().reshape(-1).cpu() for _, p in self.trainable()])

    def load_flat_params(self, flat: torch.Tensor) -> None:
        """Set the weights from ``flat`` (inverse of ``flat_params``)."""
        offset = 0
        with torch.no_grad():
            for _, p in self.trainable():
                n = p.numel()
                p.copy_(flat[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype))
                offset += n
        if offset != flat.numel():
            raise ValueError(f"{flat.numel()} values do not match this stage's {offset} parameters")

    # ------------------------------------------------------------ state transfer

    def export_state(self, weights: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights (HF names; ``weights`` instead of the model's own, when given) and optimizer state as CPU
        tensors, plus the scalars as JSON-able extras."""
        weights = self.weights() if weights is None else weights
        tensors = {name: p.detach().to("cpu", copy=True) for name, p in weights.items()}
        moments, steps = self.optimizer.state_tensors()
        return tensors | moments, {"steps": steps, "next_round": self.next_round}

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.trainable()}

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What the stage trains, syncs, hands off and publishes: every weight, or under LoRA the adapters only."""
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def load_base(self, tensors: dict[str, torch.Tensor], seed: int) -> None:
        """LoRA: the frozen base weights of the stage (a full checkpoint's), held in --lora-base-bits, then adapters on it."""
        params = dict(self.model.named_parameters())
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise FrameError(f"the base checkpoint lacks this stage's {missing[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
        if self.train.lora_base_bits != 32:
            quantize_base(self.model, self.train.lora_base_bits)
        add_adapters(self.model, self.train, seed)
        self.model.to(self.device)
        self.optimizer = StageOptimizer(self.trainable(), self.train)
        self.base_loaded = True

    def import_state(self, tensors: dict[str, torch.Tensor], extras: dict[str, Any] | None, next_round: int,
                     also: tuple[str, ...] = ()) -> None:
        """Load weights (and optimizer state if present), checking names, shapes and finiteness first; tensors
        named in ``also`` are someone else's (the replica sync's) and checked there."""
        params = dict(self.trainable())
        missing = sorted(set(params) - set(tensors))
        unexpected = sorted(k for k in tensors if k not in params and not k.startswith(STATE_PREFIX) and k not in also)
        if missing or unexpected:
            raise FrameError(f"stage state does not match layers [{self.model.layer_start}, {self.model.layer_end}): missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, tensor in tensors.items():
            if name in also:
                continue
            base, key = state_key(name) if name.startswith(STATE_PREFIX) else (name, "")
            if base not in params:
                raise FrameError(f"tensor {name} names no parameter of layers [{self.model.layer_start}, {self.model.layer_end})")
            if (not key or key in MOMENT_KEYS) and tuple(tensor.shape) != tuple(params[base].shape):
                raise FrameError(f"tensor {name} has shape {list(tensor.shape)}, the stage expects {list(params[base].shape)}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise FrameError(f"tensor {name} holds NaN or Inf; refusing the state")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
        self.optimizer.load_state(tensors, (extras or {}).get("steps", {}))
        self.discard_gradients()
        self.next_round = next_round
        self.closed_round = next_round - 1
        self.open_attempt = 0
        self.loads += 1
