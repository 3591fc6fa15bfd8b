"""Robust aggregation: CenteredClip over the replicas' contributions, so one bad replica moves the result a bounded amount.

CenteredClip (Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine Robust
Optimization", ICML; the aggregator BTARD runs, Gorbunov et al. 2022) starts from a centre v_0
and repeats, for ``iterations`` steps,

    v_{l+1} = v_l + sum_i w_i c_i (x_i - v_l) / sum_i w_i,    c_i = min(1, tau / ||x_i - v_l||),

so no input pulls the centre by more than ``tau`` (times its weight share) per step, however far
it is. Here v_0 is the coordinate-wise median of the inputs (BTARD's start).

The published bound (their Theorem III, robustness of iterative clipping): if at most a fraction
delta <= 0.1 of the inputs are bad and the good ones have variance rho^2 (E||x_i - x_good||^2 <=
rho^2), then with tau set from rho as the paper prescribes, E||v_l - x_good||^2 <= (9.7 delta)^l
E||v_0 - x_good||^2 + 4000 delta rho^2. It needs delta <= 0.1, i.e. ten or more replicas; a stage
of 3 or 4 replicas with one bad (delta = 1/3, 1/4) is outside it. For those this module relies on
the elementary bound below, which holds for any inputs, deterministically:

    if every good input lies within tau of every iterate, and the bad inputs hold a share beta < 1
    of the weight, then ||v_L - mean_good|| <= beta^L ||v_0 - mean_good|| + tau beta / (1 - beta),

(``influence_bound``; mean_good is the good inputs' weighted mean). One bad replica of n with
equal weights: beta = 1/n, so it shifts the result by at most tau / (n - 1) (tau/2 with 3
replicas, tau/3 with 4), whatever it sends. When no input is beyond tau, the result is exactly
the weighted mean (each step is then the weighted mean, computed the same way every time).

``robust_mean`` sets tau from the inputs themselves (``tau`` times the median distance of the
inputs from their coordinate-wise median), so it needs no knowledge of the gradients' scale and
one bad input cannot inflate it; and it caps each weight at the median weight, since a weight (a
replica's token count) is the sender's own claim: a bad replica claiming a huge count still gets
beta = 1/n when the honest replicas trained equal tokens. With honest replicas the result is
their token-weighted mean, the counts above the median counted as the median (a cap at twice
the median, which would keep more honest rounds exactly token-weighted, lets a bad replica of 3
hold half the weight and pull the centre so far that the good inputs are clipped too). What it cannot do: tell a bad input that
stays within the honest spread (e.g. a sign-flipped gradient whose norm is that of the noise)
from an honest one; such an input weighs as one replica, as any honest one does.

Everything is a pure function of the inputs in their given order: norms in float64 over fixed
chunks, so the same inputs give bit-identical results on every replica with the same torch build
(a different CPU's rounding could differ in the last bit of a norm; replicas then disagree on a
checksum and the coordinator has the minority reload).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

CHUNK = 1 << 20  # values per chunk: bounds the float64 temporaries, and fixes the order of every sum
ROW = 1024       # a chunk's squares are summed row by row (one thread per row), then the rows in order


def squared_norm(x: torch.Tensor) -> float:
    """sum(x^2) in float64, in an order that does not depend on the thread count (BLAS's dot does)."""
    total = 0.0
    for start in range(0, x.numel(), CHUNK):
        d = x[start : start + CHUNK].double()
        whole = d.numel() - d.numel() % ROW
        if whole:
            total += float((d[:whole].view(-1, ROW) ** 2).sum(dim=1).sum())
        total += float((d[whole:] ** 2).sum())
    return total


@dataclass(frozen=True)
class ClipResult:
    """The aggregate, and per input (in input order) how far it was from it in units of the clip radius."""

    aggregate: torch.Tensor          # float32, the inputs' shape (1-D)
    excess: tuple[float, ...]        # ||x_i - aggregate|| / tau: above 1, input i was clipped (its pull cut to 1/excess)
    tau: float                       # the clip radius used

    @property
    def clipped(self) -> tuple[float, ...]:
        """Per input, the share of its offset from the aggregate that clipping removed (0: none, 0.99: 99%)."""
        return tuple(0.0 if e <= 1 else 1 - 1 / e for e in self.excess)


def _distances(inputs: Sequence[torch.Tensor], centre: torch.Tensor) -> list[float]:
    """||x_i - centre|| for each input, in float64, summed chunk by chunk in a fixed order."""
    out = []
    for x in inputs:
        total = 0.0
        for start in range(0, centre.numel(), CHUNK):
            total += squared_norm(x[start : start + CHUNK].double() - centre[start : start + CHUNK].double())
        out.append(math.sqrt(total))
    return out


def coordinate_median(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median (the lower of the two middle values for an even count): an input's value in every coordinate."""
    numel = inputs[0].numel()
    out = torch.empty(numel, dtype=torch.float32)
    for start in range(0, numel, CHUNK):
        out[start : start + CHUNK] = torch.stack([x[start : start + CHUNK] for x in inputs]).median(dim=0).values
    return out


def centered_clip(inputs: Sequence[torch.Tensor], weights: Sequence[float], tau: float, iterations: int,
                  start: torch.Tensor | None = None) -> ClipResult:
    """CenteredClip of 1-D float32 ``inputs`` with ``weights`` (>= 0, positive sum) and clip radius ``tau`` (>= 0), from
    ``start`` (default: the coordinate-wise median), for at most ``iterations`` steps (fewer once a step changes nothing)."""
    if not inputs:
        raise ValueError("centered_clip needs at least one input")
    numel = inputs[0].numel()
    if any(x.dim() != 1 or x.numel() != numel or x.dtype != torch.float32 for x in inputs):
        raise ValueError(f"centered_clip takes 1-D float32 tensors of one size, got {[(x.dtype, tuple(x.shape)) for x in inputs]}")
    if len(weights) != len(inputs) or any(not (w >= 0 and math.isfinite(w)) for w in weights) or not sum(weights) > 0:
        raise ValueError(f"centered_clip needs one finite weight >= 0 per input with a positive sum, got {list(weights)}")
    if not (tau >= 0 and math.isfinite(tau)) or iterations < 1:
        raise ValueError(f"centered_clip needs a finite tau >= 0 and iterations >= 1, got tau={tau}, iterations={iterations}")
    total = float(sum(weights))
    centre = (coordinate_median(inputs) if start is None else start.float()).clone()
    for _ in range(iterations):
        distances = _distances(inputs, centre)
        pulls = [w * (1.0 if d <= tau else tau / d) for w, d in zip(weights, distances)]
        kept = total - sum(pulls)  # the centre's own share: exactly 0 when nothing is clipped, so the step is the weighted mean
        moved = torch.empty_like(centre)
        for s in range(0, numel, CHUNK):
            acc = centre[s : s + CHUNK].double() * kept
            for x, pull in zip(inputs, pulls):
                acc += x[s : s + CHUNK].double() * pull
            moved[s : s + CHUNK] = acc / total
        done = torch.equal(moved, centre)
        centre = moved
        if done:
            break
    excess = tuple((d / tau if tau > 0 else (math.inf if d > 0 else 0.0)) for d in _distances(inputs, centre))
    return ClipResult(centre, excess, tau)


WEIGHT_CAP = 1.0  # a weight counts up to this many times the median weight


def capped_weights(weights: Sequence[float]) -> list[float]:
    """Each positive weight capped at ``WEIGHT_CAP`` x the median of the positive weights: a larger claim buys no more pull."""
    positive = sorted(w for w in weights if w > 0)
    if not positive:
        return [0.0 for _ in weights]
    cap = positive[(len(positive) - 1) // 2] if len(positive) % 2 else (positive[len(positive) // 2 - 1] + positive[len(positive) // 2]) / 2
    return [min(float(w), WEIGHT_CAP * cap) if w > 0 else 0.0 for w in weights]


def robust_mean(inputs: Sequence[torch.Tensor], weights: Sequence[float], tau: float, iterations: int) -> ClipResult:
    """CenteredClip with the radius set from the inputs: ``tau`` x the median distance of the inputs (those of positive
    weight) from their coordinate-wise median; weights capped at their median (``capped_weights``). Inputs of weight 0
    take no part (their excess is reported as 0)."""
    capped = capped_weights(weights)
    members = [i for i, w in enumerate(capped) if w > 0]
    if not members:
        raise ValueError("robust_mean needs at least one input of positive weight")
    chosen = [inputs[i] for i in members]
    start = coordinate_median(chosen)
    spread = sorted(_distances(chosen, start))
    radius = tau * spread[(len(spread) - 1) // 2]
    result = centered_clip(chosen, [capped[i] for i in members], radius, iterations, start)
    excess = [0.0] * len(inputs)
    for i, e in zip(members, result.excess):
        excess[i] = e
    return ClipResult(result.aggregate, tuple(excess), radius)


def influence_bound(bad_share: float, tau: float, start_error: float = 0.0, iterations: int = 0) -> float:
    """The most bad inputs holding ``bad_share`` (< 1) of the weight can move CenteredClip's result from the good inputs'
    weighted mean, if every good input stays within ``tau`` of every iterate (module docstring)."""
    if not 0 <= bad_share < 1:
        raise ValueError(f"bad_share must be in [0, 1), got {bad_share}")
    return bad_share**iterations * start_error + tau * bad_share / (1 - bad_share)
