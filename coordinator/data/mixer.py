"""Training rows from several data sources, mixed by weight, with the objective scheduled by tokens seen.

Sources (``SourceConfig``): plain text or prompt/completion records, read from files or the
built-ins (``corpus`` prose, ``instructions`` records), tokenized
once when the mixer is built.

Schedule (``PhaseConfig``): phases run in order; a phase lasts while the tokens seen before
the round (as the caller counts them) are below its ``until_tokens``, an absolute count (0:
unbounded, last phase only). In a ``"ul2"`` phase text becomes UL2 denoising samples
(``ul2``, the denoiser drawn by its share); in a ``"causal"`` phase, plain LM
windows. Instruction records are the same in both phases: loss on the completion only.

Rows: every sample is one row of at most ``seq_len + 1`` tokens; shorter rows are padded
with EOS, loss 0.

* causal text: a source's documents are joined with EOS after each and cut into windows of
  ``seq_len + 1`` tokens. A window may span documents: attention crosses the boundary (the
  EOS marks it), as in GPT-J's own training; loss on every position, prefix 0.
* UL2 text: windows of the same stream, as long as the denoiser can use
  (``ul2.source_length``), one row each; a few positions may be padding.
* instructions (default, one record per row): the prompt is the bidirectional prefix
  (GPT-JT's bidirectional attention over the prompt), loss on completion + EOS. A record
  too long for the row loses the start of its prompt, and if the completion alone is too
  long, the end of the completion.
* instructions with ``pack_instructions=True``: consecutive records (each prompt +
  completion + EOS) fill the row; the row is causal (prefix 0), loss on completions only.
  No padding, at the price of the bidirectional prompt.

Determinism: sample ``b`` of microbatch ``(round, index)`` draws its source, variant and unit
from ``np.random.default_rng([seed, round, index, b])``, i.e. with replacement (no epochs),
independent of call order and restarts; it draws again if that sample is already in the
microbatch, so ids within a microbatch are distinct (they may repeat across microbatches).
The phase is a function of the tokens the caller passes. A unit's content (its UL2 corruption, say) comes from ``default_rng([seed, group,
unit])``, so one unit is always the same row.

Sample ids: ``group << 32 | unit``, where ``group`` is a 31-bit hash of (source name, variant
label, seq_len, seed): the same id means the same tokens in every epoch and after restarts,
as activation caching needs; ``describe()`` lists the groups.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from proto.run_config import BUILTIN_INSTRUCTIONS, BUILTIN_TEXT, PROMPT_COMPLETION, TEXT, SourceConfig

from .batch import Microbatch, MicrobatchInfo
from .corpus import builtin_documents
from .heldout import split_heldout
from .instructions import builtin_instruction_records
from .ul2 import Denoiser, PackedSample, UL2Config, UL2Vocab, make_ul2_sample, source_length

BUILTIN_INSTRUCTION_RECORDS = 10_000
CAUSAL = "causal"            # the sample label of a causal text window
INSTRUCTION = "instruction"  # the sample label of an instruction record


class Objective(StrEnum):
    """What a data phase trains."""

    UL2 = "ul2"        # UL2's mixture of denoisers on text (instruction records stay causal)
    CAUSAL = "causal"  # plain causal LM


class SourceError(ValueError):
    """A data source cannot be read: missing file, bad record (the message names file and line)."""


@dataclass(frozen=True)
class PhaseConfig:
    """One stretch of training: its objective, the token count it lasts until, and optionally
    its own source weights (``{source name: weight}``; sources it leaves out get weight 0)."""

    objective: Objective
    until_tokens: int = 0
    weights: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.objective not in tuple(Objective):
            raise ValueError(f"phase objective {self.objective!r} is not one of {[str(o) for o in Objective]}")
        object.__setattr__(self, "objective", Objective(self.objective))
        if not isinstance(self.until_tokens, int) or self.until_tokens < 0:
            raise ValueError(f"until_tokens {self.until_tokens!r} must be an integer >= 0 (0: unbounded)")
        if self.weights is not None:
            bad = {k: w for k, w in self.weights.items() if not np.isfinite(w) or w < 0}
            if bad or sum(self.weights.values()) <= 0:
                raise ValueError(f"phase weights {dict(self.weights)} must be finite, >= 0, with a positive sum")


def builtin_sources(text_weight: float = 0.55, instruction_weight: float = 0.45) -> tuple[SourceConfig, ...]:
    """The two built-in sources, named "text" and "instructions"."""
    return (
        SourceConfig("text", BUILTIN_TEXT, TEXT, text_weight),
        SourceConfig("instructions", BUILTIN_INSTRUCTIONS, PROMPT_COMPLETION, instruction_weight),
    )


# ------------------------------------------------------------------ readers


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        if path.suffix not in suffixes:
            raise SourceError(f"{path}: expected a {' or '.join(suffixes)} file")
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix in suffixes and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise SourceError(f"folder {path} holds no {' or '.join(suffixes)} files")
        return files
    raise SourceError(f"{path} does not exist")


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(_read(file).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{file} line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise SourceError(f"{file} line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_text_documents(path: str | Path) -> list[str]:
    """Documents of a text source: each .txt file whole, each .jsonl line's "text" (empty ones skipped)."""
    documents: list[str] = []
    for file in _files(Path(path), (".txt", ".jsonl")):
        if file.suffix == ".txt":
            text = _read(file)
            if text.strip():
                documents.append(text)
            continue
        for number, record in _jsonl(file):
            text = record.get("text")
            if not isinstance(text, str):
                raise SourceError(f'{file} line {number}: needs a string field "text" (found keys {sorted(record)})')
            if text:
                documents.append(text)
    return documents


def read_instruction_records(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from .jsonl lines ``{"prompt": str, "completion": str}``, both non-empty."""
    records: list[tuple[str, str]] = []
    for file in _files(Path(path), (".jsonl",)):
        for number, record in _jsonl(file):
            prompt, completion = record.get("prompt"), record.get("completion")
            if not (isinstance(prompt, str) and prompt and isinstance(completion, str) and completion):
                raise SourceError(
                    f'{file} line {number}: needs non-empty string fields "prompt" and "completion" (found keys {sorted(record)})'
                )
            records.append((prompt, completion))
    return records


def load_source(source: SourceConfig) -> list[str] | list[tuple[str, str]]:
    """The source's documents (text) or (prompt, completion) pairs, at most ``max_records``."""
    limit = source.max_records or None
    try:
        if source.location == BUILTIN_TEXT:
            items: list[Any] = builtin_documents()
        elif source.location == BUILTIN_INSTRUCTIONS:
            records = builtin_instruction_records(source.max_records or BUILTIN_INSTRUCTION_RECORDS)
            items = [(r["prompt"], r["completion"]) for r in records]
        elif source.format == TEXT:
            items = read_text_documents(source.location)
        else:
            items = read_instruction_records(source.location)
    except SourceError as e:
        raise SourceError(f"source {source.name!r}: {e}") from None
    items = items[:limit]
    if not items:
        raise SourceError(f"source {source.name!r}: {source.location} holds no documents or records")
    return items


# ------------------------------------------------------------------ tokenized data


def _tokenize(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without added specials; special-token strings inside the data stay plain text."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), 1024):
        batch = list(texts[start : start + 1024])
        ids += tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def _flatten(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids in one array, offsets with offsets[i]:offsets[i+1] the i-th list)."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, lists), dtype=np.int64, count=len(lists)), out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


@dataclass(eq=False)
class _Variant:
    """One (source, objective) pairing: how many units it has and how to make unit ``u``."""

    source: str
    label: str
    group: int
    units: int
    make: Callable[[int], PackedSample]


@dataclass(eq=False)
class _Phase:
    config: PhaseConfig
    start: int
    weights: np.ndarray            # per source, normalized
    cumulative: np.ndarray         # for sampling a source
    variants: list[list[_Variant]]  # per source
    variant_cumulative: list[np.ndarray]
    live: list[_Variant]           # those that can be drawn, for the duplicate fallback

    def draw(self, rng: np.random.Generator) -> tuple[_Variant, int]:
        pick_source, pick_variant = rng.random(2)
        s = int(np.searchsorted(self.cumulative, pick_source, side="right"))
        variant = self.variants[s][int(np.searchsorted(self.variant_cumulative[s], pick_variant, side="right"))]
        return variant, int(rng.integers(variant.units))


def _cumulative(weights: np.ndarray) -> np.ndarray:
    """CDF for ``searchsorted(cdf, u, "right")`` with u in [0, 1): never lands on a zero weight."""
    cdf = np.cumsum(weights) / weights.sum()
    cdf[np.flatnonzero(weights)[-1] :] = 1.0
    return cdf


def _group_id(source: str, label: str, seq_len: int, seed: int) -> int:
    digest = hashlib.blake2b(f"{source}\0{label}\0{seq_len}\0{seed}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") >> 1


class DataMixer:
    """Deterministic microbatches from weighted sources under a phase schedule (see module docstring)."""

    def __init__(
        self,
        sources: Sequence[SourceConfig],
        phases: Sequence[PhaseConfig],
        tokenizer: Any,
        seq_len: int,
        seed: int,
        ul2: UL2Config | None = None,
        pack_instructions: bool = False,
        heldout_share: float = 0.0,
    ) -> None:
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len {seq_len!r} must be an integer >= 2")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed {seed!r} must be an integer >= 0")
        self.sources = tuple(sources)
        self.phase_configs = tuple(phases)
        names = [s.name for s in self.sources]
        if not names:
            raise ValueError("DataMixer needs at least one SourceConfig")
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        self._check_phases(names)
        self.seq_len, self.seed = seq_len, seed
        self.ul2 = ul2 if ul2 is not None else UL2Config()
        self.pack_instructions = pack_instructions
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; rows use it between documents and as padding")
        self.eos = int(tokenizer.eos_token_id)
        needs_ul2 = any(p.objective == Objective.UL2 for p in self.phase_configs) and any(s.format == TEXT for s in self.sources)
        self.vocab = UL2Vocab.from_tokenizer(tokenizer, self.ul2) if needs_ul2 else None

        self._stats: list[dict[str, Any]] = []
        self._variants: dict[str, dict[str, _Variant]] = {}
        self.heldout_share = heldout_share
        self.heldout: dict[str, list] = {}  # source name -> its held-out documents or records (never trained on)
        for source in self.sources:
            items, self.heldout[source.name] = split_heldout(load_source(source), heldout_share)
            if not items:
                raise SourceError(f"source {source.name!r}: every one of its {len(self.heldout[source.name])} items is held out "
                                  f"(--heldout-share {heldout_share}); give it more data or hold out less")
            stats = {"name": source.name, "path": source.location, "format": source.format, "weight": source.weight,
                     "heldout": len(self.heldout[source.name])}
            if source.format == TEXT:
                self._variants[source.name] = self._text_variants(source, _tokenize(tokenizer, items), needs_ul2, stats)
            else:
                prompts = _tokenize(tokenizer, [p for p, _ in items])
                completions = _tokenize(tokenizer, [c for _, c in items])
                self._variants[source.name] = {INSTRUCTION: self._instruction_variant(source, prompts, completions, stats)}
            self._stats.append(stats)
        groups = [v.group for vs in self._variants.values() for v in vs.values()]
        if len(set(groups)) != len(groups):
            raise ValueError("two sample-id groups collide (a 31-bit hash); rename one of the sources")
        self._phases = self._plan_phases()

    # -------------------------------------------------------------- set-up

    def _check_phases(self, names: list[str]) -> None:
        if not self.phase_configs:
            raise ValueError('DataMixer needs at least one PhaseConfig, e.g. PhaseConfig("causal")')
        previous = 0
        for i, phase in enumerate(self.phase_configs):
            last = i == len(self.phase_configs) - 1
            if phase.until_tokens == 0 and not last:
                raise ValueError(f"phase {i} has until_tokens 0 (unbounded) but is not the last phase")
            if phase.until_tokens and phase.until_tokens <= previous:
                raise ValueError(
                    f"phase {i} ends at {phase.until_tokens} tokens, not after the previous phase's end {previous}; "
                    "until_tokens is an absolute count and must increase"
                )
            previous = phase.until_tokens or previous
            unknown = sorted(set(phase.weights or {}) - set(names))
            if unknown:
                raise ValueError(f"phase {i} weights name unknown sources {unknown}; sources are {names}")
            weights = phase.weights if phase.weights is not None else {s.name: s.weight for s in self.sources}
            if sum(weights.values()) <= 0:
                raise ValueError(f"phase {i} gives every source weight 0; give at least one a positive weight")

    def _text_variants(
        self, source: SourceConfig, ids: list[list[int]], needs_ul2: bool, stats: dict[str, Any]
    ) -> dict[str, _Variant]:
        flat, offsets = _flatten(ids)
        stream = np.insert(flat, offsets[1:], self.eos)  # EOS after every document
        if len(stream) < 2:
            raise SourceError(f"source {source.name!r} has {len(stream)} tokens; needs >= 2")
        stats |= {"documents": len(ids), "tokens": int(len(stream))}
        variants: dict[str, _Variant] = {}
        if any(p.objective == Objective.CAUSAL for p in self.phase_configs):
            variants[CAUSAL] = self._windows(source, CAUSAL, stream, self.seq_len + 1, self._causal_row)
        if needs_ul2:
            for denoiser, _ in self.ul2.denoisers:
                width = source_length(denoiser, self.seq_len)
                variants[denoiser.label] = self._windows(source, denoiser.label, stream, width, self._ul2_row_maker(denoiser))
        return variants

    def _windows(self, source: SourceConfig, label: str, stream: np.ndarray, width: int, row: Callable) -> _Variant:
        group = _group_id(source.name, label, self.seq_len, self.seed)
        units = max(1, len(stream) // width)
        if units >= 2**32:
            raise ValueError(f"source {source.name!r} has {units} windows, more than sample ids can number (2**32)")
        return _Variant(source.name, label, group, units, lambda u: row(stream[u * width : (u + 1) * width], group, u))

    @staticmethod
    def _causal_row(window: np.ndarray, group: int, unit: int) -> PackedSample:
        mask = np.ones(len(window), dtype=bool)
        mask[0] = False
        return PackedSample(window, 0, mask)

    def _ul2_row_maker(self, denoiser: Denoiser) -> Callable[[np.ndarray, int, int], PackedSample]:
        def make(window: np.ndarray, group: int, unit: int) -> PackedSample:
            rng = np.random.default_rng([self.seed, group, unit])
            return make_ul2_sample(window, denoiser, rng, self.vocab, self.seq_len)
        return make

    def _instruction_variant(
        self, source: SourceConfig, prompts: list[list[int]], completions: list[list[int]], stats: dict[str, Any]
    ) -> _Variant:
        budget = self.seq_len + 1
        p_flat, p_off = _flatten(prompts)
        c_flat, c_off = _flatten(completions)
        eos = np.array([self.eos], dtype=np.int64)
        if (np.diff(p_off) == 0).any() or (np.diff(c_off) == 0).any():
            empty = int(np.flatnonzero((np.diff(p_off) == 0) | (np.diff(c_off) == 0))[0])
            raise SourceError(f"source {source.name!r}: record {empty} tokenizes to an empty prompt or completion")

        def record(i: int) -> tuple[np.ndarray, np.ndarray]:
            """Prompt and completion + EOS of record ``i``, cut to fit one row (see module docstring)."""
            prompt = p_flat[p_off[i] : p_off[i + 1]]
            completion = np.concatenate([c_flat[c_off[i] : c_off[i + 1]], eos])[: budget - 1]
            return prompt[max(0, len(prompt) + len(completion) - budget) :], completion

        def single(i: int) -> PackedSample:
            prompt, completion = record(i)
            return PackedSample.prefix_lm(np.concatenate([prompt, completion]), len(prompt))

        count = len(prompts)
        stats |= {"records": count, "tokens": int(len(p_flat) + len(c_flat) + count)}
        group = _group_id(source.name, INSTRUCTION + ("/packed" if self.pack_instructions else ""), self.seq_len, self.seed)
        if not self.pack_instructions:
            return _Variant(source.name, INSTRUCTION, group, count, single)

        lengths = np.minimum(np.diff(p_off) + np.diff(c_off) + 1, budget)
        starts, used = [0], 0
        for i, n in enumerate(lengths.tolist()):
            if used + n > budget:
                starts.append(i)
                used = 0
            used += n
        starts.append(count)

        def packed(u: int) -> PackedSample:
            parts, masks = [], []
            for i in range(starts[u], starts[u + 1]):
                prompt, completion = record(i)
                parts += [prompt, completion]
                masks += [np.zeros(len(prompt), dtype=bool), np.ones(len(completion), dtype=bool)]
            return PackedSample(np.concatenate(parts), 0, np.concatenate(masks))

        return _Variant(source.name, INSTRUCTION, group, len(starts) - 1, packed)

    def _plan_phases(self) -> list[_Phase]:
        plans, start = [], 0
        ul2_shares = self.ul2.shares
        for phase in self.phase_configs:
            given = phase.weights if phase.weights is not None else {s.name: s.weight for s in self.sources}
            weights = np.array([float(given.get(s.name, 0.0)) for s in self.sources])
            weights /= weights.sum()
            variants, cumulative, live = [], [], []
            for source, weight in zip(self.sources, weights):
                table = self._variants[source.name]
                if source.format != TEXT:
                    chosen, shares = [table[INSTRUCTION]], np.ones(1)
                elif phase.objective == Objective.CAUSAL:
                    chosen, shares = [table[CAUSAL]], np.ones(1)
                else:
                    chosen, shares = [table[d.label] for d, _ in self.ul2.denoisers], ul2_shares
                variants.append(chosen)
                cumulative.append(_cumulative(shares))
                live += [v for v, share in zip(chosen, shares) if weight > 0 and share > 0]
            plans.append(_Phase(phase, start, weights, _cumulative(weights), variants, cumulative, live))
            start = phase.until_tokens or start
        return plans

    # -------------------------------------------------------------- batches

    def phase_at(self, tokens_seen: int) -> int:
        """Index of the phase in force after ``tokens_seen`` tokens (the last one past all bounds)."""
        for i, plan in enumerate(self._phases):
            if plan.config.until_tokens == 0 or tokens_seen < plan.config.until_tokens:
                return i
        return len(self._phases) - 1

    def microbatch(self, round: int, index: int, micro_batch_size: int, tokens_seen_before_round: int) -> Microbatch:
        """The ``index``-th microbatch of ``round``; see ``microbatch_with_info``."""
        return self.microbatch_with_info(round, index, micro_batch_size, tokens_seen_before_round)[0]

    def microbatch_with_info(
        self, round: int, index: int, micro_batch_size: int, tokens_seen_before_round: int
    ) -> tuple[Microbatch, MicrobatchInfo]:
        """Microbatch ``(round, index)`` and where its samples came from; a pure function of
        (seed, round, index, micro_batch_size, the phase that ``tokens_seen_before_round`` selects)."""
        for name, value in (("round", round), ("index", index), ("tokens_seen_before_round", tokens_seen_before_round)):
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} {value!r} must be an integer >= 0")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size {micro_batch_size} must be >= 1")
        phase_index = self.phase_at(tokens_seen_before_round)
        phase = self._phases[phase_index]
        samples, ids, sources, objectives = [], [], [], []
        for b in range(micro_batch_size):
            variant, unit = self._draw_new(phase, np.random.default_rng([self.seed, round, index, b]), set(ids))
            samples.append(variant.make(unit))
            ids.append(variant.group << 32 | unit)
            sources.append(variant.source)
            objectives.append(variant.label)

        width = self.seq_len + 1
        rows = np.full((micro_batch_size, width), self.eos, dtype=np.int64)
        targets = np.zeros((micro_batch_size, width), dtype=bool)
        for b, sample in enumerate(samples):
            rows[b, : len(sample.tokens)] = sample.tokens
            targets[b, : len(sample.tokens)] = sample.target_mask
        loss_mask = targets[:, 1:]
        batch = Microbatch(
            round=round,
            index=index,
            sample_ids=ids,
            input_ids=torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
            target_ids=torch.from_numpy(np.ascontiguousarray(rows[:, 1:])),
            loss_mask=torch.from_numpy(loss_mask.astype(np.float32)),
            prefix_lengths=torch.tensor([s.prefix_length for s in samples], dtype=torch.int64),
        )
        info = MicrobatchInfo(
            round=round,
            index=index,
            phase=phase_index,
            phase_objective=phase.config.objective,
            sources=sources,
            objectives=objectives,
            tokens=[len(s.tokens) - 1 for s in samples],
            loss_tokens=loss_mask.sum(axis=1).tolist(),
        )
        return batch, info

    @staticmethod
    def _draw_new(phase: _Phase, rng: np.random.Generator, taken: set[int]) -> tuple[_Variant, int]:
        """A (variant, unit) whose sample id is not in ``taken``: ids within a microbatch are
        distinct (the activation cache keys rows by id). Redraws, then walks the phase's units
        in order; fails only if the phase has fewer distinct samples than the microbatch."""
        for _ in range(64):
            variant, unit = phase.draw(rng)
            if (variant.group << 32 | unit) not in taken:
                return variant, unit
        for variant in phase.live:
            for unit in range(min(variant.units, len(taken) + 1)):
                if (variant.group << 32 | unit) not in taken:
                    return variant, unit
        offered = sum(v.units for v in phase.live)
        raise ValueError(
            f"phase {phase.config.objective!r} offers {offered} distinct samples, fewer than a microbatch of "
            f"{len(taken) + 1}; add data or lower micro_batch_size"
        )

    # -------------------------------------------------------------- status

    def describe(self) -> dict[str, Any]:
        """Sources, phases, denoisers and sample-id groups, JSON-ready, for the status page."""
        names = [s.name for s in self.sources]
        uses_ul2 = self.vocab is not None
        return {
            "seq_len": self.seq_len,
            "seed": self.seed,
            "pack_instructions": self.pack_instructions,
            "heldout_share": self.heldout_share,
            "sources": self._stats,
            "phases": [
                {
                    "objective": p.config.objective,
                    "from_tokens": p.start,
                    "until_tokens": p.config.until_tokens or None,
                    "weights": {n: round(float(w), 6) for n, w in zip(names, p.weights)},
                }
                for p in self._phases
            ],
            "ul2": {
                "num_sentinels": self.ul2.num_sentinels,
                "denoisers": [
                    {"label": d.label, "mode_token": d.mode_token, "share": round(float(s), 6),
                     "source_tokens": source_length(d, self.seq_len)}
                    for (d, _), s in zip(self.ul2.denoisers, self.ul2.shares)
                ],
            } if uses_ul2 else None,
            "sample_groups": [
                {"source": v.source, "objective": v.label, "group": v.group, "units": v.units}
                for table in self._variants.values() for v in table.values()
            ],
        }
