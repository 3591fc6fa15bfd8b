"""fp16's dynamic loss scale, one for the whole run: the coordinator owns it, every stage uses the same.

The last stage multiplies the loss by the scale before its backward, so small fp16 gradients
do not flush to zero; every stage divides its step by it. A round in which any replica's
gradient was not finite (the scale was too high) halves it, and that replica's step was
skipped; ``GROWTH_INTERVAL`` rounds in a row without overflow double it. These are
``torch.cuda.amp.GradScaler``'s defaults, but for the start: GradScaler's 2**16 multiplies a
loss averaged over tokens, and a stage's loss is summed over a microbatch's tokens, so the
scale starts at 2**16 divided by those (rounded down to a power of two): the same gradients.
Under float32 and bfloat16 the scale is 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

INITIAL = 2.0**16  # GradScaler's, for a loss averaged over tokens
GROWTH_INTERVAL = 2000
STORE_KEY = "loss_scale"


@dataclass
class DynamicLossScale:
    value: float = INITIAL
    good_rounds: int = 0       # rounds in a row without an overflow
    overflows: int = 0         # rounds with one, over the run

    def update(self, overflow: bool) -> None:
        if overflow:
            self.value = max(1.0, self.value / 2)
            self.good_rounds = 0
            self.overflows += 1
            return
        self.good_rounds += 1
        if self.good_rounds >= GROWTH_INTERVAL:
            self.value *= 2
            self.good_rounds = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def start(cls, tokens_per_microbatch: int) -> DynamicLossScale:
        """The scale a run starts at: GradScaler's for a loss summed over ``tokens_per_microbatch`` tokens."""
        return cls(value=max(1.0, 2.0 ** math.floor(math.log2(INITIAL / max(1, tokens_per_microbatch)))))

    @classmethod
    def from_json(cls, text: str | None, tokens_per_microbatch: int) -> DynamicLossScale:
        return cls(**json.loads(text)) if text else cls.start(tokens_per_microbatch)
