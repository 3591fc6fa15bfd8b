"""One pipeline stage of GPT-J: a contiguous slice of transformers' own GPTJBlocks.

Stage 0 also holds the token embedding; the last stage holds ln_f and lm_head. Parameter
names are exactly the Hugging Face GPT-J names (``transformer.h.3.attn.q_proj.weight``), so
a stage loads from and uploads to a published checkpoint without any renaming. The module is
plain single-device torch: compression, transport and sync live elsewhere.

Rotary position embeddings are computed once per forward, by transformers' own
``GPTJRotaryEmbedding`` as ``GPTJModel`` does, and handed to every block: a stage is the
same slice of ``GPTJForCausalLM``, bit for bit. The table is a non-persistent buffer, so it
is in no state dict, checksum or checkpoint.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GPTJConfig
from transformers.models.gptj.modeling_gptj import GPTJBlock, GPTJRotaryEmbedding


def attention_bias(seq_len: int, prefix_lengths: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: 0 where query i may attend key j, dtype-min where not.

    Key j is visible to query i when j <= i (causal) or j < prefix_length (the bidirectional
    prefix of a prefix-LM sample). GPT-J's eager attention ADDS this to its scores; a bool mask
    would not mean keep/drop there.
    """
    positions = torch.arange(seq_len, device=device)
    causal = positions[None, :] <= positions[:, None]
    in_prefix = positions[None, None, :] < prefix_lengths.to(device)[:, None, None]
    allowed = causal[None] | in_prefix
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


def summed_token_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over positions where ``loss_mask`` is 1 (fp32 whatever the logits' dtype)."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * loss_mask.flatten().to(losses.dtype)).sum()


class StageModel(nn.Module):
    """GPT-J blocks ``[layer_start, layer_end)``, plus the embedding and/or head at the ends."""

    def __init__(self, config: GPTJConfig, layer_start: int, layer_end: int, checkpointing: bool = False) -> None:
        super().__init__()
        self.checkpointing = checkpointing  # recompute each block in the backward instead of keeping its activations
        if not 0 <= layer_start < layer_end <= config.n_layer:
            raise ValueError(f"stage layers [{layer_start}, {layer_end}) do not fit a model of {config.n_layer} blocks")
        config._attn_implementation = "eager"
        self.config = config
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first = layer_start == 0
        self.is_last = layer_end == config.n_layer
        self.transformer = nn.Module()
        if self.is_first:
            self.transformer.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.rotary = GPTJRotaryEmbedding(config)
        self.transformer.h = nn.ModuleDict({str(i): GPTJBlock(config, layer_idx=i) for i in range(layer_start, layer_end)})
        if self.is_last:
            self.transformer.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, inputs: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] (stage 0) or hidden states [B, L, D]; returns hidden states or logits."""
        hidden = self.transformer.wte(inputs) if self.is_first else inputs
        batch, seq_len = hidden.shape[:2]
        position_ids = torch.arange(seq_len, device=hidden.device)[None].expand(batch, seq_len)
        bias = attention_bias(seq_len, prefix_lengths, torch.float32, hidden.device)
        position_embeddings = self.rotary(hidden, position_ids)
        for block in self.transformer.h.values():
            if self.checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(block, hidden, attention_mask=bias, position_ids=position_ids,
                                    position_embeddings=position_embeddings, use_reentrant=False)
            else:
                hidden = block(hidden, attention_mask=bias, position_ids=position_ids, position_embeddings=position_embeddings)
        if self.is_last:
            hidden = self.lm_head(self.transformer.ln_f(hidden))
        return hidden


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1


@torch.no_grad()
def seeded_init(parameters, seed: int, config: GPTJConfig) -> None:
    """GPT-J's own initialisation, each tensor from a generator seeded by (run seed, tensor name).

    The distributions are GPTJPreTrainedModel's: normal(0, initializer_range) for linear and
    embedding weights, zero biases, LayerNorms at weight 1 and bias 0. Because no tensor's draw
    depends on another's, a stage built alone is exactly that slice of the whole model
    initialised the same way: a peer builds its stage from the seed, with no download, and
    every replica builds the same one. ``parameters``: (HF name, tensor) pairs, on any device.
    """
    for name, p in parameters:
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            p.fill_(1.0 if name.endswith(".weight") else 0.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
            p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, config.initializer_range, generator=generator))


