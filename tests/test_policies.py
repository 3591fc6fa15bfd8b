"""Pure policies: stage layout, stage choice for a newcomer, next-hop choice."""

from __future__ import annotations

import random

import pytest

from coordinator.assignment import Replica, choose_stage, stage_layer_ranges
from peer.pipeline import choose_next_hop


@pytest.mark.parametrize(
    "n_layer, stages, expected",
    [
        (4, 2, [(0, 2), (2, 4)]),
        (4, 1, [(0, 4)]),
        (28, 3, [(0, 10), (10, 19), (19, 28)]),
        (28, 4, [(0, 7), (7, 14), (14, 21), (21, 28)]),
        (5, 5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    ],
)
def test_stage_layer_ranges(n_layer, stages, expected):
    assert stage_layer_ranges(n_layer, stages) == expected


@pytest.mark.parametrize("stages", [0, 5])
def test_stage_layer_ranges_refuses_impossible_splits(stages):
    with pytest.raises(ValueError, match="--stages"):
        stage_layer_ranges(4, stages)


@pytest.mark.parametrize(
    "replicas, requested, expected",
    [
        ([], -1, 0),                                                  # first peer: stage 0
        ([Replica(0, 0)], -1, 1),                                     # an empty stage first
        ([Replica(0, 0), Replica(1, 0)], -1, 0),                      # tie: lowest index
        ([Replica(0, 0), Replica(1, 0), Replica(0, 0)], -1, 1),
        ([Replica(0, 5.0), Replica(1, 1.0)], -1, 1),                  # weakest total throughput
        ([Replica(0, 1.0), Replica(0, 1.0), Replica(1, 5.0)], -1, 0),  # by throughput, not by count
        ([Replica(0, 4.0), Replica(1, 0.0)], -1, 0),                  # unmeasured weighs as the median (4.0): a tie, lower index
        ([Replica(0, 1.0)], 0, 0),                                    # an explicit request wins
        ([], 7, 0),                                                   # an impossible request is ignored
    ],
)
def test_choose_stage(replicas, requested, expected):
    assert choose_stage(replicas, 2, requested) == expected


def test_next_hop_skips_banned_and_weights_by_throughput():
    rng = random.Random(0)
    candidates = {"a": 9.0, "b": 1.0, "c": 0.0}
    picks = [choose_next_hop(candidates, {}, 0.0, rng) for _ in range(2000)]
    # "c" is unmeasured and weighs as the (upper) median of [1, 9], 9: a 9/19, b 1/19, c 9/19.
    assert 0.42 < picks.count("a") / 2000 < 0.53
    assert 0.02 < picks.count("b") / 2000 < 0.09
    assert choose_next_hop(candidates, {"a": 10.0, "b": 10.0}, 5.0, rng) == "c"
    assert choose_next_hop(candidates, {"a": 10.0, "b": 10.0, "c": 10.0}, 5.0, rng) is None
    assert choose_next_hop(candidates, {"a": 1.0, "b": 1.0, "c": 1.0}, 5.0, rng) is not None  # bans expired
    assert choose_next_hop({}, {}, 0.0, rng) is None
