"""Checkpoint assembly and publishing in the Hugging Face GPT-J layout.

A checkpoint is ``round-NNNNNN/`` under the run's ``checkpoints/``: ``config.json``, one
safetensors shard per pipeline stage (so a peer downloads only its stage's shard), the
shard index, the tokenizer, and a signed ``manifest.json`` with the sha256 of every file.
It is written into a temporary directory and renamed into place, so a crash mid-write never
leaves a directory that looks complete (the manifest is written last, inside the temp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GPTJConfig

from proto.manifest import ADAPTER_CONFIG, ADAPTER_FILE, INDEX, MANIFEST, optimizer_shard_name, sha256_file, shard_name, sign_manifest


@dataclass(frozen=True)
class CheckpointInfo:
    round: int
    path: Path
    tokens: int
    loss: float | None
    total_bytes: int
    seconds: float


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The run's Ed25519 key, created on first use (kept in the state dir, mode 0600)."""
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, expected an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def shard_sizes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, from its header (nothing is loaded)."""
    with safe_open(str(path), "pt") as shard:
        return {key: _nbytes(shard.get_slice(key)) for key in shard.keys()}


def _nbytes(slice_) -> int:
    shape = slice_.get_shape()
    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[slice_.get_dtype()]
    n = 1
    for d in shape:
        n *= d
    return n * itemsize


def checkpoint_dir_name(round: int) -> str:
    return f"round-{round:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    root: Path,
    *,
    run_id: str,
    round: int,
    tokens: int,
    loss: float | None,
    config: GPTJConfig,
    stage_tensors: Iterable[Mapping[str, torch.Tensor] | Path],
    tokenizer_dir: Path,
    signing_key: Ed25519PrivateKey,
    num_stages: int | None = None,
    optimizer_files: Sequence[Path] = (),
    adapter_config: dict | None = None,
) -> CheckpointInfo:
    """Write a complete, signed checkpoint for ``round`` atomically and return where it is.

    Each stage's shard is given as its tensors or as a safetensors file already on disk (an
    upload), which is moved in, or lazily (an iterable, with ``num_stages``): the whole model is
    never in memory at once. ``optimizer_files`` (one per stage, optional) hold each stage's
    optimizer state, hashed like every other file. With ``adapter_config`` (LoRA runs) the shards
    hold adapters: they become one ``adapter_model.safetensors`` and ``adapter_config.json``,
    which peft loads onto the base the config names."""
    num_stages = len(stage_tensors) if num_stages is None else num_stages

    def fill(tmp: Path) -> None:
        if adapter_config is not None:
            _write_adapters(tmp, stage_tensors, adapter_config)
        else:
            _write_shards(tmp, stage_tensors, num_stages)
        for stage, path in enumerate(optimizer_files):
            shutil.move(str(path), tmp / optimizer_shard_name(stage, num_stages))
        config.save_pretrained(str(tmp))
        for file in sorted(tokenizer_dir.iterdir()):
            if file.is_file():
                shutil.copy2(file, tmp / file.name)

    return _publish_atomically(root, round, {"run": run_id, "round": round, "tokens": tokens, "loss": loss}, fill, signing_key)


def _write_shards(tmp: Path, stage_tensors: Iterable[Mapping[str, torch.Tensor] | Path], num_stages: int) -> None:
    """One safetensors shard per stage and the Hugging Face index that maps every tensor to its shard."""
    weight_map: dict[str, str] = {}
    total_size = 0
    for stage, tensors in enumerate(stage_tensors):
        name = shard_name(stage, num_stages)
        if isinstance(tensors, Path):
            shutil.move(str(tensors), tmp / name)
            sizes = shard_sizes(tmp / name)
        else:
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_file(cpu, str(tmp / name), metadata={"format": "pt"})
            sizes = {k: t.numel() * t.element_size() for k, t in cpu.items()}
        for key, nbytes in sizes.items():
            if key in weight_map:
                raise ValueError(f"tensor {key} was uploaded by two stages")
            weight_map[key] = name
            total_size += nbytes
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def _write_adapters(tmp: Path, stage_tensors: Iterable[Mapping[str, torch.Tensor] | Path], adapter_config: dict) -> None:
    """Every stage's adapters in one file, as peft saves them (they are small: the base is not in it)."""
    adapters: dict[str, torch.Tensor] = {}
    for tensors in stage_tensors:
        part = load_file(str(tensors)) if isinstance(tensors, Path) else {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if set(part) & set(adapters):
            raise ValueError(f"adapters {sorted(set(part) & set(adapters))[:3]} were uploaded by two stages")
        adapters |= part
    save_file(adapters, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, default=list))


def _publish_atomically(root: Path, round: int, body: dict, fill, signing_key: Ed25519PrivateKey) -> CheckpointInfo:
    """Fill a temporary directory, sign a manifest of every file's sha256 (written last), fsync, rename into place."""
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(round)
    tmp = root / f".tmp-{checkpoint_dir_name(round)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = sign_manifest({**body, "created": time.time(), "files": files}, signing_key)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for p in tmp.iterdir():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-published round (after a restart): swap atomically-ish
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in final.iterdir())
    return CheckpointInfo(round, final, body["tokens"], body["loss"], size, time.monotonic() - started)


def adapter_config(train, base: str) -> dict:
    """``adapter_config.json`` of a LoRA run's checkpoints: peft loads the adapters onto the base checkpoint at ``base``."""
    from peft import LoraConfig

    config = LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, target_modules=list(train.lora_target_modules),
                        lora_dropout=0.0, base_model_name_or_path=base, task_type="CAUSAL_LM")
    return config.to_dict()


def remove_incomplete(root: Path) -> list[Path]:
    """Delete leftovers of interrupted writes (temp dirs); returns what was removed."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def stage_of(name: str, layer_ranges: Sequence[tuple[int, int]]) -> int | None:
    """The stage whose shard holds tensor ``name`` (the embedding goes with stage 0, ln_f and the head with the
    last), or None for what is no parameter (buffers some versions list: attn.bias, masked_bias)."""
    if name.startswith("transformer.h.") and not name.endswith(("attn.bias", "attn.masked_bias")):
        layer = int(name.split(".")[2])
        return next(i for i, (a, b) in enumerate(layer_ranges) if a <= layer < b)
    if name.startswith("transformer.wte."):
        return 0
    if name.startswith(("transformer.ln_f.", "lm_head.")):
        return len(layer_ranges) - 1
    return None


def split_state_dict(state: Mapping[str, torch.Tensor], layer_ranges: Sequence[tuple[int, int]], n_layer: int) -> list[dict[str, torch.Tensor]]:
    """Split a full GPT-J state dict into per-stage dicts (embedding with stage 0, head with the last)."""
    if not layer_ranges or layer_ranges[-1][1] != n_layer:
        raise ValueError(f"stage ranges {list(layer_ranges)} do not cover {n_layer} blocks")
    stages: list[dict[str, torch.Tensor]] = [{} for _ in layer_ranges]
    for name, tensor in state.items():
        stage = stage_of(name, layer_ranges)
        if stage is not None:
            stages[stage][name] = tensor
    return stages
