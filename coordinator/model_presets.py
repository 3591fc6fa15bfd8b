"""Model presets and shapes: the GPT-J a run trains, its stages' tensors, and a pretrained checkpoint read stage by stage.

The coordinator never builds the model: it knows the shape; a run from the seed is built by
each peer for its own stage, and ``--init-from`` is re-sharded one stage at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from transformers import GPTJConfig

from proto.manifest import ADAPTER_PREFIX

from .checkpoint import stage_of


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


def stage_tensor_shapes(config: GPTJConfig, layer_start: int, layer_end: int) -> dict[str, tuple[int, ...]]:
    """The HF-named tensors of a stage and their shapes: what its shard in a checkpoint must hold."""
    d, v = config.n_embd, config.vocab_size
    inner = config.n_inner or 4 * d
    shapes: dict[str, tuple[int, ...]] = {}
    if layer_start == 0:
        shapes["transformer.wte.weight"] = (v, d)
    for i in range(layer_start, layer_end):
        h = f"transformer.h.{i}."
        shapes |= {h + "ln_1.weight": (d,), h + "ln_1.bias": (d,)}
        shapes |= {h + f"attn.{p}_proj.weight": (d, d) for p in ("q", "k", "v", "out")}
        shapes |= {h + "mlp.fc_in.weight": (inner, d), h + "mlp.fc_in.bias": (inner,), h + "mlp.fc_out.weight": (d, inner), h + "mlp.fc_out.bias": (d,)}
    if layer_end == config.n_layer:
        shapes |= {"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,), "lm_head.weight": (v, d), "lm_head.bias": (v,)}
    return shapes


def stage_adapter_shapes(config: GPTJConfig, layer_start: int, layer_end: int, rank: int, targets: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """LoRA runs: the adapter tensors of a stage, named as peft saves them, and their shapes (A: rank x in, B: out x rank)."""
    d, inner = config.n_embd, config.n_inner or 4 * config.n_embd
    dims = {"q_proj": ("attn", d, d), "k_proj": ("attn", d, d), "v_proj": ("attn", d, d), "out_proj": ("attn", d, d),
            "fc_in": ("mlp", d, inner), "fc_out": ("mlp", inner, d)}
    shapes = {}
    for i in range(layer_start, layer_end):
        for target in targets:
            where, fan_in, fan_out = dims[target]
            module = f"{ADAPTER_PREFIX}transformer.h.{i}.{where}.{target}"
            shapes[f"{module}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{module}.lora_B.weight"] = (fan_out, rank)
    return shapes


def pretrained_config(directory: Path) -> GPTJConfig:
    """The config of an existing Hugging Face GPT-J checkpoint (``--init-from``); no weights are read."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {directory}: no config.json there; point it at a GPT-J checkpoint directory")
    config = GPTJConfig.from_pretrained(str(directory))
    config.architectures = ["GPTJForCausalLM"]
    return config


def pretrained_stage_tensors(directory: Path, layer_ranges: list[tuple[int, int]]) -> Iterator[dict[str, torch.Tensor]]:
    """Each stage's tensors from a Hugging Face GPT-J checkpoint, one stage at a time, read lazily from
    its safetensors files (or memory-mapped from pytorch_model.bin): the rest of the model is never loaded."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), "pt") as shard:
                where |= {name: file for name in shard.keys()}
        for stage in range(len(layer_ranges)):
            tensors = {}
            for file in sorted({f for n, f in where.items() if stage_of(n, layer_ranges) == stage}):
                with safe_open(str(file), "pt") as shard:
                    tensors |= {n: shard.get_tensor(n) for n in shard.keys() if stage_of(n, layer_ranges) == stage}
            yield tensors
        return
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"--init-from {directory}: no *.safetensors or pytorch_model*.bin weights there")
    state = {}
    for file in bins:
        state |= torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
    for stage in range(len(layer_ranges)):
        yield {n: t for n, t in state.items() if stage_of(n, layer_ranges) == stage}
