"""The run's data as its config describes it: sources, phase schedule, UL2 mixture and the mixer.

The coordinator, the tests' single-process references and the benchmarks all build their
``DataMixer`` here, so they train on the same batches.

Schedule: with ``--ul2-tokens N > 0``, a UL2 phase on the text sources (by their weights)
until N loss tokens are trained; then a causal phase in which the prompt_completion sources
together get ``--instruction-share`` of the samples and the text sources the rest, each group
split by the sources' weights. With no instruction sources the causal phase is all text.
Sources with weight 0 in every phase are not loaded.
"""

from __future__ import annotations

import logging
from typing import Iterator

from proto.run_config import ConfigError, CoordinatorConfig

from proto.run_config import PROMPT_COMPLETION, TEXT, SourceConfig

from .heldout import split_heldout
from .mixer import DataMixer, Objective, PhaseConfig, SourceError, builtin_sources, load_source
from .ul2 import UL2Config, special_tokens

log = logging.getLogger(__name__)


def ul2_config(config: CoordinatorConfig) -> UL2Config:
    """The default denoisers with ``--ul2-shares`` as the R, X, S family shares."""
    return UL2Config.with_shares(*config.ul2_share_values)


def tokenizer_special_tokens(config: CoordinatorConfig) -> list[str]:
    """Tokens the run's tokenizer must hold (always, so ids do not depend on the schedule)."""
    return special_tokens(ul2_config(config))


def source_configs(config: CoordinatorConfig) -> tuple[SourceConfig, ...]:
    """The ``[[sources]]`` tables as ``SourceConfig``s, or the built-in text and instructions."""
    if not config.sources:
        return builtin_sources()
    return tuple(SourceConfig.from_table(i, table) for i, table in enumerate(config.sources, 1))


def schedule(config: CoordinatorConfig, sources: tuple[SourceConfig, ...]) -> tuple[PhaseConfig, ...]:
    """UL2 on text until ``--ul2-tokens`` (if > 0), then causal LM on text + instructions (see module docstring)."""
    text = [s for s in sources if s.format == TEXT and s.weight > 0]
    instructions = [s for s in sources if s.format == PROMPT_COMPLETION and s.weight > 0]
    if not text and not instructions:
        raise ConfigError("every [[sources]] table has weight 0; give at least one a positive weight")
    phases = []
    if config.ul2_tokens > 0:
        if not text:
            raise ConfigError(f"--ul2-tokens {config.ul2_tokens} trains UL2 on text sources, but there is none with weight > 0; "
                              "add a text source or set --ul2-tokens 0")
        phases.append(PhaseConfig(Objective.UL2, config.ul2_tokens, {s.name: s.weight for s in text}))
    share = config.instruction_share if text and instructions else float(bool(instructions))
    if instructions and not text and config.instruction_share < 1:
        log.info("no text source: the causal phase is all instructions (--instruction-share %g ignored)", config.instruction_share)
    if text and not instructions and config.instruction_share > 0:
        log.info("no prompt_completion source: the causal phase is all text (--instruction-share %g ignored)", config.instruction_share)
    weights = {}
    for group, group_share in ((text, 1.0 - share), (instructions, share)):
        total = sum(s.weight for s in group)
        weights |= {s.name: group_share * s.weight / total for s in group if group_share > 0}
    phases.append(PhaseConfig(Objective.CAUSAL, 0, weights))
    return tuple(phases)


def _used(sources: tuple[SourceConfig, ...], phases: tuple[PhaseConfig, ...]) -> tuple[SourceConfig, ...]:
    return tuple(s for s in sources if any((p.weights or {}).get(s.name, 0) > 0 for p in phases))


def tokenizer_documents(config: CoordinatorConfig) -> Iterator[str]:
    """Texts to train the run's BPE on: the used sources' documents and prompt + completion records (lazy)."""
    sources = source_configs(config)
    for source in _used(sources, schedule(config, sources)):
        for item in split_heldout(load_source(source), config.heldout_share)[0]:  # held-out text stays unseen
            yield item if isinstance(item, str) else item[0] + item[1]


def build_mixer(config: CoordinatorConfig, tokenizer) -> DataMixer:
    """The run's ``DataMixer``: deterministic given (seed, round, index, tokens trained before the round)."""
    sources = source_configs(config)
    phases = schedule(config, sources)
    try:
        return DataMixer(_used(sources, phases), phases, tokenizer, config.seq_len, config.seed,
                         ul2=ul2_config(config), pack_instructions=config.pack_instructions, heldout_share=config.heldout_share)
    except SourceError as e:
        raise ConfigError(f"[[sources]]: {e}") from None
