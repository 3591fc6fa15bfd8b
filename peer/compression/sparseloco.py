"""SparseLoCo-style compression of a flat fp32 vector: chunk-wise top-k, low-bit values, packed indices.

A vector v (in replica sync: a replica's error-feedback accumulator of pseudo-gradients,
``peer.replica_sync``) is cut into chunks of ``chunk`` values; each chunk keeps its
``round(density * chunk)`` largest |v| (SparseLoCo, Sarfi et al., 2025, and the Covenant-72B run
sent 1.56% of values at 2 bits: 64 of every 4096). Each kept value travels as its offset inside
its chunk, packed at log2(chunk) bits (12 for 4096), and its value quantized with one scale per
``bucket`` values (``quantization``). The chunk of each offset is implied by its position in the
payload, so no index costs more than log2(chunk) bits.

``compress`` returns the payload and what it stands for, so the caller keeps ``v - sent`` (error
feedback). Unlike cocktail's shared random subset, nothing here depends on a seed: each
replica picks its own coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quantization import QuantConfig, Quantized, check_share, dequantize, pack_codes, quantize, unpack_codes, values_config

CHUNKS = tuple(2**i for i in range(6, 17))  # 64 .. 65536 values per chunk: offsets of 6 .. 16 bits


@dataclass(frozen=True)
class SparseLoCoConfig:
    """Share of each chunk kept by magnitude, values per chunk, bits per kept value, values per scale."""

    density: float = 64 / 4096
    chunk: int = 4096
    bits: int = 2
    bucket: int = 128

    def __post_init__(self) -> None:
        check_share("density", self.density)
        if self.chunk not in CHUNKS:
            raise ValueError(f"chunk must be a power of two from 64 to 65536, got {self.chunk!r}")
        self.quant

    @property
    def quant(self) -> QuantConfig:
        return values_config(self.bits, self.bucket)

    @property
    def keep(self) -> int:
        """Values kept per chunk."""
        return max(1, round(self.density * self.chunk))

    @property
    def index_bits(self) -> int:
        return int(math.log2(self.chunk))


def nbytes(payload: dict[str, torch.Tensor]) -> int:
    """Bytes the payload costs on the wire."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def _pack_offsets(offsets: torch.Tensor, bits: int) -> torch.Tensor:
    """Offsets < 2**bits as a bit stream, ``bits`` per offset, lowest bit first."""
    shifts = torch.arange(bits, device=offsets.device, dtype=torch.int32)
    return pack_codes(((offsets.reshape(-1, 1).to(torch.int32) >> shifts) & 1).reshape(-1), 1)


def _unpack_offsets(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = unpack_codes(packed, 1, count * bits).to(torch.int64).view(count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(dim=1)


def compress(v: torch.Tensor, config: SparseLoCoConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The payload for flat fp32 ``v``, and what it stands for (``decompress`` of it, on ``v``'s device)."""
    if v.dtype != torch.float32 or v.dim() != 1:
        raise ValueError(f"expected a flat float32 vector, got {v.dtype} {tuple(v.shape)}")
    numel, chunk = v.numel(), config.chunk
    chunks = -(-numel // chunk)
    padded = torch.nn.functional.pad(v, (0, chunks * chunk - numel)).view(chunks, chunk)
    magnitude = padded.abs()
    if chunks * chunk > numel:
        magnitude.view(-1)[numel:] = -1.0  # padding is never chosen while a real value is left
    keep = min(config.keep, chunk)
    offsets = magnitude.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
    values = padded.gather(1, offsets)
    payload = {"offsets": _pack_offsets(offsets, config.index_bits), "meta": torch.tensor([numel, keep], dtype=torch.int64),
               **quantize(values.reshape(-1), config.quant).to_tensors("values.")}
    return payload, decompress(payload, numel, config, device=v.device)


def decompress(payload: dict[str, torch.Tensor], numel: int, config: SparseLoCoConfig,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Dense fp32 vector of ``numel``: the sent values at their coordinates, zeros elsewhere; ValueError for a
    payload that does not fit ``numel`` and ``config``."""
    if "offsets" not in payload or "meta" not in payload:
        raise ValueError(f"sparseloco payload needs 'offsets' and 'meta', got {sorted(payload)}")
    offsets, meta = payload["offsets"], payload["meta"]
    device = device if device is not None else offsets.device
    chunk, keep = config.chunk, min(config.keep, config.chunk)
    chunks = -(-numel // chunk)
    if meta.dtype != torch.int64 or meta.shape != (2,) or meta.tolist() != [numel, keep]:
        raise ValueError(f"sparseloco meta must be int64 [numel={numel}, kept per chunk={keep}], got {meta.tolist()}: "
                         "check that all replicas run the same --sync-density and --sync-chunk")
    count = chunks * keep
    expected = -(-count * config.index_bits // 8)
    if offsets.dtype != torch.uint8 or offsets.shape != (expected,):
        raise ValueError(f"offsets must be uint8 of {expected} bytes, got {offsets.dtype} {tuple(offsets.shape)}")
    q = Quantized.from_tensors(payload, "values.")
    if q.shape != (count,) or q.dtype != torch.float32 or (q.bits, q.block) != (config.bits, config.bucket):
        raise ValueError(f"values must be {count} fp32 quantized with bits={config.bits}, bucket={config.bucket}; "
                         f"got {q.shape} {q.dtype} bits={q.bits} block={q.block}")
    where = _unpack_offsets(offsets.to(device), config.index_bits, count).view(chunks, keep)
    where = where + torch.arange(chunks, device=device).unsqueeze(1) * chunk
    dense = torch.zeros(chunks * chunk, dtype=torch.float32, device=device)
    dense[where.reshape(-1)] = dequantize(q.to(device))
    # A last chunk with fewer real values than it keeps sends padding too (quantized, it comes back nonzero): dropped.
    return dense[:numel]
