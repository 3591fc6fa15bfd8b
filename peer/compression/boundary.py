"""What crosses a stage boundary, per the run's compression settings.

Activations forward are sent plain, directly quantized, or AQ-SGD-compressed (the quantized
change since the sample's last visit, against caches both ends keep in step: see
``peer.compression.aqsgd``). AQ-SGD keeps one sender per destination peer and one receiver
per source peer, since each pair of peers shares its own cache; a sample's first
visit goes at ``activation_first_bits`` (its rows travel as a separate quantized block) so
the caches start close to the truth, while revisits go at ``activation_bits``. Activation
gradients backward are sent plain or directly quantized (2, 4 or 8 bits), with
``boundary_block`` values per scale. When activations are compressed, what travels beside
them is packed losslessly too: token ids in the narrowest integer type their values fit, a
0/1 loss mask as bits (at fp32 and int64 they would cost a quarter of a 2-bit frame).

``decode_forward`` is where a FORWARD frame enters a stage: it decodes the activations and the
extras and checks them against the stage (shapes, dtypes, vocabulary, finiteness) once; the
pipeline gets tensors it can trust or a ``FrameError`` saying what was wrong. The caches of all
neighbours share one memory budget (``cache_bytes``) and one disk budget (``disk_bytes``), split
evenly among them as they appear; at most ``MAX_NEIGHBOUR_CACHES`` are kept, the least recently
used dropped beyond that (its samples then travel whole again), so peers that come and go, or a
crowd of callers, cannot grow them without bound.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from transformers import GPTJConfig

from proto import codec
from proto.codec import FrameError
from proto.run_config import TrainConfig

from .aqsgd import PREFIX, ActivationCache, AQSGDReceiver, AQSGDSender, CacheConfig, MissingEntries, Pending
from .quantization import QuantConfig, decode_direct, encode_direct, pack_codes, unpack_codes

GRAD_PREFIX = "gq."
FIRST_PREFIX = "aqf."  # AQ-SGD rows on their first visit, at --activation-first-bits
FIRST_ROWS = FIRST_PREFIX + "rows"
MASK_BITS = "loss_mask.bits"
NARROW_INTS = ("target_ids", "prefix_lengths")  # int64 fields a frame may carry narrower
EXTRAS = ("target_ids", "loss_mask", "prefix_lengths")  # what travels beside the activations
MAX_NEIGHBOUR_CACHES = 32  # AQ-SGD caches kept, one per neighbour and direction: far more than a stage's neighbours
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

    def __init__(self, train: TrainConfig, cache_bytes: int, cache_dir: str | Path | None, device: torch.device,
                 disk_bytes: int | None = None) -> None:
        self.train = train
        self.device = device
        self.cache_bytes = cache_bytes
        self.disk_bytes = disk_bytes  # spilled bytes of all caches together (None: no bound)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # Per peer, a pair sharing one cache: revisits ("aq.") and first visits ("aqf."), each at its own bits.
        self._senders: dict[str, tuple[AQSGDSender, AQSGDSender]] = {}
        self._receivers: dict[str, tuple[AQSGDReceiver, AQSGDReceiver]] = {}
        self._caches: OrderedDict[tuple[str, str], ActivationCache] = OrderedDict()  # (role, peer), least recently used first

    def _cache(self, role: str, peer: str) -> ActivationCache:
        """A new cache for one neighbour; every cache's share of the budgets shrinks to make room for it, and beyond
        ``MAX_NEIGHBOUR_CACHES`` the least recently used neighbour's cache is dropped."""
        while len(self._caches) >= MAX_NEIGHBOUR_CACHES:
            (old_role, old_peer), old = self._caches.popitem(last=False)
            (self._senders if old_role == "to" else self._receivers).pop(old_peer, None)
            old.close()
        spill = self.cache_dir / f"{role}-{peer[-12:]}" if self.cache_dir else None
        cache = ActivationCache(CacheConfig(max_memory_bytes=self.cache_bytes, spill_dir=spill))
        self._caches[(role, peer)] = cache
        for each in self._caches.values():
            each.set_memory_limit(self.cache_bytes // len(self._caches))
            each.set_disk_limit(None if self.disk_bytes is None else self.disk_bytes // len(self._caches))
        return cache

    def _used(self, role: str, peer: str) -> None:
        self._caches.move_to_end((role, peer))

    @property
    def cache_memory_bytes(self) -> int:
        """Bytes all AQ-SGD caches hold in memory now (never more than ``cache_bytes``)."""
        return sum(cache.stats().memory_bytes for cache in self._caches.values())

    @property
    def cache_disk_bytes(self) -> int:
        """Bytes all AQ-SGD caches hold spilled on disk now (never more than ``disk_bytes``)."""
        return sum(cache.stats().disk_bytes for cache in self._caches.values())

    # ------------------------------------------------------------ activations

    def encode_activations(self, dest: str, out: Outgoing) -> dict[str, torch.Tensor]:
        """Frame tensors for ``dest``; with AQ-SGD remembers what to commit once ``dest`` answers."""
        mode = self.train.activation_compression
        if mode == "none":
            return {"hidden": out.hidden, **out.extras}
        bits = self._quant(self.train.activation_bits)
        extras = pack_extras(out.extras)
        if mode == "direct":
            return {**encode_direct(out.hidden, bits, PREFIX), **extras}
        if dest not in self._senders:
            cache = self._cache("to", dest)
            self._senders[dest] = (AQSGDSender(cache, PREFIX), AQSGDSender(cache, FIRST_PREFIX))
        self._used("to", dest)
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
        if dest in self._senders:  # (its cache may have been dropped meanwhile: the next frame goes whole)
            for pending in out.pending or ():
                self._senders[dest][0].commit(pending)
        out.pending = None

    def failed(self, dest: str, out: Outgoing) -> None:
        if dest in self._senders:
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
            return decode_direct(dict(tensors), PREFIX)
        except MissingEntries:
            raise
        except (ValueError, KeyError) as exc:
            raise FrameError(f"undecodable activations: {exc}") from None

    def _decode_aqsgd(self, source: str, sample_ids: list[int], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if source not in self._receivers:
            cache = self._cache("from", source)
            self._receivers[source] = (AQSGDReceiver(cache, PREFIX, self.device), AQSGDReceiver(cache, FIRST_PREFIX, self.device))
        self._used("from", source)
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

    def decode_forward(self, source: str, header, tensors: Mapping[str, torch.Tensor], config: GPTJConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A FORWARD frame's activations and extras, checked against a stage of ``config``; FrameError if wrong.

        Raises MissingEntries when AQ-SGD deltas refer to entries this peer does not hold."""
        hidden = self.decode_activations(source, list(header.sample_ids), tensors)
        extras = unpack_extras({k: v for k, v in tensors.items() if k in EXTRAS or k == MASK_BITS})
        if hidden.dim() != 3 or not hidden.is_floating_point():
            raise FrameError("FORWARD frame needs float activations of shape [batch, seq, d_model]")
        batch, seq_len, width = hidden.shape
        if width != config.n_embd or seq_len > config.n_positions or batch > 4096 or batch != len(header.sample_ids):
            raise FrameError(f"activations have shape {list(hidden.shape)} for {len(header.sample_ids)} samples; this stage takes "
                             f"[samples, <= {config.n_positions}, {config.n_embd}]")
        codec.require_shape("target_ids", extras.get("target_ids", torch.empty(0)), (batch, seq_len), torch.int64)
        codec.require_shape("loss_mask", extras.get("loss_mask", torch.empty(0)), (batch, seq_len), torch.float32)
        codec.require_shape("prefix_lengths", extras.get("prefix_lengths", torch.empty(0)), (batch,), torch.int64)
        targets = extras["target_ids"]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= config.vocab_size):
            raise FrameError(f"target ids outside the vocabulary [0, {config.vocab_size})")
        codec.require_finite({"activations": hidden, **extras})
        return hidden, extras

    # ------------------------------------------------------------ gradients

    def encode_gradient(self, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.train.gradient_bits:
            return {"grad": grad}
        return encode_direct(grad, self._quant(self.train.gradient_bits), GRAD_PREFIX)

    def decode_gradient(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if "grad" in tensors:
            return tensors["grad"]
        if not any(k.startswith(GRAD_PREFIX) for k in tensors):
            return None
        try:
            return decode_direct(dict(tensors), GRAD_PREFIX)
        except (ValueError, KeyError) as exc:
            raise FrameError(f"undecodable gradient: {exc}") from None

    def close(self) -> None:
        for cache in self._caches.values():
            cache.close()


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
