"""Where a stage's weights come from: a live replica (weights + optimizer state) or a checkpoint.

A replica is preferred: it holds the current round's weights and the AdamW moments, so the
newcomer's next step equals its group's. The published checkpoint (HTTP, signed manifest,
sha256 per file) is the fallback when a stage has no live replica.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Callable

import torch
from safetensors.torch import load as load_safetensors

from proto.manifest import INDEX, MANIFEST, ManifestError, verify_file, verify_manifest

log = logging.getLogger(__name__)


def _get(url: str, timeout: float = 60.0, progress: Callable[[int, int], None] | None = None) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            chunks, received = [], 0
            while block := response.read(1 << 20):
                chunks.append(block)
                received += len(block)
                if progress:
                    progress(received, total)
            return b"".join(chunks)
    except OSError as exc:
        raise ConnectionError(f"cannot download {url}: {exc}") from exc


def fetch_checkpoint_tensors(
    base_url: str, names: set[str], public_key_hex: str, progress: Callable[[str, int, int], None] | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Download only the shards holding ``names`` from a checkpoint URL; verify everything.

    Returns the tensors and the checkpoint's round. Raises ManifestError on a bad signature,
    a hash mismatch or a missing tensor.
    """
    manifest = json.loads(_get(base_url + MANIFEST))
    verify_manifest(manifest, public_key_hex)
    index_bytes = _get(base_url + INDEX)
    verify_file(INDEX, index_bytes, manifest)
    weight_map: dict[str, str] = json.loads(index_bytes)["weight_map"]
    missing = sorted(names - set(weight_map))
    if missing:
        raise ManifestError(f"checkpoint of round {manifest.get('round')} lacks {len(missing)} tensors of this stage, e.g. {missing[:3]}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted({weight_map[n] for n in names}):
        data = _get(base_url + shard, progress=(lambda got, total, s=shard: progress(s, got, total)) if progress else None)
        verify_file(shard, data, manifest)
        loaded = load_safetensors(data)
        tensors.update({k: v for k, v in loaded.items() if k in names})
    return tensors, int(manifest["round"])
