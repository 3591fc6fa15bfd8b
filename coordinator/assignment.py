"""Stage layout and stage choice: pure functions of a membership snapshot (no network, no clock)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def stage_layer_ranges(n_layer: int, stages: int) -> list[tuple[int, int]]:
    """Split ``n_layer`` blocks into ``stages`` contiguous ranges whose sizes differ by at most one.

    Earlier stages get the extra block: stage 0 already pays for the embedding lookup, which is
    cheap, while the last stage pays for the vocabulary projection, which is not.
    """
    if not 1 <= stages <= n_layer:
        raise ValueError(f"--stages {stages} must be between 1 and the model's {n_layer} blocks")
    base, extra = divmod(n_layer, stages)
    ranges, start = [], 0
    for k in range(stages):
        end = start + base + (1 if k < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


@dataclass(frozen=True)
class Replica:
    """What the assignment policy knows of one live peer."""

    stage: int
    throughput: float  # samples/s the peer measured for its stage; 0 when not yet measured


def choose_stage(replicas: Sequence[Replica], num_stages: int, requested: int = -1) -> int:
    """Stage for a newcomer: the one with the least total throughput (an empty stage first).

    Unmeasured replicas count as the median measured throughput, or 1.0 when nothing is
    measured, so a stage of fresh peers is not mistaken for an empty one. Ties go to the
    lower stage index. ``requested`` (>= 0) wins if it names a valid stage.
    """
    if 0 <= requested < num_stages:
        return requested
    measured = sorted(r.throughput for r in replicas if r.throughput > 0)
    default = measured[len(measured) // 2] if measured else 1.0
    totals = [0.0] * num_stages
    counts = [0] * num_stages
    for r in replicas:
        if 0 <= r.stage < num_stages:
            totals[r.stage] += r.throughput if r.throughput > 0 else default
            counts[r.stage] += 1
    return min(range(num_stages), key=lambda k: (counts[k] > 0, totals[k], k))


def plan_rebalance(replicas: Sequence[tuple[str, Replica]], num_stages: int) -> tuple[str, int] | None:
    """Refill an empty stage: move one peer there from the best-covered stage, or None.

    The donor is the stage with the most total throughput among those with at least two
    replicas (so it keeps one); from it, the slowest replica moves, so the donor loses as
    little as possible. Unmeasured replicas count as 1.0. Ties go to lower stage, then id.
    """
    by_stage: dict[int, list[tuple[str, float]]] = {k: [] for k in range(num_stages)}
    for peer_id, r in replicas:
        if 0 <= r.stage < num_stages:
            by_stage[r.stage].append((peer_id, r.throughput if r.throughput > 0 else 1.0))
    empty = [k for k, members in by_stage.items() if not members]
    donors = [k for k, members in by_stage.items() if len(members) >= 2]
    if not empty or not donors:
        return None
    donor = max(donors, key=lambda k: (sum(t for _, t in by_stage[k]), -k))
    mover = min(by_stage[donor], key=lambda m: (m[1], m[0]))[0]
    return mover, empty[0]
