"""Checkpoint uploads: at PUBLISH one replica per stage streams its shard, which is spooled to disk and checked before it is kept.

Nothing is held in memory: chunks go to a file as they arrive, hashed on the way, and never
past the size the coordinator expects of that stage. A shard is kept only if it holds exactly
the stage's tensors, with their shapes, floating point and finite (the optimizer shard: only
state of the stage's parameters, finite); otherwise it is deleted and the upload refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from safetensors import safe_open

from proto import hometrain_pb2 as pb
from proto.manifest import parameter_checksum, stage_name

WEIGHTS, OPTIMIZER = "weights", "optimizer"
PARTS = (WEIGHTS, OPTIMIZER)
OPTIMIZER_PREFIX = "optim."
HEADER_ALLOWANCE = 1 << 20           # a safetensors header, beyond the tensors' bytes
MAX_HEADER_BYTES = 100 << 20         # the largest header safetensors itself reads
OPTIMIZER_FACTOR = 3                 # optimizer state is at most this many times the weights (AdamW: 2 moments)


class UploadError(ValueError):
    """An upload that is refused; the message says why."""


def expected_bytes(shapes: dict[str, tuple[int, ...]], part: str) -> int:
    """The most a stage's upload of ``part`` may hold: fp32 weights (or optimizer state) plus a header."""
    weights = sum(4 * _numel(shape) for shape in shapes.values())
    return (weights if part == WEIGHTS else OPTIMIZER_FACTOR * weights + (4 << 10) * len(shapes)) + HEADER_ALLOWANCE


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


async def spool(first: pb.CheckpointChunk, rest: AsyncIterator[pb.CheckpointChunk], path: Path) -> str:
    """Write the upload's bytes to ``path`` as they arrive; returns their sha256. Raises UploadError past
    the size the first chunk announced (which the caller has already bounded)."""
    digest, written = hashlib.sha256(), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        chunk = first
        while chunk is not None:
            written += len(chunk.data)
            if written > first.total_bytes:
                raise UploadError(f"upload exceeds the {first.total_bytes} bytes announced")
            digest.update(chunk.data)
            out.write(chunk.data)
            chunk = await anext(rest, None)
    if written != first.total_bytes:
        raise UploadError(f"upload ended after {written} of {first.total_bytes} bytes announced")
    return digest.hexdigest()


def header_names(path: Path) -> list[str]:
    """The tensor names a safetensors file's header lists, refusing a name listed twice (a JSON reader would keep one of
    them silently, and which one differs between readers) or a header larger than safetensors allows."""
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise UploadError(f"the upload is no safetensors file: {len(prefix)} bytes, not even the 8-byte header length")
        size = int.from_bytes(prefix, "little")
        if size > MAX_HEADER_BYTES:
            raise UploadError(f"the upload's safetensors header claims {size} bytes (at most {MAX_HEADER_BYTES})")
        header = f.read(size)

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise UploadError(f"the upload names tensor(s) {twice[:3]} more than once; each tensor of a stage must appear once")
        return dict(pairs)

    try:
        parsed = json.loads(header, object_pairs_hook=unique)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UploadError(f"the upload's safetensors header is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise UploadError("the upload's safetensors header is not a JSON object")
    return [k for k in parsed if k != "__metadata__"]


def check_shard(path: Path, part: str, shapes: dict[str, tuple[int, ...]], agreed: str | None = None, lora: bool = False) -> None:
    """Raise UploadError unless ``path`` is a safetensors file of exactly the stage's tensors (or optimizer state), each
    named once; with ``agreed`` (the checksum the stage's replicas reported after this round's step), unless its weights
    are those (by their names in the stage: ``stage_name`` of a LoRA checkpoint's)."""
    header_names(path)
    try:
        with safe_open(str(path), "pt") as shard:
            names = list(shard.keys())
            if part == WEIGHTS:
                missing, unexpected = sorted(set(shapes) - set(names)), sorted(set(names) - set(shapes))
                if missing or unexpected:
                    raise UploadError(f"the shard does not hold this stage's tensors: missing {missing[:3]}, unexpected {unexpected[:3]}")
            else:
                strangers = [n for n in names if not n.startswith(OPTIMIZER_PREFIX) or n[len(OPTIMIZER_PREFIX):].rsplit(".", 1)[0] not in shapes]
                if strangers:
                    raise UploadError(f"optimizer state names no parameter of this stage: {strangers[:3]}")
                steps = (shard.metadata() or {}).get("steps", "{}")
                if not isinstance(json.loads(steps), dict):
                    raise UploadError("optimizer state metadata 'steps' must be a JSON object")
            for name in names:
                tensor = shard.get_tensor(name)
                if part == WEIGHTS and (tuple(tensor.shape) != shapes[name] or not tensor.is_floating_point()):
                    raise UploadError(f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, expected floating point {list(shapes[name])}")
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise UploadError(f"tensor {name} holds NaN/Inf; checkpoint refused")
            if agreed is not None:
                got = parameter_checksum((stage_name(n) if lora else n, shard.get_tensor(n)) for n in names)
                if got != agreed:
                    raise UploadError(f"the shard's weights (checksum {got[:12]}) are not those the stage's replicas agreed on "
                                      f"this round ({agreed[:12]}); checkpoint refused")
    except UploadError:
        raise
    except Exception as exc:  # not a safetensors file, or a broken one
        raise UploadError(f"the upload is no readable safetensors file: {type(exc).__name__}: {exc}") from None
