"""Deterministic sampling: same (seed, round, index), same batch; epochs cover every window once."""

from __future__ import annotations

import torch

from coordinator.data import CausalWindows


def windows(seed=0):
    docs = [list(range(i * 50, i * 50 + 40)) for i in range(30)]
    return CausalWindows(docs, eos_id=9999, seq_len=8, seed=seed)


def test_same_round_and_index_give_the_same_batch_across_instances():
    a = windows().microbatch(5, 2, 4, 16)
    b = windows().microbatch(5, 2, 4, 16)
    assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
    assert windows(seed=1).microbatch(5, 2, 4, 16).sample_ids != a.sample_ids


def test_targets_are_inputs_shifted_and_masks_are_causal():
    mb = windows().microbatch(1, 0, 4, 16)
    assert torch.equal(mb.input_ids[:, 1:], mb.target_ids[:, :-1])
    assert mb.loss_tokens == 4 * 8 and mb.prefix_lengths.tolist() == [0, 0, 0, 0]


def test_an_epoch_visits_every_window_exactly_once():
    w = windows()
    n = len(w)
    per_round = 4
    ids = []
    r = 1
    while len(ids) < 2 * n:
        ids += w.microbatch(r, 0, per_round, per_round).sample_ids
        r += 1
    assert sorted(ids[:n]) == list(range(n))
    assert sorted(ids[n : 2 * n]) == list(range(n))
    assert ids[:n] != ids[n : 2 * n]  # a new permutation each epoch
