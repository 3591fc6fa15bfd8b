"""What the fuzzers feed hometrain's decoders, and what each decoder promises back.

Everything a peer or the coordinator takes from the network goes through one of these: a
data-plane frame (``proto.codec``), the compressed tensors inside it (direct and AQ-SGD
activations, quantized gradients, the two sync formats), a DHT stage record, a checkpoint
upload, a checkpoint manifest. Each ``TARGETS`` entry pairs a hypothesis strategy, which
builds inputs from valid encodings and then breaks them (a field changed, a tensor dropped,
renamed, retyped, truncated) as well as from raw bytes, with a check that calls the decoder
and holds it to its contract: it returns what it says it returns, or it raises its own error
type (FrameError, ValueError, UploadError, ManifestError), which the callers turn into a
refused frame. Any other exception is a crash: in a handler, a peer that an outsider can
trip. ``tests/test_fuzz.py`` runs each target briefly; ``bench/fuzz.py`` runs them long.
"""

from __future__ import annotations

import asyncio
import json
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors
from transformers import GPTJConfig

from coordinator.uploads import UploadError, check_shard
from peer.compression import cocktail, sparseloco
from peer.compression.aqsgd import PREFIX, ActivationCache, AQSGDReceiver, AQSGDSender, MissingEntries
from peer.compression.boundary import FIRST_PREFIX, FIRST_ROWS, GRAD_PREFIX, MASK_BITS, BoundaryCodec, Outgoing
from peer.compression.quantization import QuantConfig, decode_direct, encode_direct
from peer.directory import StageRecord
from proto import codec
from proto import hometrain_pb2 as pb
from proto.manifest import ManifestError, parse_manifest, verify_file, verify_manifest
from proto.run_config import TrainConfig

TINY = GPTJConfig(vocab_size=64, n_positions=16, n_embd=8, n_layer=2, n_head=2, rotary_dim=4, bos_token_id=0, eos_token_id=0)
DTYPE_NAMES = [*codec.DTYPES, "float64x", "", "int3"]  # the known names and a few that are not
SMALL_INT = st.integers(min_value=-3, max_value=40)
REFUSED = "refused"  # what a check returns when the decoder raised its own error (None: it accepted the input)


# ---------------------------------------------------------------- generic mutations of named tensors

def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -300), min(info.max, 300) + 1, shape, generator=g).to(dtype)


ANY_DTYPE = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool])
SHAPES = st.lists(st.integers(min_value=0, max_value=6), min_size=0, max_size=3).map(tuple)
SPECIAL = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e38, 3.4e38, 1e-45, 255.0])


@st.composite
def mutated(draw, valid: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``valid`` with a few of: a tensor dropped, renamed, replaced by one of another dtype/shape, truncated,
    extended, or an element set to a special value (NaN, Inf, huge, negative)."""
    out = dict(valid)
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        if not out:
            break
        name = draw(st.sampled_from(sorted(out)))
        action = draw(st.sampled_from(["drop", "rename", "replace", "truncate", "extend", "poke", "retype"]))
        t = out[name]
        if action == "drop":
            del out[name]
        elif action == "rename":
            out[draw(st.sampled_from([name + "x", "hidden", "grad", PREFIX + "base", FIRST_ROWS, MASK_BITS, "target_ids"]))] = out.pop(name)
        elif action == "replace":
            out[name] = _tensor(draw(ANY_DTYPE), draw(SHAPES), draw(st.integers(0, 1000)))
        elif action == "truncate" and t.numel():
            out[name] = t.reshape(-1)[: draw(st.integers(0, t.numel() - 1))].clone()
        elif action == "extend":
            out[name] = torch.cat([t.reshape(-1), t.reshape(-1)[:1].repeat(draw(st.integers(1, 9)))]) if t.numel() else t.reshape(-1)
        elif action == "poke" and t.numel():
            flat = t.reshape(-1).clone()
            i = draw(st.integers(0, flat.numel() - 1))
            if flat.dtype.is_floating_point:
                flat[i] = draw(SPECIAL)
            elif flat.dtype == torch.bool:
                flat[i] = not bool(flat[i])
            else:
                info = torch.iinfo(flat.dtype)
                flat[i] = draw(st.integers(min_value=max(info.min, -(1 << 62)), max_value=min(info.max, 1 << 62)))
            out[name] = flat.reshape(t.shape)
        elif action == "retype":
            out[name] = t.to(draw(ANY_DTYPE))
    return out


# ---------------------------------------------------------------- frames (proto.codec)

async def _stream(messages: list[pb.Frame]):
    for m in messages:
        yield m


@st.composite
def frames(draw) -> list[pb.Frame]:
    """The messages of one data-plane stream: a valid frame broken, a header made up, or raw protobuf bytes."""
    kind = draw(st.sampled_from(["valid", "made_up", "raw"]))
    if kind == "raw":
        out = []
        for blob in draw(st.lists(st.binary(max_size=64), max_size=3)):
            try:
                out.append(pb.Frame.FromString(blob))
            except Exception:  # protobuf's own parse error: grpc never hands such a message on
                pass
        return out
    if kind == "valid":
        tensors = {f"t{i}": _tensor(draw(ANY_DTYPE), draw(SHAPES), i) for i in range(draw(st.integers(0, 3)))}
        messages = list(codec.encode_frame(pb.FrameHeader(kind=pb.FORWARD, round=draw(st.integers(0, 9))), tensors,
                                           chunk_bytes=draw(st.sampled_from([1, 7, 64, 1 << 20]))))
    else:
        header = pb.FrameHeader(kind=pb.FORWARD, protocol_version=draw(st.sampled_from([codec.PROTOCOL_VERSION, 0, 99])))
        for i in range(draw(st.integers(0, 3))):
            header.tensors.add(name=draw(st.sampled_from([f"t{i}", "t0"])), dtype=draw(st.sampled_from(DTYPE_NAMES)),
                               shape=draw(st.lists(SMALL_INT, max_size=3)), nbytes=draw(st.integers(0, 200)))
        messages = [pb.Frame(header=header, chunk=draw(st.binary(max_size=200)))]
        messages += [pb.Frame(chunk=draw(st.binary(max_size=50))) for _ in range(draw(st.integers(0, 2)))]
    cut = draw(st.sampled_from(["none", "drop_first", "drop_last", "extra", "dup_header"]))
    if cut == "drop_first" and messages:
        messages = messages[1:]
    elif cut == "drop_last" and messages:
        messages = messages[:-1]
    elif cut == "extra":
        messages.append(pb.Frame(chunk=draw(st.binary(min_size=1, max_size=16))))
    elif cut == "dup_header" and messages:
        messages.append(pb.Frame(header=messages[0].header))
    return messages


def check_frame(messages: list[pb.Frame]) -> str | None:
    """receive_frame + frame_tensors: FrameError, or tensors that are exactly the announced ones and bytes."""
    try:
        header, payload = asyncio.run(codec.receive_frame(_stream(messages), max_bytes=4096))
    except codec.FrameError:
        return REFUSED
    tensors = codec.frame_tensors(header, payload)
    assert list(tensors) == [m.name for m in header.tensors]
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == len(payload) <= 4096
    for meta, t in zip(header.tensors, tensors.values()):
        assert list(t.shape) == list(meta.shape) and codec.DTYPE_NAMES[t.dtype] == meta.dtype


# ---------------------------------------------------------------- quantized tensors

QUANT = st.builds(QuantConfig, bits=st.sampled_from([2, 4, 8]), block=st.sampled_from([64, 128]), stochastic=st.booleans())
FLOATS = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def direct_inputs(draw) -> dict[str, torch.Tensor]:
    x = _tensor(draw(FLOATS), draw(SHAPES), draw(st.integers(0, 1000)))
    return draw(mutated(encode_direct(x, draw(QUANT), "q.")))


def check_direct(tensors: dict[str, torch.Tensor]) -> str | None:
    """decode_direct: ValueError, or a tensor of the dtype and shape its meta announced."""
    try:
        out = decode_direct(tensors, "q.")
    except ValueError:
        return REFUSED
    meta = tensors["q.meta"].tolist()
    assert list(out.shape) == meta[6:] and out.dtype in (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def aqsgd_inputs(draw) -> tuple[list[int], dict[str, torch.Tensor]]:
    """A sender's second frame for two samples (deltas against its first), broken, with the ids it claims."""
    sender, config = AQSGDSender(ActivationCache()), draw(QUANT)
    ids = [3, 5]
    first, pending = sender.encode(ids, torch.randn(2, 4, 8), config)
    sender.commit(pending)
    second, _ = sender.encode(ids, torch.randn(2, 4, 8), config)
    frame = draw(st.sampled_from([first, second]))
    claimed = draw(st.sampled_from([ids, [3], [3, 3], [5, 7], [], [-1, 5]]))
    return claimed, draw(mutated(frame))


def check_aqsgd(inputs: tuple[list[int], dict[str, torch.Tensor]]) -> str | None:
    """AQSGDReceiver.decode (with the first frame's entries known): ValueError, MissingEntries, or one row per sample."""
    claimed, tensors = inputs
    receiver = AQSGDReceiver(ActivationCache())
    sender = AQSGDSender(ActivationCache())
    first, _ = sender.encode([3, 5], torch.randn(2, 4, 8), QuantConfig(bits=8, block=64))
    receiver.decode([3, 5], first)
    try:
        out = receiver.decode(claimed, tensors)
    except (ValueError, MissingEntries):
        return REFUSED
    assert out.shape[0] == len(claimed)


# ---------------------------------------------------------------- FORWARD / BACKWARD frames at a stage boundary

def _boundary(mode: str) -> BoundaryCodec:
    train = TrainConfig(activation_compression=mode, gradient_bits=4, micro_batch_size=2, seq_len=8)
    return BoundaryCodec(train, cache_bytes=1 << 20, cache_dir=None, device=torch.device("cpu"), disk_bytes=0)


@st.composite
def forward_inputs(draw) -> tuple[str, list[int], dict[str, torch.Tensor]]:
    mode = draw(st.sampled_from(["none", "direct", "aqsgd"]))
    batch, seq = 2, draw(st.sampled_from([4, 8, 17]))
    extras = {"target_ids": torch.randint(0, TINY.vocab_size, (batch, seq)), "loss_mask": torch.ones(batch, seq),
              "prefix_lengths": torch.zeros(batch, dtype=torch.int64)}
    out = Outgoing(hidden=torch.randn(batch, seq, TINY.n_embd), extras=extras, sample_ids=[1, 2])
    tensors = _boundary(mode).encode_activations("peer", out)
    ids = draw(st.sampled_from([[1, 2], [1], [1, 2, 3], [2, 2]]))
    return mode, ids, draw(mutated(tensors))


def check_forward(inputs: tuple[str, list[int], dict[str, torch.Tensor]]) -> str | None:
    """BoundaryCodec.decode_forward: FrameError, MissingEntries, or finite activations and extras that fit the stage."""
    mode, ids, tensors = inputs
    header = pb.FrameHeader(kind=pb.FORWARD, sample_ids=ids)
    try:
        hidden, extras = _boundary(mode).decode_forward("peer", header, tensors, TINY)
    except (codec.FrameError, MissingEntries):
        return REFUSED
    assert hidden.shape[0] == len(ids) and hidden.shape[2] == TINY.n_embd and bool(torch.isfinite(hidden).all())
    assert extras["target_ids"].shape == hidden.shape[:2]


@st.composite
def gradient_inputs(draw) -> dict[str, torch.Tensor]:
    return draw(mutated(_boundary("direct").encode_gradient(torch.randn(2, 4, TINY.n_embd))))


def check_gradient(tensors: dict[str, torch.Tensor]) -> str | None:
    """BoundaryCodec.decode_gradient: FrameError, None (no gradient in the frame), or a tensor."""
    try:
        out = _boundary("direct").decode_gradient(tensors)
    except codec.FrameError:
        return REFUSED
    assert out is None or isinstance(out, torch.Tensor)
    if out is not None and not any(k.startswith(GRAD_PREFIX) for k in tensors):
        assert out is tensors["grad"]


# ---------------------------------------------------------------- sync payloads

COCKTAIL = cocktail.SyncCompressionConfig(random_ratio=0.5, topk_ratio=0.5, bits=4, bucket=64)
SPARSE = sparseloco.SparseLoCoConfig(density=8 / 64, chunk=64, bits=2, bucket=64)


@st.composite
def sync_inputs(draw) -> tuple[str, int, dict[str, torch.Tensor]]:
    method, numel = draw(st.sampled_from(["cocktail", "sparseloco"])), draw(st.sampled_from([1, 100, 300]))
    v = torch.randn(numel)
    payload = cocktail.compress(v, 7, COCKTAIL)[0] if method == "cocktail" else sparseloco.compress(v, SPARSE)[0]
    return method, draw(st.sampled_from([numel, numel + 1])), draw(mutated(payload))


def check_sync(inputs: tuple[str, int, dict[str, torch.Tensor]]) -> str | None:
    """cocktail / sparseloco decompress: ValueError, or a dense fp32 vector of ``numel``."""
    method, numel, payload = inputs
    try:
        out = (cocktail.decompress(payload, numel, 7, COCKTAIL) if method == "cocktail" else sparseloco.decompress(payload, numel, SPARSE))
    except ValueError:
        return REFUSED
    assert out.shape == (numel,) and out.dtype == torch.float32


# ---------------------------------------------------------------- DHT records

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
RECORD_KEYS = st.sampled_from(["throughput", "next_round", "name", "maddrs", "leaving", "extra"])


@st.composite
def stage_records(draw) -> Any:
    if draw(st.booleans()):
        return draw(JSON)
    return draw(st.dictionaries(RECORD_KEYS, JSON | st.lists(st.text(max_size=300), max_size=40), max_size=5))


def check_stage_record(value: Any) -> str | None:
    """StageRecord.parse: None, or a record whose fields are of their types (never an exception)."""
    record = StageRecord.parse(value)
    if record is None:
        return REFUSED
    assert isinstance(record.throughput, float) and isinstance(record.next_round, int) and isinstance(record.name, str)
    assert all(isinstance(m, str) for m in record.maddrs)


# ---------------------------------------------------------------- uploads (coordinator.uploads)

UPLOAD_SHAPES = {"w": (2, 3), "b": (3,)}


@st.composite
def upload_files(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "header", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=300))
    blob = save_safetensors(draw(mutated({"w": torch.randn(2, 3), "b": torch.randn(3)})) or {"w": torch.randn(2, 3)})
    if kind == "valid":
        cut = draw(st.integers(0, len(blob)))
        return blob[:cut] if draw(st.booleans()) else blob
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + header_len])
    name = draw(st.sampled_from(sorted(header)))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole", "dup"]))
    raw = json.dumps(header)
    if field == "dup":
        raw = raw[:-1] + ", " + json.dumps(name) + ": " + json.dumps(header[name]) + "}"
    elif field == "whole":
        header[name] = draw(JSON)
        raw = json.dumps(header)
    elif name != "__metadata__":
        header[name][field] = draw(JSON)
        raw = json.dumps(header)
    body = raw.encode()
    length = draw(st.sampled_from([len(body), len(body) + 1, len(body) - 1, 1 << 40]))
    return struct.pack("<Q", max(length, 0)) + body + blob[8 + header_len :]


def check_upload(data: bytes) -> str | None:
    """check_shard: UploadError, or a file of exactly the stage's finite floating tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.safetensors"
        path.write_bytes(data)
        try:
            check_shard(path, "weights", UPLOAD_SHAPES)
        except UploadError:
            return REFUSED


# ---------------------------------------------------------------- checkpoint manifests

@st.composite
def manifests(draw) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    body = {"run": "r", "round": 3, "files": {"model.safetensors": "00" * 32}, "signature": "ab" * 64}
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=3)):
        body[key] = draw(JSON)
    return json.dumps(body).encode()


def check_manifest(data: bytes) -> str | None:
    """parse_manifest, verify_manifest, verify_file: ManifestError only, for any bytes a server sends."""
    try:
        manifest = parse_manifest(data)
    except ManifestError:
        return REFUSED
    for call in (lambda: verify_manifest(manifest, "00" * 32), lambda: verify_file("model.safetensors", b"x", manifest)):
        try:
            call()
        except ManifestError:
            pass


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy
    check: Callable[[Any], str | None]  # REFUSED, or None when the input was accepted (and the output checked)


TARGETS = (
    Target("frame", frames(), check_frame),
    Target("direct", direct_inputs(), check_direct),
    Target("aqsgd", aqsgd_inputs(), check_aqsgd),
    Target("forward", forward_inputs(), check_forward),
    Target("gradient", gradient_inputs(), check_gradient),
    Target("sync", sync_inputs(), check_sync),
    Target("stage_record", stage_records(), check_stage_record),
    Target("upload", upload_files(), check_upload),
    Target("manifest", manifests(), check_manifest),
)
