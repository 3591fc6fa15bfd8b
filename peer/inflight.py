"""How many microbatches stage 0 keeps in flight: enough that the pipeline's round trips do not idle it.

One microbatch's trip (forward through every stage, the hops between them, and the backward
back) takes ``trip`` seconds, of which stage 0 computes ``compute``. With one microbatch in
flight, stage 0 is idle for ``trip - compute``; with ``ceil(trip / compute)`` it always has
work (and so has every stage no slower than it). The trip is taken as the fastest of the recent
ones: with several in flight, a trip also includes queueing behind the others, which more in
flight would not remove. The run's ``--max-inflight`` caps the choice (the memory planner counts
that many microbatches' activations); a peer's ``--inflight N`` fixes it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

RECENT_TRIPS = 16


@dataclass
class InflightSizer:
    cap: int                    # the run's --max-inflight
    fixed: int = 0              # the peer's --inflight (0: from measurements)
    trips: deque = field(default_factory=lambda: deque(maxlen=RECENT_TRIPS))
    chosen: int = 0             # the last choice (0: none yet)

    def observe_trip(self, seconds: float) -> None:
        if seconds > 0:
            self.trips.append(seconds)

    def choose(self, compute_seconds: float) -> int:
        """Microbatches in flight for the next round, given stage 0's compute per microbatch (0: not measured yet)."""
        if self.fixed:
            return min(self.fixed, self.cap)
        need = self._need(compute_seconds)
        return self.cap if need is None else max(1, min(self.cap, need))  # nothing measured yet: as many as the run allows

    def _need(self, compute_seconds: float) -> int | None:
        """Microbatches that cover the fastest recent trip (None until a trip and the compute are measured)."""
        if not self.trips or compute_seconds <= 0:
            return None
        return math.ceil(min(self.trips) / compute_seconds)

    def describe(self, n: int, compute_seconds: float) -> str:
        if self.fixed:
            return f"{n} microbatches in flight (--inflight {self.fixed}" + (f", capped by the run's --max-inflight {self.cap})" if self.fixed > self.cap else ")")
        need = self._need(compute_seconds)
        if need is None:
            return f"{n} microbatches in flight (the run's --max-inflight; nothing measured yet)"
        capped = (f"; covering it takes {need}, more than the run's --max-inflight {self.cap} allows: the organiser can raise it "
                  "where stages have the memory") if need > self.cap else f" (at most the run's --max-inflight {self.cap})"
        return (f"{n} microbatches in flight: a microbatch's trip through the pipeline takes {1000 * min(self.trips):.0f} ms, of which "
                f"this stage computes {1000 * compute_seconds:.0f} ms{capped}; peer join --inflight N fixes it")
