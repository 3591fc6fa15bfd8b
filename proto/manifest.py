"""The checkpoint manifest: what a published checkpoint holds, hashed and signed.

The coordinator signs ``manifest.json`` with its Ed25519 key; peers (and anyone handed a
checkpoint) verify the signature with the public key and every file against its sha256.
Shared by both processes because a checkpoint crosses from one to the other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"


def shard_name(stage: int, num_stages: int) -> str:
    """The file of a stage's weights in a checkpoint (Hugging Face's sharded layout)."""
    return f"model-{stage + 1:05d}-of-{num_stages:05d}.safetensors"


ADAPTER_FILE = "adapter_model.safetensors"   # LoRA runs: every stage's adapters, named as peft names them
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_PREFIX = "base_model.model."
PEFT_ADAPTER = "default"  # peft's adapter name inside a model: a stage's adapter tensors carry it, a checkpoint's do not


def checkpoint_name(name: str) -> str:
    """An adapter tensor's name in a published checkpoint (peft's): ``base_model.model.<module>.lora_A.weight``."""
    return ADAPTER_PREFIX + name.replace(f".{PEFT_ADAPTER}.", ".")


def stage_name(name: str) -> str:
    """Inverse of ``checkpoint_name``: the adapter tensor's name in a stage."""
    base = name[len(ADAPTER_PREFIX):] if name.startswith(ADAPTER_PREFIX) else name
    for part in ("lora_A", "lora_B"):
        base = base.replace(f".{part}.weight", f".{part}.{PEFT_ADAPTER}.weight")
    return base


def parameter_checksum(named: Any) -> str:
    """sha256 over every tensor's bytes in name order: equal iff replicas are bit-identical. The coordinator computes
    it of an uploaded shard too (by its tensors' names in the stage), to check it is the weights the replicas agreed on."""
    digest = hashlib.sha256()
    # a module (its named_parameters()), a mapping of name -> tensor, or (name, tensor) pairs
    items = named.named_parameters() if hasattr(named, "named_parameters") else named.items() if isinstance(named, Mapping) else named
    for name, tensor in sorted(items, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def optimizer_shard_name(stage: int, num_stages: int) -> str:
    """The file of a stage's optimizer state in a checkpoint (not in the model index; in the manifest)."""
    return f"optimizer-{stage + 1:05d}-of-{num_stages:05d}.safetensors"


def is_optimizer_shard(name: str) -> bool:
    """Whether a checkpoint file holds optimizer state (read to resume training, never to use the model)."""
    return name.startswith("optimizer-") and name.endswith(".safetensors")


class ManifestError(ValueError):
    """A checkpoint that must not be trusted: bad signature, missing file or wrong hash."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_manifest(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``body`` plus ``signature``: Ed25519 over the canonical JSON of everything else."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    return {**unsigned, "signature": key.sign(_canonical(unsigned)).hex()}


MAX_MANIFEST_FILES = 4096  # far more shards than a model has


def parse_manifest(data: bytes | str) -> dict[str, Any]:
    """A manifest as a server sent it, shaped as one: a JSON object whose "files" maps plain file names to sha256 hex.
    ManifestError otherwise (before its signature is checked, so that no later step trips on a malformed one)."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"the manifest is not JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"the manifest is not a JSON object but {type(manifest).__name__}")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or len(files) > MAX_MANIFEST_FILES:
        raise ManifestError(f"the manifest's files must be an object of at most {MAX_MANIFEST_FILES} names, got {type(files).__name__}")
    for name, digest in files.items():
        if not name or "/" in name or "\\" in name or name.startswith(".") or not isinstance(digest, str) or len(digest) != 64:
            raise ManifestError(f"the manifest lists {name[:80]!r} -> {str(digest)[:80]!r}: not a plain file name with a sha256")
    return manifest


def verify_manifest(manifest: dict[str, Any], public_key_hex: str) -> None:
    """Raise ManifestError unless ``manifest`` carries a valid signature by ``public_key_hex``."""
    signature = manifest.get("signature")
    if not isinstance(signature, str):
        raise ManifestError("manifest has no signature")
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(bytes.fromhex(signature), _canonical(unsigned))
    except (InvalidSignature, ValueError) as exc:
        raise ManifestError(f"manifest signature does not verify with key {public_key_hex[:16]}...: {exc or 'invalid'}") from None


def verify_file(name: str, data: bytes, manifest: dict[str, Any]) -> None:
    """Raise ManifestError unless ``data`` is the file ``name`` the manifest lists."""
    expected = manifest.get("files", {}).get(name)
    if expected is None:
        raise ManifestError(f"{name} is not listed in the manifest")
    actual = sha256_bytes(data)
    if actual != expected:
        raise ManifestError(f"{name}: sha256 {actual[:16]}... does not match the manifest's {expected[:16]}...")


def verify_directory(directory: Path, public_key_hex: str | None = None, model_only: bool = False) -> dict[str, Any]:
    """Check every file of a checkpoint directory (and the signature if a key is given); return the manifest.

    ``model_only``: the optimizer shards may be absent (a copy made to use the model); those present are checked."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST}: not a complete checkpoint")
    manifest = parse_manifest(path.read_bytes())
    if public_key_hex:
        verify_manifest(manifest, public_key_hex)
    for name, expected in manifest.get("files", {}).items():
        file = directory / name
        if model_only and is_optimizer_shard(name) and not file.exists():
            continue
        if not file.is_file():
            raise ManifestError(f"{directory}: {name} is listed in the manifest but missing")
        if sha256_file(file) != expected:
            raise ManifestError(f"{directory}: {name} does not match its sha256 in the manifest")
    return manifest
