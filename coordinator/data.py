"""Deterministic microbatches for causal LM: the batch for (seed, round, index) never changes.

Documents are tokenized, joined with end-of-text tokens and cut into fixed windows of
``seq_len + 1`` tokens (a window's id is its sample id, stable across epochs). The samples of
a run are read in order ``p = (round - 1) * global_batch + index * micro_batch + b``; epoch
``p // n_windows`` visits the windows in a permutation seeded by (seed, epoch). So a restarted
coordinator resumes exactly, and no sample is repeated or skipped within an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Microbatch:
    """One pipeline trip's worth of samples."""

    round: int
    index: int
    sample_ids: list[int]
    input_ids: torch.Tensor       # [B, L] int64
    target_ids: torch.Tensor      # [B, L] int64, input_ids shifted left by one
    loss_mask: torch.Tensor       # [B, L] float32
    prefix_lengths: torch.Tensor  # [B] int64, 0 for causal LM

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


class CausalWindows:
    """Fixed-length token windows over a corpus, sampled deterministically per round."""

    def __init__(self, token_lists: Sequence[Sequence[int]], eos_id: int, seq_len: int, seed: int) -> None:
        stream = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int64)
        window = seq_len + 1
        count = len(stream) // window
        if count < 1:
            raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one sample of seq_len {seq_len} + 1")
        self.windows = stream[: count * window].reshape(count, window)
        self.seq_len = seq_len
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.windows)

    def _window_id(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.windows))
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))}
        return int(self._permutations[epoch][offset])

    def microbatch(self, round: int, index: int, micro_batch_size: int, global_batch_size: int) -> Microbatch:
        """The ``index``-th microbatch of ``round`` (rounds count from 1)."""
        first = (round - 1) * global_batch_size + index * micro_batch_size
        ids = [self._window_id(first + b) for b in range(micro_batch_size)]
        tokens = torch.from_numpy(self.windows[ids])
        return Microbatch(
            round=round,
            index=index,
            sample_ids=ids,
            input_ids=tokens[:, :-1].clone(),
            target_ids=tokens[:, 1:].clone(),
            loss_mask=torch.ones(micro_batch_size, self.seq_len, dtype=torch.float32),
            prefix_lengths=torch.zeros(micro_batch_size, dtype=torch.int64),
        )
