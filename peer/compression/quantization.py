"""Blockwise quantizers with packed storage, for tensors that cross the wire.

A tensor is flattened and cut into blocks of ``block`` values, each with its own scale, so
one outlier only coarsens its block. Three methods:

* ``bnb8``: deterministic 8-bit, bitsandbytes' dynamic 8-bit map scaled by the block absmax.
* ``nf4``: deterministic 4-bit, bitsandbytes' NF4 map scaled by the block absmax. Both maps
  put more levels near zero, which suits bell-shaped activations and gradients.
* ``linear``: our own uniform symmetric grid, for 2 bits and for every stochastic config
  (bitsandbytes has neither). With L = 2**bits levels and a per-block half step s, code k in
  0..L-1 stands for (2k - (L - 1)) * s, the odd multiples of s up to +-(L - 1)s (2 bits: +-s,
  +-3s). No level is zero, so all L codes carry information; an all-zero block has s = 0 and
  comes back as zeros.
  - stochastic: s = absmax / (L - 1), so the grid spans the block, and each value goes to one
    of its two neighbouring levels with the probability that makes the expected value the
    input (unbiased).
  - deterministic 2-bit: 2s = 0.9957 x the block's RMS, the MSE-optimal uniform 4-level step
    for Gaussian data, clipping the rare values beyond 3s: 34% relative L2 error on Gaussian
    data instead of 51% with an absmax scale, and an outlier no longer pushes every other
    value of its block to +-absmax/3.

Dequantizing is one fp32 multiply of an exact level by the block scale, then a cast to the
original dtype, so two peers holding the same codes rebuild bit-identical tensors; the
AQ-SGD activation cache relies on that. ``Quantized.to_tensors`` flattens a result into named
uint8 / float32 / int64 tensors for a frame; ``from_tensors`` refuses anything inconsistent,
because a peer may send garbage.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch

BLOCKS = tuple(2**i for i in range(5, 13))  # 32 .. 4096, what the bitsandbytes kernels accept
METHODS = ("bnb8", "nf4", "linear")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GAUSS_STEP_2BIT = 0.9957  # optimal 4-level uniform quantizer step, in standard deviations (Max, 1960)
_META_HEAD = 6  # bits, block, method id, dtype id, numel check, ndim; then the shape


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: bits per value, values per scaled block, stochastic rounding or not.

    ``method`` follows: deterministic 8 -> bnb8, deterministic 4 -> nf4, else linear."""

    bits: int
    block: int = 64
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"QuantConfig.bits must be 2, 4 or 8, got {self.bits!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"QuantConfig.block must be a power of two in {BLOCKS}, got {self.block!r}")
        if self.method == "bnb8" and self.block < 64:
            raise ValueError(f"deterministic 8-bit (bitsandbytes) needs block >= 64, got {self.block}; use 64 or more")

    @property
    def method(self) -> str:
        if self.stochastic or self.bits == 2:
            return "linear"
        return "bnb8" if self.bits == 8 else "nf4"


def values_config(bits: int, bucket: int) -> QuantConfig:
    """How a sparse sync's kept values are quantized; ValueError names both settings if they cannot be."""
    try:
        return QuantConfig(bits, block=bucket)
    except ValueError as error:
        raise ValueError(f"bits={bits!r}, bucket={bucket!r} cannot quantize the values: {error}") from None


def check_share(name: str, value: float) -> None:
    """ValueError unless ``value`` is a share in (0, 1]."""
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


@dataclass
class Quantized:
    """Everything needed to rebuild a quantized tensor; ``codes`` are packed 8 // bits per byte."""

    codes: torch.Tensor  # uint8, 1-D, packed
    scales: torch.Tensor  # float32, one per block: absmax for bnb8/nf4, the half step s for linear
    shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int
    block: int
    method: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes this costs on the wire (codes, scales and the small meta tensor)."""
        return self.codes.numel() + 4 * self.scales.numel() + 8 * (_META_HEAD + len(self.shape))

    def to(self, device: torch.device | str) -> Quantized:
        return Quantized(self.codes.to(device), self.scales.to(device), self.shape, self.dtype, self.bits, self.block, self.method)

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        head = [self.bits, self.block, METHODS.index(self.method), DTYPES.index(self.dtype), self.numel, len(self.shape)]
        meta = torch.tensor(head + list(self.shape), dtype=torch.int64)
        return {f"{prefix}codes": self.codes, f"{prefix}scales": self.scales, f"{prefix}meta": meta}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> Quantized:
        """Rebuild from ``to_tensors`` output; ValueError for anything missing or inconsistent."""
        names = [f"{prefix}codes", f"{prefix}scales", f"{prefix}meta"]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"quantized tensor needs {names}; missing {missing}")
        codes, scales, meta = (tensors[n] for n in names)
        if meta.dtype != torch.int64 or meta.dim() != 1 or not _META_HEAD <= meta.numel() <= _META_HEAD + 16:
            raise ValueError(f"{names[2]} must be 1-D int64 of {_META_HEAD} + ndim (<= 16) values, got {meta.dtype} {tuple(meta.shape)}")
        bits, block, method_id, dtype_id, numel, ndim, *shape = meta.tolist()
        if ndim != len(shape) or any(d < 0 for d in shape) or math.prod(shape) != numel:
            raise ValueError(f"{names[2]} shape {shape} does not match ndim {ndim} and numel {numel}")
        if not 0 <= method_id < len(METHODS) or not 0 <= dtype_id < len(DTYPES):
            raise ValueError(f"unknown method id {method_id} or dtype id {dtype_id}")
        method = METHODS[method_id]
        if bits not in (2, 4, 8) or block not in BLOCKS:
            raise ValueError(f"bits must be 2, 4 or 8 and block in {BLOCKS}; got bits={bits}, block={block}")
        if (method == "bnb8" and (bits != 8 or block < 64)) or (method == "nf4" and bits != 4):
            raise ValueError(f"method {method} cannot have bits={bits}, block={block}")
        if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != _packed_len(numel, bits):
            raise ValueError(f"{names[0]}: expected 1-D uint8 of {_packed_len(numel, bits)} bytes, got {codes.dtype} {tuple(codes.shape)}")
        if scales.dtype != torch.float32 or scales.dim() != 1 or scales.numel() != -(-numel // block):
            raise ValueError(f"{names[1]}: expected 1-D float32 of {-(-numel // block)} blocks, got {scales.dtype} {tuple(scales.shape)}")
        if codes.device != scales.device:
            raise ValueError(f"codes on {codes.device} but scales on {scales.device}")
        if scales.numel() and not bool((torch.isfinite(scales) & (scales >= 0)).all()):
            raise ValueError(f"{names[1]} must be finite and non-negative")
        return cls(codes, scales, tuple(shape), DTYPES[dtype_id], bits, block, method)


@functools.cache
def _dynamic_map(device: torch.device) -> torch.Tensor:
    return bnbf.create_dynamic_map().to(device)


def _packed_len(numel: int, bits: int) -> int:
    return -(-numel * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes < 2**bits, 8 // bits per byte, first code in the lowest bits."""
    per = 8 // bits
    codes = codes.to(torch.uint8).reshape(-1)
    if per == 1:
        return codes
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % per)).view(-1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``numel`` codes as uint8."""
    if bits == 8:
        return packed[:numel]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]


def quantize(x: torch.Tensor, config: QuantConfig, generator: torch.Generator | None = None) -> Quantized:
    """Quantize ``x`` (fp32/fp16/bf16, any shape, any device); ``generator`` drives stochastic rounding
    and must live on ``x``'s device."""
    if x.dtype not in DTYPES:
        raise ValueError(f"quantize accepts {DTYPES}, got {x.dtype}; cast the tensor first")
    flat, n, method = x.detach().reshape(-1), x.numel(), config.method
    blocks = -(-n // config.block)
    if n == 0:
        codes = torch.empty(0, dtype=torch.uint8, device=x.device)
        scales = torch.empty(0, dtype=torch.float32, device=x.device)
    elif method == "bnb8":
        codes, state = bnbf.quantize_blockwise(flat.contiguous(), blocksize=config.block)
        scales = state.absmax.float()
    elif method == "nf4":
        # An even length keeps bitsandbytes' CPU kernel on its native path; the pad is a zero.
        packed, state = bnbf.quantize_4bit(torch.nn.functional.pad(flat, (0, n % 2)), blocksize=config.block, quant_type="nf4")
        codes, scales = packed.reshape(-1), state.absmax.float()[:blocks]
    else:
        levels = 2**config.bits - 1  # L - 1
        padded = torch.nn.functional.pad(flat.float(), (0, blocks * config.block - n)).view(blocks, config.block)
        if config.stochastic:  # the grid must span the block for rounding to be unbiased
            scales = padded.abs().amax(dim=1) / levels
        else:  # deterministic 2-bit: the MSE-optimal uniform step for Gaussian data, clipping the tails
            counts = (n - torch.arange(blocks, device=x.device) * config.block).clamp(max=config.block)
            scales = (padded.square().sum(dim=1) / counts).sqrt() * (_GAUSS_STEP_2BIT / 2)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        u = ((padded / safe.unsqueeze(1) + levels) / 2).clamp_(0, levels)  # position on the grid, 0..L-1
        if config.stochastic:
            u = (u + torch.rand(u.shape, generator=generator, device=u.device, dtype=u.dtype)).floor_()
        else:
            u = u.round_()
        codes = pack_codes(u.clamp_(0, levels).reshape(-1)[:n], config.bits)
    return Quantized(codes, scales, tuple(x.shape), x.dtype, config.bits, config.block, method)


def dequantize(q: Quantized) -> torch.Tensor:
    """Rebuild the tensor in ``q.dtype`` and ``q.shape`` on the device of ``q.codes``."""
    n = q.numel
    if n == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.codes.device)
    if q.method == "bnb8":
        state = bnbf.QuantState(absmax=q.scales, code=_dynamic_map(q.codes.device), blocksize=q.block, dtype=q.dtype)
        return bnbf.dequantize_blockwise(q.codes, state).reshape(q.shape)
    if q.method == "nf4":
        even = n + n % 2
        state = bnbf.QuantState(absmax=q.scales, shape=torch.Size([even]), code=bnbf.get_4bit_type("nf4", q.codes.device),
                                blocksize=q.block, quant_type="nf4", dtype=q.dtype)
        return bnbf.dequantize_4bit(q.codes.view(-1, 1), state).reshape(-1)[:n].reshape(q.shape)
    levels = 2**q.bits - 1
    grid = unpack_codes(q.codes, q.bits, n).float() * 2 - levels  # exact odd integers
    per_value = q.scales.repeat_interleave(q.block)[:n]
    return (grid * per_value).to(q.dtype).reshape(q.shape)


def encode_direct(x: torch.Tensor, config: QuantConfig, prefix: str, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``x`` quantized in one pass, as named frame tensors ``{prefix}codes``, ``{prefix}scales``, ``{prefix}meta``."""
    return quantize(x, config, generator).to_tensors(prefix)


def decode_direct(tensors: dict[str, torch.Tensor], prefix: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse of ``encode_direct``; ValueError for anything missing or inconsistent."""
    q = Quantized.from_tensors(tensors, prefix)
    return dequantize(q.to(device) if device is not None else q)
