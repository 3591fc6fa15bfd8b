"""The stage's optimizer step, in one place, in torchtitan's order: gradients in, then clip and schedule, then step.

Every replica of a stage calls ``step`` with the same summed gradient and divisor (exact sync)
or with its own (cocktail's local step), so the step is the one place where gradients become
weights. The optimizer is AdamW (``--optimizer adamw``, fp32 moments) or bitsandbytes' 8-bit
AdamW (``adamw8bit``: uint8 moments with fp32 block scales, a quarter of the memory). Its state
travels with the weights, tensor by tensor, when a replica hands its stage to a joiner, and
goes into checkpoints beside them. A gradient that is not finite (fp16's loss scale
overflowed) is not applied: ``step`` says so and the step is skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from proto.run_config import TrainConfig

STATE_PREFIX = "optim."
# State keys that hold one value per parameter element (the rest, 8-bit AdamW's block scales and
# quantisation maps, have shapes of their own).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "state1", "state2")


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
        params = [p for _, p in self.named]
        if t.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
        # fused: one kernel per step, and no temporaries the size of the stage (foreach's) on top of its state.
        return torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay, fused=True)

    def step(self, summed: torch.Tensor, divisor: float) -> bool:
        """One update from ``summed`` (a flat fp32 vector in parameter order, which this consumes) divided by
        ``divisor`` (loss tokens, times the loss scale under fp16). Returns False, and changes nothing, if the
        gradient is not finite."""
        if not torch.isfinite(summed.sum()):  # NaN and Inf survive a sum; no mask the size of the stage
            self.zero_grad()
            return False
        # 1. Gradients in: views of ``summed`` (divided in place; the caller gives it up) where it is on the
        #    parameters' device, so the step holds no second copy of the stage's gradient.
        total = sum(p.numel() for _, p in self.named)
        if total != summed.numel():
            raise ValueError(f"{summed.numel()} gradient values do not match this stage's {total} parameters")
        summed.div_(divisor)
        offset = 0
        for _, p in self.named:
            n = p.numel()
            p.grad = summed[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
            offset += n
        # 2. Clip and schedule: none yet (a constant learning rate, no clipping).
        # 3. Step.
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
