"""UL2 denoisers: span statistics, exact reconstruction, row layout and leak-free loss masks."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.data import ul2
from coordinator.data.corpus import builtin_documents
from coordinator.data.tokenizer import train_tokenizer
from coordinator.data.ul2 import (
    Denoiser, PackedSample, UL2Config, UL2Vocab, make_ul2_sample, reconstruct, source_length, span_corrupt,
)

EOS = 0
VOCAB = UL2Vocab(eos_id=EOS, sentinel_ids=np.arange(5000, 5100), mode_ids={"[NLU]": 6000, "[NLG]": 6001, "[S2S]": 6002})


def text(rng: np.random.Generator, length: int) -> np.ndarray:
    return rng.integers(1, 4000, size=length)


def split_targets(targets: np.ndarray) -> list[np.ndarray]:
    """The spans of span_corrupt's targets, sentinels and EOS removed."""
    body = targets[:-1]
    starts = np.flatnonzero(np.isin(body, VOCAB.sentinel_ids))
    return [span[1:] for span in np.split(body, starts[1:])]


@pytest.mark.parametrize("mean_span, rate", [(3, 0.15), (8, 0.15), (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5), (12, 0.3)])
def test_measured_corruption_rate_and_mean_span_match_the_configuration(mean_span, rate):
    rng = np.random.default_rng(1)
    noise = length_total = spans = 0
    span_lengths, first_half = [], 0
    for _ in range(200):
        length = int(rng.integers(1500, 4000))
        tokens = text(rng, length)
        inputs, targets = span_corrupt(tokens, mean_span, rate, rng, VOCAB)
        pieces = split_targets(targets)
        in_sentinels = int(np.isin(inputs, VOCAB.sentinel_ids).sum())
        assert in_sentinels == len(pieces)
        noise += sum(map(len, pieces))
        length_total += length
        spans += len(pieces)
        span_lengths += list(map(len, pieces))
        # where the noise is: each sentinel of the inputs stands for its span's tokens
        is_sentinel = np.isin(inputs, VOCAB.sentinel_ids)
        widths = np.ones(len(inputs), dtype=np.int64)
        widths[is_sentinel] = list(map(len, pieces))
        mask = np.repeat(is_sentinel, widths)
        assert len(mask) == length
        first_half += int(mask[: length // 2].sum())
    assert noise / length_total == pytest.approx(rate, rel=0.1)
    assert noise / spans == pytest.approx(mean_span, rel=0.1)
    assert first_half / noise == pytest.approx(0.5, abs=0.05)  # spans spread over the whole text
    if mean_span > 1:
        assert np.std(span_lengths) > 0.3 * mean_span  # random lengths, not all equal


def test_inputs_and_targets_recover_the_original_tokens():
    rng = np.random.default_rng(2)
    for trial in range(500):
        length = int(rng.integers(2, 3000)) if trial % 5 else int(rng.integers(2, 6))
        mean_span = float(rng.choice([1, 2, 3, 8, 64]))
        rate = float(rng.uniform(0.05, 0.95))
        tokens = text(rng, length)
        inputs, targets = span_corrupt(tokens, mean_span, rate, rng, VOCAB)
        assert targets[-1] == EOS
        assert len(inputs) < len(tokens) + len(split_targets(targets)) + 1
        np.testing.assert_array_equal(reconstruct(inputs, targets, VOCAB), tokens)


def test_more_spans_than_sentinels_reuse_them_in_order():
    rng = np.random.default_rng(3)
    inputs, targets = span_corrupt(text(rng, 3000), 3, 0.5, rng, VOCAB)
    used = inputs[np.isin(inputs, VOCAB.sentinel_ids)]
    assert len(used) == 500
    np.testing.assert_array_equal(used, VOCAB.sentinel_ids[np.arange(500) % 100])
    np.testing.assert_array_equal(targets[np.isin(targets, VOCAB.sentinel_ids)], used)


def test_reconstruct_rejects_mismatched_parts():
    rng = np.random.default_rng(4)
    inputs, targets = span_corrupt(text(rng, 100), 3, 0.15, rng, VOCAB)
    with pytest.raises(ValueError, match="EOS"):
        reconstruct(inputs, targets[:-1], VOCAB)
    with pytest.raises(ValueError, match="sentinels"):
        reconstruct(inputs[: int(np.flatnonzero(np.isin(inputs, VOCAB.sentinel_ids))[1])], targets, VOCAB)


def loss_positions(sample: PackedSample) -> np.ndarray:
    """Model positions t (predicting tokens[t + 1]) that carry loss."""
    return np.flatnonzero(sample.target_mask[1:])


@pytest.mark.parametrize("seq_len", [8, 64, 511, 2048])
def test_every_denoiser_fits_the_row_and_never_puts_loss_on_a_visible_label(seq_len):
    rng = np.random.default_rng(5)
    config = UL2Config()
    for denoiser, _ in config.denoisers:
        budget = source_length(denoiser, seq_len)
        for _ in range(20):
            source = text(rng, budget + 50)
            sample = make_ul2_sample(source, denoiser, rng, VOCAB, seq_len)
            n, p = len(sample.tokens), sample.prefix_length
            assert n <= seq_len + 1
            assert sample.tokens[0] == VOCAB.mode_ids[denoiser.mode_token]
            # position t sees tokens[j] for all j < p, and predicts tokens[t + 1]: only t >= p - 1 is leak-free
            positions = loss_positions(sample)
            assert positions.min() == p - 1 and positions.max() == n - 2
            np.testing.assert_array_equal(positions, np.arange(p - 1, n - 1))  # every target token, nothing else
            if denoiser.name == "S":
                np.testing.assert_array_equal(sample.tokens[1:], source[:budget])
            else:
                inputs, targets = sample.tokens[1:p], sample.tokens[p:]
                np.testing.assert_array_equal(reconstruct(inputs, targets, VOCAB), source[:budget])
        if seq_len == 2048 and denoiser.name != "S":
            assert seq_len + 1 - n < 8  # the source length leaves almost no padding


def test_s_denoiser_splits_within_its_documented_range():
    rng = np.random.default_rng(6)
    s = Denoiser("S", "[S2S]", split_range=(0.25, 0.75))
    seen = []
    for _ in range(400):
        sample = make_ul2_sample(text(rng, 1000), s, rng, VOCAB, 400)
        assert len(sample.tokens) == 401 and sample.tokens[0] == 6002
        split = sample.prefix_length - 1  # source tokens in the prefix
        assert round(0.25 * 400) <= split <= round(0.75 * 400)
        assert sample.loss_tokens == 400 - split
        seen.append(split)
    assert min(seen) < 120 and max(seen) > 280  # uses the whole range
    tiny = make_ul2_sample(np.array([7, 8]), s, rng, VOCAB, 400)
    assert tiny.prefix_length == 2 and tiny.loss_tokens == 1


def test_source_length_is_the_largest_that_fits():
    for denoiser, _ in UL2Config().denoisers:
        for seq_len in (8, 100, 2048):
            length = source_length(denoiser, seq_len)
            assert ul2._row_length(length, denoiser) <= seq_len + 1 < ul2._row_length(length + 1, denoiser)
    with pytest.raises(ValueError, match="too short"):
        source_length(Denoiser("R", "[NLU]", 3, 0.15), 3)


def test_packed_sample_refuses_loss_inside_the_prefix():
    tokens = np.arange(10)
    mask = np.zeros(10, bool)
    mask[4:] = True
    PackedSample(tokens, 4, mask)
    with pytest.raises(ValueError, match="leak"):
        PackedSample(tokens, 5, mask)
    mask[0] = True
    with pytest.raises(ValueError, match="leak"):
        PackedSample(tokens, 0, mask)


def test_configuration_errors_say_what_was_received():
    with pytest.raises(ValueError, match="mean_span=3"):
        Denoiser("S", "[S2S]", mean_span=3)
    with pytest.raises(ValueError, match="mean_span 0.5"):
        Denoiser("R", "[NLU]", 0.5, 0.15)
    with pytest.raises(ValueError, match="corruption_rate 1.5"):
        Denoiser("X", "[NLG]", 3, 1.5)
    with pytest.raises(ValueError, match="'Q'"):
        Denoiser("Q", "[Q]", 3, 0.15)
    with pytest.raises(ValueError, match="unique"):
        UL2Config(((Denoiser("R", "[NLU]", 3, 0.15), 1.0), (Denoiser("R", "[NLU]", 3, 0.15), 1.0)))
    with pytest.raises(ValueError, match="sum to 0"):
        UL2Config(((Denoiser("S", "[S2S]"), 0.0),))
    with pytest.raises(ValueError, match="num_sentinels 0"):
        UL2Config(num_sentinels=0)


def test_default_mixture_and_configurable_shares():
    config = UL2Config()
    labels = [d.label for d, _ in config.denoisers]
    assert labels == ["R(3,0.15)", "R(8,0.15)", "X(3,0.5)", "X(8,0.5)", "X(64,0.15)", "X(64,0.5)", "S"]
    np.testing.assert_allclose(config.shares, [0.125, 0.125, 0.0625, 0.0625, 0.0625, 0.0625, 0.5])
    only_r = UL2Config.with_shares(r=1, x=0, s=0)
    assert {d.name for d, _ in only_r.denoisers} == {"R"}


def test_special_tokens_reach_the_tokenizer_as_single_ids():
    tokens = ul2.special_tokens()
    assert tokens[:3] == ["[NLU]", "[NLG]", "[S2S]"] and tokens[3] == "<extra_id_0>" and tokens[-1] == "<extra_id_99>"
    assert len(set(tokens)) == len(tokens) == 103 and tuple(tokens) == ul2.SPECIAL_TOKENS
    tokenizer = train_tokenizer(builtin_documents()[:100], 400)
    with pytest.raises(ValueError, match="lacks 103 UL2 special tokens"):
        UL2Vocab.from_tokenizer(tokenizer)
    assert ul2.add_ul2_tokens(tokenizer) == 103
    vocab = UL2Vocab.from_tokenizer(tokenizer)
    assert vocab.eos_id == tokenizer.eos_token_id
    encoded = tokenizer("x [NLG] <extra_id_7> y", add_special_tokens=False)["input_ids"]
    assert vocab.mode_ids["[NLG]"] in encoded and vocab.sentinel_ids[7] in encoded
