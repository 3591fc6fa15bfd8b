"""Forward audits judged at the coordinator: tolerance by precision, who an audit concerns, and who gets flagged."""

from __future__ import annotations

import random

from coordinator.audits import FLAG_AFTER, judge, tally_key, to_flag
from proto import hometrain_pb2 as pb
from proto.run_config import TrainConfig


def audit(first, second, first_loss=100.0, second_loss=100.0, tokens=(64, 64)) -> pb.Audit:
    return pb.Audit(first_route=first, second_route=second, first_loss=first_loss, second_loss=second_loss,
                    first_tokens=tokens[0], second_tokens=tokens[1])


def test_the_tolerance_follows_the_precision_in_use():
    exact, bf16, compressed = TrainConfig(), TrainConfig(compute_dtype="bfloat16"), TrainConfig(activation_compression="aqsgd")
    assert exact.losses_agree(100.0, 64, 100.005, 64) and not exact.losses_agree(100.0, 64, 100.05, 64)
    assert bf16.losses_agree(100.0, 64, 101.0, 64) and not bf16.losses_agree(100.0, 64, 103.0, 64)
    assert compressed.losses_agree(100.0, 64, 104.0, 64) and not compressed.losses_agree(100.0, 64, 150.0, 64)
    assert not exact.losses_agree(100.0, 64, 100.0, 63), "different token counts are not the same microbatch"
    assert not exact.losses_agree(float("nan"), 64, 100.0, 64)
    assert TrainConfig(audit_tolerance=0.5).losses_agree(100.0, 64, 140.0, 64)


def test_an_audit_concerns_the_peers_that_differ_between_its_routes_but_never_its_reporter():
    train = TrainConfig()
    verdict = judge(audit(["s0", "a1", "a2"], ["b0", "a1", "b2"], second_loss=120.0), train, reporter="s0")
    assert not verdict.agreed
    assert set(verdict.concerned) == {("b0", "second"), ("a2", "first"), ("b2", "second")}  # not a1 (on both), not s0 (reporter)
    assert judge(audit(["s0", "a1"], ["s0"]), train, "s0") is None  # routes of different lengths: not comparable
    assert judge(audit([], []), train, "s0") is None


def simulate(replicas: int, audits: int, seed: int, lies_in: str = "first") -> dict[str, str]:
    """A 2-stage swarm, one stage-0 reporter; ``replicas`` at stage 1, one of them ('bad') skewing its training forwards
    only (``lies_in`` first) or its audit answers only (second). Every audit pairs two different stage-1 replicas at
    random; returns whom the coordinator flags, and in which position."""
    rng, train = random.Random(seed), TrainConfig()
    stage1 = ["bad"] + [f"h{i}" for i in range(1, replicas)]
    stage_of = {"s0": 0, **{p: 1 for p in stage1}}
    tallies: dict[str, dict[str, int]] = {p: {} for p in stage_of}
    flagged: dict[str, str] = {}
    for _ in range(audits):
        x, y = rng.sample(stage1, 2)
        liar = x if lies_in == "first" else y
        verdict = judge(audit(["s0", x], ["s0", y], second_loss=150.0 if liar == "bad" else 100.0), train, "s0")
        for peer, position in verdict.concerned:
            key = tally_key(position, verdict.agreed)
            tallies[peer][key] = tallies[peer].get(key, 0) + 1
        flagged.update({p: pos for p, pos in to_flag(tallies, stage_of.get).items() if p not in flagged})
    return flagged


def test_a_peer_that_skews_its_forwards_is_flagged_and_honest_ones_are_not():
    for lies_in in ("first", "second"):
        runs = [simulate(3, 200, seed, lies_in) for seed in range(200)]
        assert all(run.get("bad") == lies_in for run in runs), lies_in
        false = sum(len(set(run) - {"bad"}) for run in runs)
        assert false <= 2 * len(runs) * 2 * 2**-FLAG_AFTER, f"{false} honest peers flagged over {len(runs)} runs ({lies_in})"
        assert all(set(simulate(5, 300, seed, lies_in)) == {"bad"} for seed in range(20))


def test_with_two_replicas_of_a_stage_nobody_is_flagged():
    """Every audit pits the two against each other: the bad one cannot be told from the honest one it would drag down."""
    assert all(simulate(2, 200, seed, lies_in) == {} for seed in range(20) for lies_in in ("first", "second"))
