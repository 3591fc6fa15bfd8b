"""UL2's mixture of denoisers, laid out for a decoder-only (prefix-LM) model.

UL2 (Tay et al., 2022) trains one model on three kinds of denoising so that it learns both to
fill in and to continue text: R (regular span corruption: short spans, 15% of the text),
X (extreme: long spans and/or half of the text hidden) and S (sequential: a prefix LM). A
mode token at the start of each sample names its kind, so the model can be steered later.

Layout of one sample, a row of at most ``seq_len + 1`` tokens (the model reads ``row[:-1]``
and predicts ``row[1:]``)::

    [mode] inputs ...              | targets ...
    <------ prefix: P tokens ------>

R and X: ``inputs`` is the source text with each noise span replaced by a sentinel;
``targets`` is each sentinel followed by the tokens it hid, then EOS (T5's format). S:
``inputs`` is the first part of the text and ``targets`` the rest. Positions ``[0, P)``
attend to each other bidirectionally; everything after is causal.

Which positions carry loss: position ``t`` predicts ``row[t + 1]`` and, through the prefix,
sees every ``row[j]`` with ``j < P``. So a position ``t < P - 1`` could read its own label,
and only ``t >= P - 1`` are leak-free. Loss is on exactly ``t = P - 1 ... len(row) - 2``,
i.e. on the target tokens ``row[P:]``; never on a prefix token, never on padding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

DENOISER_NAMES = ("R", "X", "S")
DEFAULT_MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}
SENTINEL_FORMAT = "<extra_id_{}>"


@dataclass(frozen=True)
class Denoiser:
    """One denoising task: span corruption (R, X) or prefix LM (S).

    ``mean_span`` and ``corruption_rate`` are T5's mean noise-span length and noise density;
    S has no spans (leave both 0) and splits the text at a point drawn uniformly from
    ``split_range`` (fractions of the source length that go to the prefix).
    """

    name: str
    mode_token: str
    mean_span: float = 0.0
    corruption_rate: float = 0.0
    split_range: tuple[float, float] = (0.2, 0.8)

    def __post_init__(self) -> None:
        if self.name not in DENOISER_NAMES:
            raise ValueError(f"denoiser name {self.name!r} is not one of {DENOISER_NAMES}")
        if not self.mode_token:
            raise ValueError(f"denoiser {self.name} needs a mode token such as {DEFAULT_MODE_TOKENS[self.name]!r}")
        if self.name == "S":
            if self.mean_span or self.corruption_rate:
                raise ValueError(
                    f"the S denoiser is a prefix LM without spans, got mean_span={self.mean_span}, "
                    f"corruption_rate={self.corruption_rate}; leave both 0 and set split_range instead"
                )
            low, high = self.split_range
            if not 0.0 < low <= high < 1.0:
                raise ValueError(f"S denoiser split_range {self.split_range} must satisfy 0 < low <= high < 1")
        else:
            if not np.isfinite(self.mean_span) or self.mean_span < 1:
                raise ValueError(f"denoiser {self.name}: mean_span {self.mean_span} must be a number of tokens >= 1")
            if not 0.0 < self.corruption_rate < 1.0:
                raise ValueError(f"denoiser {self.name}: corruption_rate {self.corruption_rate} must be in (0, 1)")

    @property
    def label(self) -> str:
        """Short unique name for statistics and sample ids, e.g. ``R(3,0.15)`` or ``S``."""
        if self.name == "S":
            return "S"
        return f"{self.name}({self.mean_span:g},{self.corruption_rate:g})"


def default_denoisers(r: float = 0.25, x: float = 0.25, s: float = 0.5) -> tuple[tuple[Denoiser, float], ...]:
    """UL2's mixture: R = spans of mean 3 and 8 at 15%; X = mean 3 and 8 at 50%, mean 64 at
    15% and 50%; S = prefix LM. ``r``, ``x``, ``s`` are the shares of each family, split
    evenly across its members."""
    for family, share in (("r", r), ("x", x), ("s", s)):
        if not np.isfinite(share) or share < 0:
            raise ValueError(f"share {family}={share} must be a finite number >= 0")
    modes = DEFAULT_MODE_TOKENS
    r_members = [Denoiser("R", modes["R"], 3, 0.15), Denoiser("R", modes["R"], 8, 0.15)]
    x_members = [
        Denoiser("X", modes["X"], 3, 0.5), Denoiser("X", modes["X"], 8, 0.5),
        Denoiser("X", modes["X"], 64, 0.15), Denoiser("X", modes["X"], 64, 0.5),
    ]
    mixture = [(d, r / len(r_members)) for d in r_members] + [(d, x / len(x_members)) for d in x_members]
    mixture.append((Denoiser("S", modes["S"]), s))
    return tuple((d, share) for d, share in mixture if share > 0)


@dataclass(frozen=True)
class UL2Config:
    """Denoisers with their sampling shares (normalized when used) and the sentinel count.

    Sentinels are named ``<extra_id_0>`` ... like T5's. A sample with more noise spans than
    sentinels reuses them cyclically (span ``i`` gets sentinel ``i % num_sentinels``): spans
    stay in order in both inputs and targets, so the pairing is still unambiguous. At
    seq_len 2048 the X(3,0.5) denoiser makes about 256 spans, so 256+ sentinels avoid reuse.
    """

    denoisers: tuple[tuple[Denoiser, float], ...] = field(default_factory=default_denoisers)
    num_sentinels: int = 100

    def __post_init__(self) -> None:
        if not self.denoisers:
            raise ValueError("UL2Config needs at least one (Denoiser, share) pair; see default_denoisers()")
        labels = []
        for entry in self.denoisers:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], Denoiser)):
                raise ValueError(f"UL2Config.denoisers entries must be (Denoiser, share) pairs, got {entry!r}")
            denoiser, share = entry
            if not np.isfinite(share) or share < 0:
                raise ValueError(f"share {share} of denoiser {denoiser.label} must be a finite number >= 0")
            labels.append(denoiser.label)
        if len(set(labels)) != len(labels):
            raise ValueError(f"denoiser labels must be unique, got {labels}; merge duplicates by adding their shares")
        if sum(share for _, share in self.denoisers) <= 0:
            raise ValueError(f"denoiser shares {[s for _, s in self.denoisers]} sum to 0; give at least one a positive share")
        if not isinstance(self.num_sentinels, int) or self.num_sentinels < 1:
            raise ValueError(f"num_sentinels {self.num_sentinels!r} must be an integer >= 1 (T5 uses 100)")
        clash = set(self.mode_tokens) & set(self.sentinel_tokens)
        if clash:
            raise ValueError(f"mode tokens {sorted(clash)} collide with sentinel names; pick other mode tokens")

    @classmethod
    def with_shares(cls, r: float = 0.25, x: float = 0.25, s: float = 0.5, num_sentinels: int = 100) -> "UL2Config":
        """The default denoisers with other family shares."""
        return cls(default_denoisers(r, x, s), num_sentinels)

    @property
    def shares(self) -> np.ndarray:
        """Normalized sampling probabilities, in the order of ``denoisers``."""
        raw = np.array([share for _, share in self.denoisers], dtype=np.float64)
        return raw / raw.sum()

    @property
    def mode_tokens(self) -> list[str]:
        """Distinct mode tokens in first-use order."""
        return list(dict.fromkeys(d.mode_token for d, _ in self.denoisers))

    @property
    def sentinel_tokens(self) -> list[str]:
        return [SENTINEL_FORMAT.format(i) for i in range(self.num_sentinels)]


def special_tokens(config: UL2Config | None = None) -> list[str]:
    """Mode tokens, then sentinels: the strings the tokenizer must hold as single special tokens."""
    config = config or UL2Config()
    return config.mode_tokens + config.sentinel_tokens


SPECIAL_TOKENS: tuple[str, ...] = tuple(special_tokens())


def add_ul2_tokens(tokenizer: Any, config: UL2Config | None = None) -> int:
    """Add the UL2 special tokens to a Hugging Face tokenizer (new ids go after its vocabulary);
    returns how many were new. Prefer training the tokenizer with them (stable, in-vocab ids)."""
    tokens = special_tokens(config)
    existing = [t for t in (getattr(tokenizer, "additional_special_tokens", None) or []) if t not in tokens]
    return tokenizer.add_special_tokens({"additional_special_tokens": existing + tokens})


@dataclass(frozen=True, eq=False)
class UL2Vocab:
    """The token ids span corruption needs: EOS, sentinels (in order) and mode tokens."""

    eos_id: int
    sentinel_ids: np.ndarray
    mode_ids: Mapping[str, int]

    def __post_init__(self) -> None:
        sentinels = np.asarray(self.sentinel_ids, dtype=np.int64)
        if sentinels.ndim != 1 or len(sentinels) < 1:
            raise ValueError(f"sentinel_ids must be a non-empty list of ids, got shape {sentinels.shape}")
        if len(np.unique(sentinels)) != len(sentinels) or self.eos_id in sentinels:
            raise ValueError("sentinel ids must be distinct and differ from the EOS id")
        object.__setattr__(self, "sentinel_ids", sentinels)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, config: UL2Config | None = None) -> "UL2Vocab":
        """Look the tokens up; fails, naming them, if the tokenizer lacks any."""
        config = config or UL2Config()
        vocab = tokenizer.get_vocab()
        missing = [t for t in special_tokens(config) if t not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer lacks {len(missing)} UL2 special tokens (first: {missing[:3]}); train it with "
                "coordinator.data.ul2.special_tokens() as special tokens or call coordinator.data.ul2.add_ul2_tokens(tokenizer)"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; UL2 targets end with EOS")
        return cls(
            eos_id=int(tokenizer.eos_token_id),
            sentinel_ids=np.array([vocab[t] for t in config.sentinel_tokens], dtype=np.int64),
            mode_ids={t: int(vocab[t]) for t in config.mode_tokens},
        )


@dataclass(frozen=True, eq=False)
class PackedSample:
    """One training row before padding.

    ``tokens`` holds 2 to ``seq_len + 1`` ids; the model reads ``tokens[:-1]`` and predicts
    ``tokens[1:]``. ``target_mask[i]`` says that ``tokens[i]`` is a predicted token that
    carries loss (so the row's loss mask is ``target_mask[1:]``). Positions ``[0,
    prefix_length)`` are bidirectional, so no token inside the prefix may carry loss.
    """

    tokens: np.ndarray
    prefix_length: int
    target_mask: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n < 2 or len(self.target_mask) != n:
            raise ValueError(
                f"a sample needs >= 2 tokens and a target_mask of the same length, got {n} and {len(self.target_mask)}"
            )
        if not 0 <= self.prefix_length <= n - 1:
            raise ValueError(f"prefix_length {self.prefix_length} must be in [0, {n - 1}] for a sample of {n} tokens")
        if self.target_mask[: max(1, self.prefix_length)].any():
            raise ValueError("loss on a token inside the bidirectional prefix (or on the first token) would leak its label")

    @classmethod
    def prefix_lm(cls, tokens: np.ndarray, prefix_length: int) -> "PackedSample":
        """A prefix-LM row: bidirectional over ``tokens[:prefix_length]``, loss on all that follows."""
        tokens = np.asarray(tokens, dtype=np.int64)
        mask = np.zeros(len(tokens), dtype=bool)
        mask[max(1, prefix_length):] = True
        return cls(tokens, prefix_length, mask)

    @property
    def loss_tokens(self) -> int:
        return int(self.target_mask.sum())


def _span_counts(length: int, mean_span: float, rate: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a text of ``length`` tokens, as T5 computes them."""
    num_noise = min(max(int(round(length * rate)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``num_items`` into ``num_segments`` non-empty parts."""
    if num_segments == 1:
        return np.array([num_items], dtype=np.int64)
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(cuts, prepend=0, append=num_items).astype(np.int64)


def noise_span_lengths(length: int, mean_span: float, rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random span layout: (kept-run lengths, noise-span lengths), ``k + 1`` and ``k`` of them.

    The text reads kept[0], noise[0], kept[1], ..., noise[k-1], kept[k]. As in T5,
    ``round(length * rate)`` tokens become noise, in ``round(noise / mean_span)`` spans whose
    lengths are a uniformly random segmentation (mean ``mean_span`` up to rounding). Unlike
    T5, which always starts with kept text and ends on a noise span, the first and last kept
    runs may be empty, so noise is spread evenly over the text (the end of the inputs is not
    always a sentinel).
    """
    if length < 2:
        raise ValueError(f"span corruption needs >= 2 tokens, got {length}")
    num_noise, num_spans = _span_counts(length, mean_span, rate)
    kept = _random_segmentation(length - num_noise + 2, num_spans + 1, rng)
    kept[[0, -1]] -= 1  # the two outer runs may be empty; inner runs keep >= 1 token
    return kept, _random_segmentation(num_noise, num_spans, rng)


def span_corrupt(
    tokens: np.ndarray, mean_span: float, rate: float, rng: np.random.Generator, vocab: UL2Vocab
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption: (inputs, targets).

    ``inputs`` is ``tokens`` with each noise span replaced by one sentinel; ``targets`` is,
    for each span in order, its sentinel followed by the span's tokens, then EOS.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    kept, noise = noise_span_lengths(len(tokens), mean_span, rate, rng)
    spans = len(noise)
    sentinels = vocab.sentinel_ids[np.arange(spans) % len(vocab.sentinel_ids)]
    segments = np.empty(2 * spans + 1, dtype=np.int64)
    segments[0::2], segments[1::2] = kept, noise
    is_noise = np.repeat(np.arange(2 * spans + 1) % 2 == 1, segments)
    noise_starts = (np.cumsum(segments) - segments)[1::2]

    marked = tokens.copy()
    marked[noise_starts] = sentinels
    keep = ~is_noise
    keep[noise_starts] = True
    inputs = marked[keep]

    targets = np.empty(int(noise.sum()) + spans + 1, dtype=np.int64)
    sentinel_at = np.zeros(len(targets) - 1, dtype=bool)
    sentinel_at[np.cumsum(noise) - noise + np.arange(spans)] = True
    body = targets[:-1]
    body[sentinel_at] = sentinels
    body[~sentinel_at] = tokens[is_noise]
    targets[-1] = vocab.eos_id
    return inputs, targets


def reconstruct(inputs: np.ndarray, targets: np.ndarray, vocab: UL2Vocab) -> np.ndarray:
    """The original tokens from ``span_corrupt``'s (inputs, targets): the inverse, for checks."""
    inputs = np.asarray(inputs, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0 or targets[-1] != vocab.eos_id:
        raise ValueError("targets must end with EOS")
    body = targets[:-1]
    in_at = np.flatnonzero(np.isin(inputs, vocab.sentinel_ids))
    out_at = np.flatnonzero(np.isin(body, vocab.sentinel_ids))
    if len(in_at) != len(out_at) or (len(body) and (len(out_at) == 0 or out_at[0] != 0)):
        raise ValueError(f"inputs hold {len(in_at)} sentinels but targets {len(out_at)} spans (or targets do not start with one)")
    if not np.array_equal(inputs[in_at], body[out_at]):
        raise ValueError("the sentinels of inputs and targets are not in the same order")
    spans = np.split(body, out_at[1:]) if len(body) else []
    pieces = np.split(inputs, in_at)
    parts = [pieces[0]]
    for span, piece in zip(spans, pieces[1:]):
        parts += [span[1:], piece[1:]]
    return np.concatenate(parts)


def _row_length(length: int, denoiser: Denoiser) -> int:
    """Tokens in the row made from a source of ``length`` tokens."""
    if denoiser.name == "S":
        return 1 + length
    _, spans = _span_counts(length, denoiser.mean_span, denoiser.corruption_rate)
    return 1 + (length + spans) + (spans + 1)  # mode + inputs (text - noise + sentinels) + targets (noise + sentinels + EOS)


@functools.lru_cache(maxsize=256)
def source_length(denoiser: Denoiser, seq_len: int) -> int:
    """Most source-text tokens one sample of ``denoiser`` can use so its row fits ``seq_len + 1``.

    S: ``seq_len`` (mode token + text fill the row exactly). R/X: ``L`` with
    ``L + 2 * spans(L) + 2 <= seq_len + 1``; a few tokens of the row may stay as padding.
    """
    budget = seq_len + 1
    if denoiser.name == "S":
        length = budget - 1
    else:
        length = int((budget - 2) / (1 + 2 * denoiser.corruption_rate / denoiser.mean_span)) + 2
        while length > 2 and _row_length(length, denoiser) > budget:
            length -= 1
    if length < 2 or _row_length(length, denoiser) > budget:
        raise ValueError(f"seq_len {seq_len} is too short for a {denoiser.label} sample; use seq_len >= 8")
    return length


def make_ul2_sample(
    tokens: np.ndarray, denoiser: Denoiser, rng: np.random.Generator, vocab: UL2Vocab, seq_len: int
) -> PackedSample:
    """One UL2 row from source text (see the module docstring for the layout).

    Only the first ``source_length(denoiser, seq_len)`` tokens are used, so the row always
    fits ``seq_len + 1``. S splits the text so that the prefix gets a fraction drawn
    uniformly from ``denoiser.split_range`` (at least one token on each side).
    """
    source = np.asarray(tokens, dtype=np.int64)[: source_length(denoiser, seq_len)]
    if len(source) < 2:
        raise ValueError(f"a UL2 sample needs >= 2 source tokens, got {len(source)}")
    mode = np.array([vocab.mode_ids[denoiser.mode_token]], dtype=np.int64)
    if denoiser.name == "S":
        low, high = denoiser.split_range
        split = min(max(int(round(rng.uniform(low, high) * len(source))), 1), len(source) - 1)
        return PackedSample.prefix_lm(np.concatenate([mode, source]), 1 + split)
    inputs, targets = span_corrupt(source, denoiser.mean_span, denoiser.corruption_rate, rng, vocab)
    return PackedSample.prefix_lm(np.concatenate([mode, inputs, targets]), 1 + len(inputs))
