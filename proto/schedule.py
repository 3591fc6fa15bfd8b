"""Per-round decisions every replica and the coordinator must take identically, from the seed alone."""

from __future__ import annotations

import hashlib
import math


def _unit(*parts: int) -> float:
    """A number in [0, 1) determined by ``parts`` (same on every machine and Python)."""
    digest = hashlib.sha256(".".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def skips_sync(seed: int, round: int, stage: int, p_skip: float) -> bool:
    """Whether ``stage`` skips its replica sync in ``round`` (randomly skipped synchronization)."""
    return p_skip > 0 and _unit(seed, round, stage, 1) < p_skip


def resyncs(round: int, resync_every: int) -> bool:
    """Whether ``round`` must sync (cocktail: its parameter deltas are averaged even if the skip draw says skip),
    so replicas re-align at least every ``resync_every`` rounds."""
    return resync_every > 0 and round % resync_every == 0


def sync_seed(seed: int, round: int, stage: int, attempt: int) -> int:
    """Seed of the shared random subset of a round's compressed sync (indices are never sent)."""
    return int(_unit(seed, round, stage, attempt, 2) * 2**62)


def learning_rate(train, round: int) -> float:
    """The learning rate of ``round`` (1-based): linear warm-up to ``train.lr`` over ``lr_warmup_rounds``, then
    ``lr_schedule`` decay to ``lr_min_ratio * lr`` at round ``lr_decay_rounds`` (0: no decay), flat after it.

    A function of the round alone, so every replica and stage takes the same value, and a checkpoint or a
    hand-off, which carries its round, carries the schedule's position."""
    peak, warmup, horizon = train.lr, train.lr_warmup_rounds, train.lr_decay_rounds
    if warmup and round <= warmup:
        return peak * round / warmup
    if train.lr_schedule == "constant" or horizon <= warmup:
        return peak
    floor = peak * train.lr_min_ratio
    progress = min(1.0, (round - warmup) / (horizon - warmup))
    if train.lr_schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
