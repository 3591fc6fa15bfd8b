"""The stage's optimizer step, in one place, in torchtitan's order: gradients in, then clip and schedule, then step.

Every replica of a stage calls ``step`` with the same summed gradient and divisor (exact sync)
or with its own (cocktail's local step), so the step is the one place where gradients become
weights. Its state (AdamW's moments and step counts) travels with the weights when a replica
hands its stage to a joiner.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from proto.run_config import TrainConfig

STATE_PREFIX = "optim."
MOMENTS = ("exp_avg", "exp_avg_sq")


class StageOptimizer:
    """AdamW over one stage's parameters, fed flat summed gradients."""

    def __init__(self, model: nn.Module, train: TrainConfig) -> None:
        self.train = train
        self.named = list(model.named_parameters())
        self.optimizer = self._fresh()

    def _fresh(self) -> torch.optim.Optimizer:
        t = self.train
        return torch.optim.AdamW([p for _, p in self.named], lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)

    def step(self, summed: torch.Tensor, divisor: float) -> None:
        """One update from ``summed`` (a flat fp32 vector in parameter order) divided by ``divisor`` (loss tokens)."""
        # 1. Gradients in.
        offset = 0
        for _, p in self.named:
            n = p.numel()
            p.grad = (summed[offset : offset + n] / divisor).view_as(p).to(device=p.device, dtype=p.dtype)
            offset += n
        if offset != summed.numel():
            raise ValueError(f"{summed.numel()} gradient values do not match this stage's {offset} parameters")
        # 2. Clip and schedule: none yet (a constant learning rate, no clipping).
        # 3. Step.
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """AdamW's moments as CPU tensors named ``optim.<param>.<moment>``, and each parameter's step count."""
        tensors, steps = {}, {}
        for name, p in self.named:
            state = self.optimizer.state.get(p)
            if not state:
                continue
            for moment in MOMENTS:
                tensors[f"{STATE_PREFIX}{name}.{moment}"] = state[moment].detach().to("cpu", copy=True)
            steps[name] = float(state["step"])
        return tensors, steps

    def load_state(self, tensors: dict[str, torch.Tensor], steps: dict[str, Any]) -> None:
        """A fresh AdamW holding the moments and steps of ``state_tensors`` (parameters without them start anew)."""
        self.optimizer = self._fresh()
        for name, p in self.named:
            if name in steps and f"{STATE_PREFIX}{name}.exp_avg" in tensors:
                self.optimizer.state[p] = {"step": torch.tensor(float(steps[name]))} | {
                    moment: tensors[f"{STATE_PREFIX}{name}.{moment}"].to(device=p.device, dtype=p.dtype).clone() for moment in MOMENTS}
