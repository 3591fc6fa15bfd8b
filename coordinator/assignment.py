"""Stage layout and stage choice: pure functions of a membership snapshot (no network, no clock)."""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Collection, Sequence

from proto.run_config import TrainConfig


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
    """What the assignment policy knows of one live peer (0 means not known yet)."""

    stage: int
    throughput: float       # samples/s the peer measured for its stage
    free_memory: int = 0    # bytes free on its device when it joined
    bandwidth: float = 0.0  # bytes/s its link carried in its large transfers


@dataclass(frozen=True)
class StageNeeds:
    """What one replica of a stage costs: device memory, and bytes on its link per trained sample."""

    memory: int
    bytes_per_sample: float


def stage_needs(parameters: Sequence[int], d_model: int, train: TrainConfig, memory: Sequence[int]) -> list[StageNeeds]:
    """What one replica of each stage needs: ``memory``, the device bytes its plan adds up to
    (``proto.memory_plan``), and link bytes per trained sample from its parameter count and the
    run's settings: every boundary the stage touches carries a sample's activations one way and
    their gradients the other, at their wire width; replica sync adds the stage's bytes per
    round spread over the round's samples.
    """
    width = 4  # what crosses a boundary uncompressed: fp32 (autocast's residual stream stays fp32)
    activation = train.activation_bits / 8 if train.activation_compression != "none" else width
    gradient = train.gradient_bits / 8 if train.gradient_bits else width
    per_boundary = train.seq_len * d_model * (activation + gradient)
    if train.sync_compression == "cocktail":  # random-subset mask bits plus the kept values, on rounds that sync
        kept = train.sync_random_ratio * train.sync_topk_ratio
        per_parameter = (train.sync_random_ratio / 8 + kept * train.sync_bits / 8) * (1 - train.p_skip)
    elif train.sync_compression == "sparseloco":  # offsets and values of each chunk's top-k, every --sync-every rounds
        offset_bits = math.log2(train.sync_chunk)
        per_parameter = train.sync_density * (offset_bits + train.sync_bits) / 8 / train.sync_every
    else:  # reduce-scatter then all-gather of fp32 sums
        per_parameter = 4.0
    last = len(parameters) - 1
    return [StageNeeds(memory=memory[k],
                       bytes_per_sample=((k > 0) + (k < last)) * per_boundary + per_parameter * count / train.global_batch_size)
            for k, count in enumerate(parameters)]


def fits(replica: Replica, need: StageNeeds | None) -> bool:
    return need is None or not replica.free_memory or replica.free_memory >= need.memory


def capacity(replica: Replica, need: StageNeeds | None, default: float = 1.0) -> float:
    """Samples/s the replica can deliver to its stage: its compute throughput (``default`` when
    unmeasured), capped by the samples/s its link can carry for that stage."""
    compute = replica.throughput if replica.throughput > 0 else default
    if need is None or replica.bandwidth <= 0 or need.bytes_per_sample <= 0:
        return compute
    return min(compute, replica.bandwidth / need.bytes_per_sample)


def _need(needs: Sequence[StageNeeds] | None, stage: int) -> StageNeeds | None:
    return needs[stage] if needs is not None else None


def choose_stage(replicas: Sequence[Replica], num_stages: int, requested: int = -1,
                 newcomer: Replica | None = None, needs: Sequence[StageNeeds] | None = None) -> int:
    """Stage for a newcomer: among the stages its memory fits, the one with the least total
    capacity (an empty stage first).

    Capacity is measured throughput capped by link bandwidth (``capacity``); unmeasured
    replicas count as the median measured throughput, or 1.0 when nothing is measured, so a
    stage of fresh peers is not mistaken for an empty one. Ties go to the lower stage index.
    ``requested`` (>= 0) wins if it names a valid stage. Raises ValueError when the newcomer's
    free memory fits no stage (or not the requested one).
    """
    if needs is not None and len(needs) != num_stages:
        raise ValueError(f"needs lists {len(needs)} stages, the run has {num_stages}")
    newcomer = newcomer or Replica(-1, 0.0)
    if 0 <= requested < num_stages:
        if not fits(newcomer, _need(needs, requested)):
            raise ValueError(f"stage {requested} needs {_gib(needs[requested].memory)} of device memory and this device has "
                             f"{_gib(newcomer.free_memory)} free: ask for another stage, or join with a larger device")
        return requested
    allowed = [k for k in range(num_stages) if fits(newcomer, _need(needs, k))]
    if not allowed:
        smallest = min(n.memory for n in needs)
        raise ValueError(f"the smallest stage needs {_gib(smallest)} of device memory and this device has "
                         f"{_gib(newcomer.free_memory)} free: join with a larger device, or run with more --stages")
    measured = sorted(r.throughput for r in replicas if r.throughput > 0)
    default = measured[len(measured) // 2] if measured else 1.0
    totals = [0.0] * num_stages
    counts = [0] * num_stages
    for r in replicas:
        if 0 <= r.stage < num_stages:
            totals[r.stage] += capacity(r, _need(needs, r.stage), default)
            counts[r.stage] += 1
    return min(allowed, key=lambda k: (counts[k] > 0, totals[k], k))


def plan_rebalance(replicas: Sequence[tuple[str, Replica]], num_stages: int,
                   needs: Sequence[StageNeeds] | None = None, min_replicas: int = 1,
                   short: Sequence[int] | None = None, pinned: Collection[str] = ()) -> tuple[str, int] | None:
    """Refill a stage short of ``min_replicas``: move one peer there from the best-covered stage, or None.

    The target is the first stage of ``short`` (default: every stage below ``min_replicas``) that a peer can come
    to.
    The donor is the stage with the most total capacity among those that keep ``min_replicas``
    after giving one (never fewer than one) and have a movable replica (not in ``pinned``: a
    peer that asked for its stage stays there) whose memory fits the target; from it moves the
    fitting replica that gains most by moving (its capacity there minus its capacity here: a
    peer whose link limits it less in the target stage), among equals the slowest (the one the
    donor misses least). Unmeasured replicas count as 1.0. Ties go to lower stage, then id.
    """
    by_stage: dict[int, list[tuple[str, Replica]]] = {k: [] for k in range(num_stages)}
    for peer_id, r in replicas:
        if 0 <= r.stage < num_stages:
            by_stage[r.stage].append((peer_id, r))
    keep = max(1, min_replicas)
    for target in [k for k in (range(num_stages) if short is None else short) if len(by_stage[k]) < keep]:
        need = _need(needs, target)

        def movable(k: int) -> list[tuple[str, Replica]]:
            return [(peer_id, r) for peer_id, r in by_stage[k] if peer_id not in pinned and fits(r, need)]

        donors = [k for k in range(num_stages) if k != target and len(by_stage[k]) > keep and movable(k)]
        if not donors:
            continue  # no peer can come here: try the next short stage
        donor = max(donors, key=lambda k: (sum(capacity(r, _need(needs, k)) for _, r in by_stage[k]), -k))
        candidates = movable(donor)
        here = {peer_id: capacity(r, _need(needs, donor)) for peer_id, r in candidates}
        mover = min(candidates, key=lambda m: (here[m[0]] - capacity(m[1], need), here[m[0]], m[0]))[0]
        return mover, target
    return None


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"
