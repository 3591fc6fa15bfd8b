"""AQ-SGD activation compression between two pipeline stages, with a bounded per-sample cache.

AQ-SGD (Wang et al., 2022) sends, for a training sample seen before, the quantized change
Q(a - m) of its boundary activation a against m, the last reconstruction both sides agreed on
for that sample, and both set m <- m + deQ(Q(a - m)). As training settles, a - m shrinks and
so does its quantization error, unlike Q(a). A sample's first visit sends Q(a), m <- deQ(Q(a)).

Protocol, one ``AQSGDSender`` per destination peer and one ``AQSGDReceiver`` per source peer:

1. ``sender.encode(ids, a, config)`` gives frame tensors and a pending commit. Each sample goes
   as a delta against its cached version b (the frame's ``base`` tensor says b), or directly
   (b = -1) when the sender has no entry. The sender's cache does not change yet.
2. ``receiver.decode(ids, tensors)`` rebuilds m_b + deQ for deltas (deQ alone for direct
   samples) and stores it as version b + 1 (0 for direct), keeping version b so that a retry
   still decodes, and dropping older ones. If it lacks some (id, b) (it restarted, or dropped the
   entry past its disk bound) it raises ``MissingEntries`` before changing anything.
3. After the receiver's reply, ``sender.commit(pending)`` stores the same version b + 1. If the
   reply was lost, ``sender.abort(pending)`` and a retry encodes against b again, which the
   receiver still holds; its decode replaces the earlier b + 1. On ``MissingEntries`` the
   sender aborts, ``forget``s those samples and encodes again: they go directly. A new route
   means a new sender/receiver pair with empty caches, hence direct sends. A sample has at
   most one frame in flight to a given peer.

Both sides compute m_b + dequantize(q) from the same codes, in the activation's dtype, so
their caches stay bit-identical. Entries are kept in the activation's dtype (fp16/bf16 for
GPT-J boundaries): the same arithmetic on both sides, and half the memory of fp32. The cache
keeps entries in memory up to a byte bound, spills least-recently-used ones to safetensors
files, reloads them on access, and past an optional disk bound drops them (a later delta for
that sample then falls back to a direct send). Its memory bound can be lowered while it runs
(``set_memory_limit``): a peer shares one budget among the caches of all its neighbours.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable

import torch
from safetensors.torch import load, save_file

from .quantization import QuantConfig, Quantized, dequantize, quantize

PREFIX = "aq."


@dataclass(frozen=True)
class CacheConfig:
    """Bytes kept in memory, where to spill beyond that, and bytes kept on disk (None: no bound)."""

    max_memory_bytes: int = 1 << 30
    spill_dir: str | Path | None = None
    max_disk_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_memory_bytes, int) or self.max_memory_bytes < 0:
            raise ValueError(f"max_memory_bytes must be an int >= 0, got {self.max_memory_bytes!r}")
        if self.max_disk_bytes is not None and (not isinstance(self.max_disk_bytes, int) or self.max_disk_bytes < 0):
            raise ValueError(f"max_disk_bytes must be None or an int >= 0, got {self.max_disk_bytes!r}")
        if self.max_disk_bytes is not None and self.spill_dir is None:
            raise ValueError("max_disk_bytes was given without spill_dir; set spill_dir to spill to disk")


@dataclass
class Entry:
    version: int
    tensor: torch.Tensor  # shared with the cache: read it, never modify it in place


@dataclass
class CacheStats:
    memory_bytes: int = 0
    disk_bytes: int = 0
    entries: int = 0
    spills: int = 0
    reloads: int = 0
    drops: int = 0
    hits: int = 0
    misses: int = 0


@dataclass
class _Spilled:
    version: int
    path: Path
    nbytes: int
    device: torch.device


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ActivationCache:
    """Versioned tensors by key, least-recently-used first out: memory, then disk, then gone."""

    def __init__(self, config: CacheConfig | None = None) -> None:
        self.config = config if config is not None else CacheConfig()
        self._memory: OrderedDict[Hashable, Entry] = OrderedDict()
        self._disk: OrderedDict[Hashable, _Spilled] = OrderedDict()
        self._dir = None
        if self.config.spill_dir is not None:
            Path(self.config.spill_dir).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="activations-", dir=self.config.spill_dir))
        self._names = itertools.count()
        self._stats = CacheStats()
        self._memory_limit = self.config.max_memory_bytes
        self._disk_limit = self.config.max_disk_bytes

    def __contains__(self, key: Hashable) -> bool:
        return key in self._memory or key in self._disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    @property
    def memory_limit(self) -> int:
        return self._memory_limit

    def set_memory_limit(self, nbytes: int) -> None:
        """Keep at most ``nbytes`` in memory from now on, spilling (or dropping) what exceeds it now."""
        if nbytes < 0:
            raise ValueError(f"memory limit must be >= 0 bytes, got {nbytes}")
        self._memory_limit = nbytes
        self._evict()

    def set_disk_limit(self, nbytes: int | None) -> None:
        """Keep at most ``nbytes`` spilled on disk from now on (None: no bound), dropping the oldest beyond it now."""
        if nbytes is not None and nbytes < 0:
            raise ValueError(f"disk limit must be None or >= 0 bytes, got {nbytes}")
        self._disk_limit = nbytes
        self._evict()

    def stats(self) -> CacheStats:
        return CacheStats(**{**self._stats.__dict__, "entries": len(self)})

    def put(self, key: Hashable, tensor: torch.Tensor, version: int = 0) -> None:
        self.discard(key)
        self._memory[key] = Entry(version, tensor.detach())
        self._stats.memory_bytes += _nbytes(tensor)
        self._evict()

    def get(self, key: Hashable) -> Entry | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            self._stats.hits += 1
            return self._memory[key]
        spilled = self._disk.pop(key, None)
        if spilled is None:
            self._stats.misses += 1
            return None
        tensor = load(spilled.path.read_bytes())["m"].to(spilled.device)
        spilled.path.unlink()
        self._stats.disk_bytes -= spilled.nbytes
        self._stats.reloads += 1
        self._stats.hits += 1
        self.put(key, tensor, spilled.version)
        return Entry(spilled.version, tensor)

    def discard(self, key: Hashable) -> None:
        entry = self._memory.pop(key, None)
        if entry is not None:
            self._stats.memory_bytes -= _nbytes(entry.tensor)
        spilled = self._disk.pop(key, None)
        if spilled is not None:
            spilled.path.unlink(missing_ok=True)
            self._stats.disk_bytes -= spilled.nbytes

    def close(self) -> None:
        """Forget everything and remove the spill files."""
        self._memory.clear()
        self._disk.clear()
        self._stats.memory_bytes = self._stats.disk_bytes = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _evict(self) -> None:
        while self._stats.memory_bytes > self._memory_limit and self._memory:
            key, entry = self._memory.popitem(last=False)
            nbytes = _nbytes(entry.tensor)
            self._stats.memory_bytes -= nbytes
            if self._dir is None:
                self._stats.drops += 1
                continue
            path = self._dir / f"{next(self._names)}.safetensors"
            save_file({"m": entry.tensor.contiguous().cpu()}, path)
            self._disk[key] = _Spilled(entry.version, path, nbytes, entry.tensor.device)
            self._stats.disk_bytes += nbytes
            self._stats.spills += 1
        limit = self._disk_limit
        while limit is not None and self._stats.disk_bytes > limit and self._disk:
            _, spilled = self._disk.popitem(last=False)
            spilled.path.unlink(missing_ok=True)
            self._stats.disk_bytes -= spilled.nbytes
            self._stats.drops += 1


class MissingEntries(Exception):
    """The receiver lacks the base version of these samples; the sender must send them directly."""

    def __init__(self, sample_ids: list[int]) -> None:
        super().__init__(f"no cached base activation for samples {sample_ids}; re-send them directly")
        self.sample_ids = list(sample_ids)


@dataclass
class Pending:
    """What the sender stores once the receiver has acknowledged the frame."""

    entries: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # sample id, version, m


def _rebuild(q: Quantized, bases: list[torch.Tensor], delta_rows: list[int]) -> torch.Tensor:
    """m_b + deQ(q) for delta rows, deQ(q) for direct rows: the arithmetic both sides share."""
    out = dequantize(q)
    if delta_rows:
        rows = torch.tensor(delta_rows, device=out.device)
        out[rows] = torch.stack(bases).to(out.device) + out[rows]
    return out


def _check_ids(sample_ids: list[int], batch: int) -> None:
    if len(sample_ids) != batch or len(set(sample_ids)) != batch:
        raise ValueError(f"need {batch} distinct sample ids for a batch of {batch}, got {list(sample_ids)}")


class AQSGDSender:
    """Encodes activations for one destination peer; commits its cache only once acknowledged."""

    def __init__(self, cache: ActivationCache | None = None, prefix: str = PREFIX) -> None:
        self.cache = cache if cache is not None else ActivationCache()
        self.prefix = prefix

    def encode(self, sample_ids: list[int], activations: torch.Tensor, config: QuantConfig,
               generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], Pending]:
        _check_ids(sample_ids, activations.shape[0])
        x = activations.detach()
        versions, bases, delta_rows = [], [], []
        for row, sid in enumerate(sample_ids):
            entry = self.cache.get(sid)
            usable = entry is not None and entry.tensor.shape == x.shape[1:] and entry.tensor.dtype == x.dtype
            versions.append(entry.version if usable else -1)
            if usable:
                bases.append(entry.tensor.to(x.device))
                delta_rows.append(row)
        if delta_rows:
            x = x.clone()
            rows = torch.tensor(delta_rows, device=x.device)
            x[rows] = x[rows] - torch.stack(bases)
        q = quantize(x, config, generator)
        rebuilt = _rebuild(q, bases, delta_rows)
        pending = Pending([(sid, versions[i] + 1, rebuilt[i].clone()) for i, sid in enumerate(sample_ids)])
        tensors = q.to_tensors(self.prefix)
        tensors[self.prefix + "base"] = torch.tensor(versions, dtype=torch.int64)
        return tensors, pending

    def commit(self, pending: Pending) -> None:
        for sid, version, tensor in pending.entries:
            self.cache.put(sid, tensor, version)
        pending.entries.clear()

    def abort(self, pending: Pending) -> None:
        pending.entries.clear()

    def forget(self, sample_ids: list[int]) -> None:
        for sid in sample_ids:
            self.cache.discard(sid)


class AQSGDReceiver:
    """Decodes frames from one source peer; keeps the two latest versions of each sample.

    Frames arrive on the CPU; ``device`` is where they are decoded and the entries kept."""

    def __init__(self, cache: ActivationCache | None = None, prefix: str = PREFIX, device: torch.device | str | None = None) -> None:
        self.cache = cache if cache is not None else ActivationCache()
        self.prefix = prefix
        self.device = device
        self._versions: dict[int, list[int]] = {}

    def decode(self, sample_ids: list[int], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        q = Quantized.from_tensors(tensors, self.prefix)
        q = q.to(self.device) if self.device is not None else q
        base = tensors.get(self.prefix + "base")
        batch = q.shape[0] if q.shape else -1
        if base is None or base.dtype != torch.int64 or base.dim() != 1 or base.numel() != batch:
            raise ValueError(f"{self.prefix}base must be 1-D int64 with one version per sample of a batch of {batch}")
        _check_ids(sample_ids, batch)
        versions = base.tolist()
        if min(versions, default=0) < -1:
            raise ValueError(f"{self.prefix}base versions must be >= -1, got {versions}")
        bases, delta_rows, missing = [], [], []
        for row, (sid, version) in enumerate(zip(sample_ids, versions)):
            if version < 0:
                continue
            entry = self.cache.get((sid, version))
            if entry is None or entry.tensor.shape != q.shape[1:] or entry.tensor.dtype != q.dtype:
                missing.append(sid)
            else:
                bases.append(entry.tensor)
                delta_rows.append(row)
        if missing:
            raise MissingEntries(missing)
        rebuilt = _rebuild(q, bases, delta_rows)
        for row, (sid, version) in enumerate(zip(sample_ids, versions)):
            keep = [version, version + 1] if version >= 0 else [0]
            for old in self._versions.get(sid, []):
                if old not in keep:
                    self.cache.discard((sid, old))
            self.cache.put((sid, version + 1), rebuilt[row].clone(), version + 1)
            self._versions[sid] = keep
        return rebuilt

    def forget(self, sample_ids: list[int]) -> None:
        for sid in sample_ids:
            for version in self._versions.pop(sid, []):
                self.cache.discard((sid, version))
