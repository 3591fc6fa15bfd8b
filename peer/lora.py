"""LoRA swarm mode: a frozen base, optionally held in 8 or 4 bits, and low-rank adapters that are all a stage trains.

The adapters are peft's (``inject_adapter_in_model``), on the linear layers ``--lora-targets``
names; by default the attention's query and value projections at rank 8, which the LoRA paper
found to adapt as well as adapting every matrix at a fraction of the parameters. They start
as LoRA's do (A Kaiming-uniform, B zero, so the model starts as the base), each A drawn from
a generator seeded by (run seed, tensor name), so every replica builds the same ones. Only
adapter tensors cross the wire: replica sync, state hand-off, checkpoints. The base comes from
the run's round-0 checkpoint (``coordinator serve --init-from``) and never changes.

The base can be held in bitsandbytes' int8 (``Linear8bitLt``) or NF4 (``Linear4bit``) where
bitsandbytes supports the device: CUDA, and (bitsandbytes 0.50) the CPU; elsewhere the peer
says so and stops (``weights.StageWeights.load_base``).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from proto.manifest import PEFT_ADAPTER as ADAPTER
from proto.run_config import TrainConfig


def quantize_base(model: nn.Module, bits: int) -> None:
    """Hold every linear layer of the blocks in ``bits`` (8: int8, 4: NF4) with bitsandbytes, frozen (all of the base
    is frozen, adapted or not)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise RuntimeError(f"--lora-base-bits {bits} needs bitsandbytes: {exc}") from exc
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child_name not in ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"):
                continue
            weight = child.weight.data
            if bits == 8:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(weight.cpu().clone(), requires_grad=False, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None, quant_type="nf4",
                                          compute_dtype=torch.float32)
                layer.weight = bnb.nn.Params4bit(weight.cpu().clone(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, child_name, layer)


def add_adapters(model: nn.Module, train: TrainConfig, seed: int) -> None:
    """Freeze ``model`` and inject LoRA adapters on ``--lora-targets``, initialised from the run's seed."""
    from peft import LoraConfig, inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, target_modules=list(train.lora_target_modules), lora_dropout=0.0)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    seed_adapters(model, seed)


def seed_adapters(model: nn.Module, seed: int) -> None:
    """Adapters as they start (the model equals its base): A drawn from (seed, name), B zero; they alone train."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1)
                bound = 1 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)), as LoRA's own init
                p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))
                p.requires_grad_(True)
            elif ".lora_B." in name:
                p.zero_()
                p.requires_grad_(True)
