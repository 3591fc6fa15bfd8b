"""The stage's optimizer step, in one place, in torchtitan's order: gradients in, then clip and schedule, then step.

Every replica of a stage loads the same summed gradient and divisor (exact sync) or its own
(a local step under cocktail or sparseloco), so the step is the one place where gradients
become weights. It is the run's recipe: the learning rate of the round
(``proto.schedule.learning_rate``: warm-up, then cosine or linear decay to a floor), clipping
by the **global** gradient norm (``load_gradients`` gives this stage's squared norm; the
coordinator sums every stage's and hands all of them one factor, so the swarm clips as one
process would), and decoupled weight decay on matrices only (nanoGPT's rule: tensors of two or
more dimensions decay, biases and LayerNorm weights do not). The optimizer is AdamW (``--optimizer adamw``, fp32 moments) or bitsandbytes' 8-bit
AdamW (``adamw8bit``: uint8 moments with fp32 block scales, a quarter of the memory). Its state
travels with the weights, tensor by tensor, when a replica hands its stage to a joiner, and
goes into checkpoints beside them. A gradient that is not finite (fp16's loss scale
overflowed) is not applied: ``step`` says so and the step is skipped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from proto.run_config import TrainConfig
from proto.schedule import learning_rate

STATE_PREFIX = "optim."
# State keys that hold one value per parameter element (the rest, 8-bit AdamW's block scales and
# quantisation maps, have shapes of their own).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "state1", "state2")


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices (and embeddings) decay by ``weight_decay``; biases and LayerNorm weights (1-D) never do."""
    decay = [p for _, p in named if p.dim() >= 2]
    keep = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optimizer_state_name(param: str, key: str) -> str:
    """How a parameter's optimizer state tensor is named in hand-offs and checkpoints: ``optim.<param>.<key>``."""
    return f"{STATE_PREFIX}{param}.{key}"


def state_key(name: str) -> tuple[str, str]:
    """``optim.<param>.<key>`` split into the parameter's name and the state key."""
    param, _, key = name[len(STATE_PREFIX):].rpartition(".")
    return param, key


class StageOptimizer:
    """AdamW (or 8-bit AdamW) over one stage's trainable parameters, fed flat summed gradients."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], train: TrainConfig) -> None:
        self.train = train
        self.named = named
        self.optimizer = self._fresh()

    def _fresh(self) -> torch.optim.Optimizer:
        t = self.train
        groups = param_groups(self.named, t.weight_decay)
        if t.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        # fused: one kernel per step, and no temporaries the size of the stage (foreach's) on top of its state.
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=True)

    def load_gradients(self, summed: torch.Tensor, divisor: float) -> float:
        """1. Gradients in: ``summed`` (a flat fp32 vector in parameter order, which this consumes) divided by
        ``divisor`` (loss tokens, times the loss scale under fp16). Returns their squared norm, the stage's share
        of the global norm: inf if the gradient is not finite (then ``step`` changes nothing)."""
        total = sum(p.numel() for _, p in self.named)
        if total != summed.numel():
            raise ValueError(f"{summed.numel()} gradient values do not match this stage's {total} parameters")
        self.zero_grad()
        if not torch.isfinite(summed.sum()):  # NaN and Inf survive a sum; no mask the size of the stage
            return math.inf
        # Views of ``summed`` (divided in place; the caller gives it up) where it is on the parameters' device,
        # so the step holds no second copy of the stage's gradient.
        summed.div_(divisor)
        offset = 0
        for _, p in self.named:
            n = p.numel()
            p.grad = summed[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
            offset += n
        return float(torch.linalg.vector_norm(summed)) ** 2

    def step(self, round: int, clip_factor: float | None = 1.0) -> bool:
        """2. Clip (by ``clip_factor``, the same on every stage) and schedule (``round``'s learning rate), 3. step.
        Returns False, and changes nothing, if no gradient is loaded or ``clip_factor`` is None (skip)."""
        grads = [p.grad for _, p in self.named if p.grad is not None]
        if not grads or clip_factor is None:
            self.zero_grad()
            return False
        if clip_factor < 1.0:
            torch._foreach_mul_(grads, clip_factor)
        lr = learning_rate(self.train, round)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The optimizer's state as CPU tensors named ``optim.<param>.<key>`` (AdamW: exp_avg, exp_avg_sq; 8-bit
        AdamW: state1, state2, absmax1, absmax2, qmap1, qmap2), and each parameter's step count."""
        tensors, steps = {}, {}
        for name, p in self.named:
            state = self.optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    tensors[optimizer_state_name(name, key)] = value.detach().to("cpu", copy=True)
            steps[name] = float(state["step"])
        return tensors, steps

    def load_state(self, tensors: dict[str, torch.Tensor], steps: dict[str, Any]) -> None:
        """A fresh optimizer holding the state of ``state_tensors`` (parameters without it start anew)."""
        self.optimizer = self._fresh()
        integer_steps = self.train.optimizer == "adamw8bit"
        for name, p in self.named:
            prefix = f"{STATE_PREFIX}{name}."
            state = {key[len(prefix):]: t.to(p.device).clone() for key, t in tensors.items() if key.startswith(prefix)}
            if name in steps and state:
                state["step"] = int(steps[name]) if integer_steps else torch.tensor(float(steps[name]))
                self.optimizer.state[p] = state
