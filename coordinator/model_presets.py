"""Model presets: the GPT-J shapes a run can train, and the initial weights of a run."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPTJConfig, GPTJForCausalLM


def preset_config(name: str, vocab_size: int, eos_token_id: int, max_positions: int) -> GPTJConfig:
    """A GPTJConfig for ``name``: "tiny" (tests, demo), "small" (benchmarks) or "gptj-6b" (GPT-J-6B's shape)."""
    common = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=False)
    if name == "tiny":
        config = GPTJConfig(vocab_size=vocab_size, n_positions=max(256, max_positions), n_embd=128, n_layer=4, n_head=4, rotary_dim=16, **common)
    elif name == "small":
        config = GPTJConfig(vocab_size=vocab_size, n_positions=max(512, max_positions), n_embd=512, n_layer=8, n_head=8, rotary_dim=32, **common)
    elif name == "gptj-6b":
        config = GPTJConfig(vocab_size=max(vocab_size, 50400), n_positions=max(2048, max_positions), n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, **common)
    else:
        raise ValueError(f"unknown --model {name!r}; choose tiny, small or gptj-6b (or --init-from a checkpoint directory)")
    config.architectures = ["GPTJForCausalLM"]
    return config


def parameter_count(config: GPTJConfig) -> int:
    """Parameters of a GPT-J with this config (embedding, blocks, ln_f, lm_head with bias)."""
    return sum(stage_parameter_counts(config, [(0, config.n_layer)]))


def stage_parameter_counts(config: GPTJConfig, ranges: list[tuple[int, int]]) -> list[int]:
    """Parameters of each stage: its blocks, plus the embedding on the first and ln_f + lm_head on the last."""
    d, v = config.n_embd, config.vocab_size
    inner = config.n_inner or 4 * d
    block = 2 * d + 4 * d * d + d * inner + inner + inner * d + d
    counts = [(end - start) * block for start, end in ranges]
    counts[0] += v * d
    counts[-1] += 2 * d + d * v + v
    return counts


def initial_state(config: GPTJConfig, seed: int) -> dict[str, torch.Tensor]:
    """Randomly initialised GPT-J weights, the same for the same (config, seed)."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return GPTJForCausalLM(config).state_dict()


def pretrained_state(directory: Path) -> tuple[GPTJConfig, dict[str, torch.Tensor]]:
    """Config and weights of an existing Hugging Face GPT-J checkpoint (``--init-from``)."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {directory}: no config.json there; point it at a GPT-J checkpoint directory")
    model = GPTJForCausalLM.from_pretrained(str(directory))
    return model.config, model.state_dict()
