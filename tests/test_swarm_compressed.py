"""2 stages x 2 replicas with every compression on: bytes shrink, replicas still agree after each sync."""

from __future__ import annotations

import math

import pytest

from proto.schedule import skips_sync

from .swarm import Swarm

pytestmark = pytest.mark.swarm
ROUNDS = 12


def train(tmp_path, rounds: int, *flags: str) -> tuple[list[dict], dict]:
    """2 stages x 2 replicas for ``rounds``; the round records and the final status."""
    swarm = Swarm(tmp_path / "run", "--stages", "2", "--rounds", str(rounds), "--checkpoint-every", "6", "--linger", *flags)
    try:
        for _ in range(4):
            swarm.add_peer("--serve-after-run")
        swarm.wait_for(lambda: swarm.status()["round"] >= rounds, 300, f"{rounds} rounds")
        swarm.wait_for(lambda: swarm.status()["wire"]["sync"]["bytes"] > 0, 30, "byte counters")
        return swarm.rounds(), swarm.status()
    finally:
        swarm.stop()


def test_compressed_swarm_trains_with_identical_replicas_after_each_sync(tmp_path):
    flags = ["--activation-compression", "aqsgd", "--activation-bits", "2", "--activation-first-bits", "4", "--gradient-bits", "8",
             "--sync-compression", "cocktail", "--p-skip", "0.5", "--resync-every", "4"]
    rounds, status = train(tmp_path, ROUNDS, *flags)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["dropped"] == 0 and r["loss"] is not None and math.isfinite(r["loss"]) for r in rounds)
    skipped = {(r["round"], s) for r in rounds for s in r["diverged_stages"]}
    for r in rounds:
        for stage in (0, 1):
            expected_skip = skips_sync(0, r["round"], stage, 0.5) and r["round"] % 4 != 0
            if (r["round"], stage) in skipped:
                assert expected_skip, f"round {r['round']} stage {stage} diverged without a scheduled skip"
            checksums = r["checksums"].get(str(stage), [])
            assert len(set(checksums)) <= 1, f"round {r['round']} stage {stage}: replicas differ after a sync {checksums}"
    assert skipped, "no round skipped its sync with --p-skip 0.5"
    assert any(len(r["checksums"].get("0", [])) == 2 for r in rounds), "stage 0 never synced two replicas"
    wire = status["wire"]
    ratio = {k: wire[k]["uncompressed_bytes"] / wire[k]["bytes"] for k in ("activations", "gradients", "sync")}
    assert ratio["sync"] > 100, ratio
    assert ratio["activations"] > 4 and ratio["gradients"] > 3, ratio


def test_cocktail_warmup_sums_exactly_then_compresses(tmp_path):
    """Rounds 1-3 sum gradients exactly (never skipped, fp32 on the wire); later rounds send
    compressed deltas from the weights the warm-up agreed on, and replicas still agree."""
    warmup, total = 3, 7
    rounds, status = train(tmp_path, total, "--min-replicas", "2", "--sync-compression", "cocktail",
                           "--sync-warmup-rounds", str(warmup), "--p-skip", "0.5")
    assert all(r["dropped"] == 0 and math.isfinite(r["loss"]) for r in rounds)
    would_skip = {(r, s) for r in range(1, total + 1) for s in (0, 1) if skips_sync(0, r, s, 0.5)}
    assert any(r <= warmup for r, _ in would_skip), "the schedule skips no warm-up round: the test proves nothing"
    skipped = {(r["round"], s) for r in rounds for s in r["diverged_stages"]}
    assert skipped == {(r, s) for r, s in would_skip if r > warmup}
    for r in rounds:
        for stage in (0, 1):
            if (r["round"], stage) not in skipped:
                checksums = r["checksums"].get(str(stage), [])
                assert len(checksums) == 2 and len(set(checksums)) == 1, f"round {r['round']} stage {stage}: {checksums}"
    moved = {r["checksums"]["0"][0] for r in rounds if r["round"] <= warmup}
    assert len(moved) == warmup, "the agreed weights (what checkpoints carry) did not follow the warm-up's steps"
    # An exact round and a compressed one stand for the same fp32 bytes; the exact ones cost
    # them in full, the compressed ones next to nothing (>= 100x).
    exact, compressed = 2 * warmup, 2 * (total - warmup) - len(skipped)
    wire = status["wire"]["sync"]
    ratio = wire["uncompressed_bytes"] / wire["bytes"]
    assert (exact + compressed) / (exact + compressed / 100) < ratio <= (exact + compressed) / exact, (wire, exact, compressed)


def test_sparseloco_takes_local_steps_and_agrees_at_each_outer_step(tmp_path):
    """Every --sync-every rounds the replicas send their accumulators' top-k and take the outer step (their
    checksums agree, and the shared weights move); the rounds between are local steps (diverged by design).
    Global clipping runs through it all: each local step clips by the factor from every replica's norm."""
    every, total = 3, 9
    rounds, status = train(tmp_path, total, "--min-replicas", "2", "--sync-compression", "sparseloco", "--sync-every", str(every),
                           "--sync-bits", "2", "--clip-grad-norm", "0.5")
    assert [r["round"] for r in rounds] == list(range(1, total + 1))
    assert all(r["dropped"] == 0 and math.isfinite(r["loss"]) for r in rounds)
    for r in rounds:
        outer = r["round"] % every == 0
        assert sorted(r["diverged_stages"]) == ([] if outer else [0, 1]), f"round {r['round']}: {r['diverged_stages']}"
        if outer:
            for stage in ("0", "1"):
                assert len(r["checksums"][stage]) == 2 and len(set(r["checksums"][stage])) == 1, f"round {r['round']} stage {stage}"
        assert r["grad_norm"] is not None and r["grad_norm"] > 0
    shared = [r["checksums"]["0"][0] for r in rounds if r["round"] % every == 0]
    assert len(set(shared)) == len(shared), "the outer steps did not move the shared weights"
    sync = status["wire"]["sync"]
    assert sync["uncompressed_bytes"] / sync["bytes"] > 100, sync  # per sync; and only one round in three syncs
