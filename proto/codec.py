"""Tensor <-> bytes codecs for both planes, with the checks every receiver applies.

A tensor crosses a process boundary only through this module: control-plane ``Tensor``
messages (small: token ids, masks) and streamed data-plane ``Frame`` messages (activations,
gradients, replica-sync parts, state transfer). Whatever arrives is validated here before
any other code sees it: known dtype, consistent sizes, bounded total size, protocol version.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import AsyncIterator, Iterable, Iterator, Mapping

import torch

from proto import PROTOCOL_VERSION
from proto import hometrain_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

CHUNK_BYTES = 1 << 20
"""Slice size of a streamed frame: well under hivemind's 4 MiB message cap."""

DEFAULT_MAX_FRAME_BYTES = 1 << 31
"""Largest payload a receiver accepts unless told otherwise (a GPT-J-6B stage state fits)."""


class WireKind(StrEnum):
    """What traffic is, for counting bytes on both ends (the label of every wire-byte metric)."""

    ACTIVATIONS = "activations"  # FORWARD frames
    INFERENCE = "inference"      # INFER frames: forward-only evaluation of the live swarm, and forward audits
    GRADIENTS = "gradients"      # BACKWARD frames: activation gradients
    SYNC = "sync"                # replica sync parts and payloads
    STATE = "state"              # a stage's state handed to a joiner, checkpoint uploads
    CONTROL = "control"          # gRPC to the coordinator, acknowledgements


class FrameError(ValueError):
    """A frame or tensor that must be dropped: says what was received and what was expected."""


class StaleFrame(FrameError):
    """A well-formed frame its receiver no longer takes (its round closed, the stage moved): refused, not malformed."""


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise FrameError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (any device, any supported dtype), row-major."""
    if tensor.dtype not in DTYPE_NAMES:
        raise FrameError(f"cannot send dtype {tensor.dtype}; supported: {sorted(DTYPES)}")
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: Iterable[int]) -> torch.Tensor:
    """Inverse of :func:`tensor_bytes`; checks that the size matches the shape."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise FrameError(f"negative dimension in shape {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise FrameError(f"tensor of shape {shape} and dtype {dtype} needs {expected} bytes, received {len(data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def to_message(tensor: torch.Tensor) -> pb.Tensor:
    return pb.Tensor(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), data=tensor_bytes(tensor))


def from_message(message: pb.Tensor, *, max_bytes: int = 1 << 26) -> torch.Tensor:
    if len(message.data) > max_bytes:
        raise FrameError(f"tensor of {len(message.data)} bytes exceeds the limit of {max_bytes}")
    return tensor_from_bytes(message.data, dtype_from_name(message.dtype), message.shape)


def encode_frame(header: pb.FrameHeader, tensors: Mapping[str, torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.Frame]:
    """Split ``header`` + named tensors into stream messages; the header rides on the first one."""
    first = pb.FrameHeader()
    first.CopyFrom(header)
    first.protocol_version = PROTOCOL_VERSION
    del first.tensors[:]
    blobs = []
    for name, tensor in tensors.items():
        blob = tensor_bytes(tensor)
        first.tensors.add(name=name, dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), nbytes=len(blob))
        blobs.append(blob)
    payload = b"".join(blobs)
    if not payload:
        yield pb.Frame(header=first)
        return
    for offset in range(0, len(payload), chunk_bytes):
        chunk = payload[offset : offset + chunk_bytes]
        yield pb.Frame(header=first, chunk=chunk) if offset == 0 else pb.Frame(chunk=chunk)


def frame_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Payload bytes a frame of these tensors puts on the wire (what byte counters count)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


async def receive_frame(
    messages: AsyncIterator[pb.Frame], *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[pb.FrameHeader, bytearray]:
    """Reassemble a streamed frame's header and payload bytes, checking the header as it arrives.

    Raises FrameError, naming what was wrong, for a missing header, a foreign protocol
    version, an unknown dtype, sizes that do not add up, or a payload over ``max_bytes``.
    """
    header = None
    payload = bytearray()
    expected = 0
    async for message in messages:
        if header is None:
            if not message.HasField("header"):
                raise FrameError("the first message of a frame carries no header")
            header = message.header
            if header.protocol_version != PROTOCOL_VERSION:
                raise FrameError(
                    f"frame speaks protocol {header.protocol_version}, this peer speaks {PROTOCOL_VERSION}: "
                    "both sides must run the same hometrain release"
                )
            names = set()
            for meta in header.tensors:
                dtype = dtype_from_name(meta.dtype)
                itemsize = torch.empty((), dtype=dtype).element_size()
                if any(s < 0 for s in meta.shape) or math.prod(meta.shape) * itemsize != meta.nbytes:
                    raise FrameError(f"tensor {meta.name!r}: shape {list(meta.shape)} x {meta.dtype} does not make {meta.nbytes} bytes")
                if meta.name in names:
                    raise FrameError(f"tensor {meta.name!r} appears twice in one frame")
                names.add(meta.name)
                expected += meta.nbytes
            if expected > max_bytes:
                raise FrameError(f"frame announces {expected} bytes, over the limit of {max_bytes}")
        payload += message.chunk
        if len(payload) > expected:
            raise FrameError(f"frame payload exceeds the {expected} bytes its header announced")
    if header is None:
        raise FrameError("empty stream: no frame received")
    if len(payload) != expected:
        raise FrameError(f"frame ended after {len(payload)} of {expected} announced bytes")
    return header, payload


def frame_tensors(header: pb.FrameHeader, payload: bytearray) -> dict[str, torch.Tensor]:
    """The tensors a received frame's payload holds (its header was checked by ``receive_frame``)."""
    tensors = {}
    view = memoryview(payload)
    offset = 0
    for meta in header.tensors:
        tensors[meta.name] = tensor_from_bytes(view[offset : offset + meta.nbytes], DTYPES[meta.dtype], meta.shape)
        offset += meta.nbytes
    return tensors


async def decode_frame(
    messages: AsyncIterator[pb.Frame], *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[pb.FrameHeader, dict[str, torch.Tensor], int]:
    """Reassemble a streamed frame; returns (header, tensors, payload bytes). See ``receive_frame``."""
    header, payload = await receive_frame(messages, max_bytes=max_bytes)
    return header, frame_tensors(header, payload), len(payload)


def require_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise FrameError if a floating tensor holds NaN or Inf (it would poison the weights)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FrameError(f"tensor {name!r} contains NaN or Inf; the frame is dropped")


def require_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    """Raise FrameError unless ``tensor`` has exactly ``shape`` (and ``dtype`` if given)."""
    if tuple(tensor.shape) != tuple(shape):
        raise FrameError(f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise FrameError(f"tensor {name!r} has dtype {tensor.dtype}, expected {dtype}")
