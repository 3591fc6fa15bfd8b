"""What crosses a stage boundary, per the run's compression settings.

Activations forward are sent plain, directly quantized, or AQ-SGD-compressed (the quantized
change since the sample's last visit, against caches both ends keep in step: see
``peer.activation_cache``). AQ-SGD keeps one sender per destination peer and one receiver
per source peer, since each pair of peers shares its own cache; a sample's first
visit goes at ``activation_first_bits`` (its rows travel as a separate quantized block) so
the caches start close to the truth, while revisits go at ``activation_bits``. Activation
gradients backward are sent plain or directly quantized (2, 4 or 8 bits), with
``boundary_block`` values per scale. When activations are compressed, what travels beside
them is packed losslessly too: token ids in the narrowest integer type their values fit, a
0/1 loss mask as bits (at fp32 and int64 they would cost a quarter of a 2-bit frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from proto.codec import FrameError
from proto.run_config import TrainConfig

from .activation_cache import (
    PREFIX,
    ActivationCache,
    AQSGDReceiver,
    AQSGDSender,
    CacheConfig,
    MissingEntries,
    Pending,
    decode_direct,
    encode_direct,
)
from .quantization import QuantConfig, pack_codes, unpack_codes

GRAD_PREFIX = "gq."
FIRST_PREFIX = "aqf."  # AQ-SGD rows on their first visit, at --activation-first-bits
FIRST_ROWS = FIRST_PREFIX + "rows"
MASK_BITS = "loss_mask.bits"
NARROW_INTS = ("target_ids", "prefix_lengths")  # int64 fields a frame may carry narrower
__all__ = ["BoundaryCodec", "MissingEntries", "Outgoing"]


@dataclass
class Outgoing:
    """Activations of one microbatch on their way to the next stage (re-encoded per destination)."""

    sample_ids: list[int]
    hidden: torch.Tensor
    extras: dict[str, torch.Tensor]   # targets, loss mask, prefix lengths: small, sent as they are
    pending: list[Pending] | None = None


class BoundaryCodec:
    """Encodes and decodes the tensors of FORWARD and BACKWARD frames for this peer."""

    def __init__(self, train: TrainConfig, cache_bytes: int, cache_dir: str | Path | None, device: torch.device) -> None:
        self.train = train
        self.device = device
        self.cache_bytes = cache_bytes
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # Per peer, a pair sharing one cache: revisits ("aq.") and first visits ("aqf."), each at its own bits.
        self._senders: dict[str, tuple[AQSGDSender, AQSGDSender]] = {}
        self._receivers: dict[str, tuple[AQSGDReceiver, AQSGDReceiver]] = {}

    def _cache(self, role: str, peer: str) -> ActivationCache:
        # Each pair of peers shares a cache; the memory bound is split evenly among them as they appear.
        spill = self.cache_dir / f"{role}-{peer[-12:]}" if self.cache_dir else None
        return ActivationCache(CacheConfig(max_memory_bytes=self.cache_bytes // 4, spill_dir=spill))

    # ------------------------------------------------------------ activations

    def encode_activations(self, dest: str, out: Outgoing) -> dict[str, torch.Tensor]:
        """Frame tensors for ``dest``; with AQ-SGD remembers what to commit once ``dest`` answers."""
        mode = self.train.activation_compression
        if mode == "none":
            return {"hidden": out.hidden, **out.extras}
        bits = self._quant(self.train.activation_bits)
        extras = pack_extras(out.extras)
        if mode == "direct":
            return {**encode_direct(out.hidden, bits), **extras}
        if dest not in self._senders:
            cache = self._cache("to", dest)
            self._senders[dest] = (AQSGDSender(cache, PREFIX), AQSGDSender(cache, FIRST_PREFIX))
        revisit, first = self._senders[dest]
        new = [i for i, sid in enumerate(out.sample_ids) if revisit.cache.get(sid) is None]
        old = [i for i in range(len(out.sample_ids)) if i not in set(new)]
        tensors: dict[str, torch.Tensor] = {}
        out.pending = []
        for sender, rows, config in ((revisit, old, bits), (first, new, self._quant(self.train.activation_first_bits))):
            if rows:
                part, pending = sender.encode([out.sample_ids[i] for i in rows], out.hidden[rows], config)
                tensors.update(part)
                out.pending.append(pending)
        if new and old:
            tensors[FIRST_ROWS] = torch.tensor(new, dtype=torch.int64)
        return {**tensors, **extras}

    def _quant(self, bits: int) -> QuantConfig:
        return QuantConfig(bits=bits, block=self.train.boundary_block)

    def acknowledged(self, dest: str, out: Outgoing) -> None:
        for pending in out.pending or ():
            self._senders[dest][0].commit(pending)
        out.pending = None

    def failed(self, dest: str, out: Outgoing) -> None:
        for pending in out.pending or ():
            self._senders[dest][0].abort(pending)
        out.pending = None

    def missing(self, dest: str, out: Outgoing, sample_ids: list[int]) -> None:
        """``dest`` lacks these samples' entries (it restarted, or the route changed): they go direct next time."""
        self.failed(dest, out)
        if dest in self._senders:
            self._senders[dest][0].forget(sample_ids)

    def decode_activations(self, source: str, sample_ids: list[int], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The activations a FORWARD frame from ``source`` carries; raises MissingEntries (AQ-SGD) or FrameError."""
        if "hidden" in tensors:
            return tensors["hidden"]
        try:
            if PREFIX + "base" in tensors or FIRST_PREFIX + "base" in tensors:
                return self._decode_aqsgd(source, list(sample_ids), dict(tensors))
            return decode_direct(dict(tensors))
        except MissingEntries:
            raise
        except (ValueError, KeyError) as exc:
            raise FrameError(f"undecodable activations: {exc}") from None

    def _decode_aqsgd(self, source: str, sample_ids: list[int], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if source not in self._receivers:
            cache = self._cache("from", source)
            self._receivers[source] = (AQSGDReceiver(cache, PREFIX, self.device), AQSGDReceiver(cache, FIRST_PREFIX, self.device))
        revisit, first = self._receivers[source]
        has_old, has_new = PREFIX + "base" in tensors, FIRST_PREFIX + "base" in tensors
        if has_old and has_new:
            rows = tensors.get(FIRST_ROWS)
            if rows is None or rows.dtype != torch.int64 or rows.dim() != 1 or len(set(rows.tolist())) != rows.numel() \
                    or not all(0 <= r < len(sample_ids) for r in rows.tolist()):
                raise ValueError(f"{FIRST_ROWS} must list distinct rows of the batch of {len(sample_ids)}")
            new = rows.tolist()
        else:
            new = list(range(len(sample_ids))) if has_new else []
        old = [i for i in range(len(sample_ids)) if i not in set(new)]
        parts = []
        if old:
            parts.append((old, revisit.decode([sample_ids[i] for i in old], tensors)))
        if new:
            parts.append((new, first.decode([sample_ids[i] for i in new], tensors)))
        like = parts[0][1]
        hidden = torch.empty((len(sample_ids), *like.shape[1:]), dtype=like.dtype, device=like.device)
        for rows, values in parts:
            hidden[rows] = values
        return hidden

    # ------------------------------------------------------------ gradients

    def encode_gradient(self, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.train.gradient_bits:
            return {"grad": grad}
        return encode_direct(grad, self._quant(self.train.gradient_bits), prefix=GRAD_PREFIX)

    def decode_gradient(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if "grad" in tensors:
            return tensors["grad"]
        if not any(k.startswith(GRAD_PREFIX) for k in tensors):
            return None
        try:
            return decode_direct(dict(tensors), prefix=GRAD_PREFIX)
        except (ValueError, KeyError) as exc:
            raise FrameError(f"undecodable gradient: {exc}") from None

    def close(self) -> None:
        for pair in (*self._senders.values(), *self._receivers.values()):
            pair[0].cache.close()


def pack_extras(extras: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Losslessly narrower: int64 ids as int16/int32 when their values fit, a 0/1 loss mask as bits."""
    out: dict[str, torch.Tensor] = {}
    for name, t in extras.items():
        if name == "loss_mask" and t.numel() and bool(((t == 0) | (t == 1)).all()):
            out[MASK_BITS] = pack_codes(t.reshape(-1), 1)
        elif name in NARROW_INTS and t.dtype == torch.int64 and t.numel():
            low, high = int(t.min()), int(t.max())
            narrow = next((d for d in (torch.int16, torch.int32) if torch.iinfo(d).min <= low and high <= torch.iinfo(d).max), None)
            out[name] = t.to(narrow) if narrow is not None else t
        else:
            out[name] = t
    return out


def unpack_extras(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``pack_extras``: ids back to int64, the mask back to float32 [batch, seq] (shape of target_ids)."""
    out = dict(tensors)
    for name in NARROW_INTS:
        if name in out and out[name].dtype in (torch.int16, torch.int32):
            out[name] = out[name].to(torch.int64)
    bits = out.pop(MASK_BITS, None)
    if bits is not None:
        targets = out.get("target_ids")
        if targets is None or "loss_mask" in out:
            raise FrameError(f"{MASK_BITS} needs target_ids (for its shape) and no loss_mask beside it; got {sorted(tensors)}")
        numel = targets.numel()
        if bits.dtype != torch.uint8 or bits.shape != (-(-numel // 8),):
            raise FrameError(f"{MASK_BITS} must be {-(-numel // 8)} uint8 bytes for target_ids {list(targets.shape)}, got {bits.dtype} {list(bits.shape)}")
        out["loss_mask"] = unpack_codes(bits, 1, numel).view(targets.shape).to(torch.float32)
    return out
