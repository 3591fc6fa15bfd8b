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
from typing import Mapping, Sequence

import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file
from transformers import GPTJConfig

from proto.manifest import INDEX, MANIFEST, sha256_file, sign_manifest


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


def shard_name(stage: int, num_stages: int) -> str:
    return f"model-{stage + 1:05d}-of-{num_stages:05d}.safetensors"


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
    stage_tensors: Sequence[Mapping[str, torch.Tensor]],
    tokenizer_dir: Path,
    signing_key: Ed25519PrivateKey,
) -> CheckpointInfo:
    """Write a complete, signed checkpoint for ``round`` atomically and return where it is."""
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(round)
    tmp = root / f".tmp-{checkpoint_dir_name(round)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weight_map: dict[str, str] = {}
        total_size = 0
        for stage, tensors in enumerate(stage_tensors):
            name = shard_name(stage, len(stage_tensors))
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_file(cpu, str(tmp / name), metadata={"format": "pt"})
            for key, tensor in cpu.items():
                if key in weight_map:
                    raise ValueError(f"tensor {key} was uploaded by two stages")
                weight_map[key] = name
                total_size += tensor.numel() * tensor.element_size()
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        config.save_pretrained(str(tmp))
        for file in sorted(tokenizer_dir.iterdir()):
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        body = {
            "run": run_id,
            "round": round,
            "tokens": tokens,
            "loss": loss,
            "created": time.time(),
            "files": files,
        }
        manifest = sign_manifest(body, signing_key)
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
    return CheckpointInfo(round, final, tokens, loss, size, time.monotonic() - started)


def remove_incomplete(root: Path) -> list[Path]:
    """Delete leftovers of interrupted writes (temp dirs); returns what was removed."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def split_state_dict(state: Mapping[str, torch.Tensor], layer_ranges: Sequence[tuple[int, int]], n_layer: int) -> list[dict[str, torch.Tensor]]:
    """Split a full GPT-J state dict into per-stage dicts (embedding with stage 0, head with the last)."""
    stages: list[dict[str, torch.Tensor]] = [{} for _ in layer_ranges]
    for name, tensor in state.items():
        if name.startswith("transformer.h."):
            layer = int(name.split(".")[2])
            stage = next(i for i, (a, b) in enumerate(layer_ranges) if a <= layer < b)
        elif name.startswith("transformer.wte."):
            stage = 0
        elif name.startswith(("transformer.ln_f.", "lm_head.")):
            stage = len(layer_ranges) - 1
        else:
            continue  # non-persistent buffers some versions list (attn.bias, masked_bias)
        stages[stage][name] = tensor
    if not layer_ranges or layer_ranges[-1][1] != n_layer:
        raise ValueError(f"stage ranges {list(layer_ranges)} do not cover {n_layer} blocks")
    return stages
