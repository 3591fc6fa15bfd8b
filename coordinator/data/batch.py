"""What one pipeline trip carries: the ``Microbatch`` the coordinator hands to stage 0, and where its samples came from.

``mixer.DataMixer`` makes them (deterministically, per (seed, round, index) and data phase);
``build.build_mixer`` builds the run's mixer from its config.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class MicrobatchInfo:
    """Where each sample of a microbatch came from, for token accounting on the status page.

    ``objectives`` holds "causal", "instruction" or a denoiser label such as "R(3,0.15)"/"S";
    ``tokens`` counts a sample's non-padding input positions, ``loss_tokens`` those with loss.
    """

    round: int
    index: int
    phase: int
    phase_objective: str
    sources: list[str]
    objectives: list[str]
    tokens: list[int]
    loss_tokens: list[int]
