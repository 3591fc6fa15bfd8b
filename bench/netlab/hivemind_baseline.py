"""One data-parallel peer of a hivemind.Optimizer run: the baseline hometrain is compared against.

Why: hometrain splits GPT-J into pipeline stages over home links. The usual alternative is
hivemind's own collaborative training: every peer holds the whole model, accumulates
gradients towards a global batch and all-reduces them (``hivemind.Optimizer``). Running this
script's peers on the same emulated links (bench/netlab) as a hometrain swarm says what the
pipeline buys, or costs, per link profile.

What it shares with hometrain (so only the training scheme differs):

* model: ``coordinator.model_presets.preset_config("tiny", ...)`` as one ``GPTJForCausalLM``
  (eager attention, as ``peer.stage_model.StageModel``), weights from
  ``peer.stage_model.seeded_init(seed)``: the weights every hometrain peer builds its stage from.
* data: the BPE and rows of a hometrain run started with ``--ul2-tokens 0 --instruction-share 0``
  (plain causal LM on the built-in text): ``coordinator.data.build.tokenizer_documents`` /
  ``tokenizer_special_tokens`` into ``coordinator.data.tokenizer.train_tokenizer``, then
  ``coordinator.data.build.build_mixer``. Global microbatch g is
  ``mixer.microbatch(round=g // M + 1, index=g % M)`` (M: microbatches of a hometrain round);
  peer i of n takes g = i, i + n, i + 2n, ...: disjoint shards, and n peers in step train on
  exactly hometrain's rounds. Nothing is downloaded.
* loss: ``peer.stage_model.summed_token_loss`` over a microbatch's loss tokens, divided by them
  (hometrain divides a round's summed gradient by its loss tokens; every causal row has seq_len).
* optimizer: AdamW with ``proto.run_config.TrainConfig``'s lr, betas, eps and weight decay, on
  hometrain's parameter groups (``peer.optimizer.param_groups``: matrices decay, vectors do not)
  and its learning-rate schedule by epoch (``proto.schedule.learning_rate``, the decay ending at
  --epochs), through hivemind's ``scheduler``. Not hometrain's global clipping: hivemind.Optimizer
  has none, and a peer's own clip would see only its local gradients;
  ``target_batch_size`` = TrainConfig.global_batch_size (samples per hometrain round), one
  ``opt.step()`` per microbatch of TrainConfig.micro_batch_size samples.

8-bit compressions: hivemind 1.1.12's quantized tensors (uniform8bit, quantile8bit,
blockwise8bit and size-adaptive's 8-bit half) fail to DECODE under numpy >= 2.4
(``int()`` of a 1-element array is a TypeError there). This script replaces those decoders in
hivemind's registry with equivalent ones (same wire format, ``_patch_quantized_decoders``) and
records that in the output's settings.

    python bench/netlab/hivemind_baseline.py --num-peers 2 --epochs 20 --out p0.json
        # prints "MADDRS [...]" on stdout once its DHT listens
    python bench/netlab/hivemind_baseline.py --initial-peers MADDR --peer-index 1 --num-peers 2 --epochs 20 --out p1.json

Output (--out, JSON): status ("ok", "error", "timeout", or "stopped" by SIGTERM) and message;
epochs (reached) and epochs_target; microbatches, samples, tokens (row positions) and
loss_tokens this peer trained; wall_seconds (first step to the last epoch, less
discovery_seconds: after its first microbatch a peer waits until hivemind's progress tracker
sees every peer); startup_seconds (process start to first step); compute_seconds (forward +
backward) and optimizer_step_seconds (inside opt.step: accumulation, matchmaking, all-reduce,
AdamW); tokens_per_second (this peer's; the caller sums peers for the collaboration's) and
collaboration_tokens_per_second_nominal (epochs x target batch x seq_len / wall);
epoch_losses (mean of this peer's microbatch losses in each epoch; null where it trained none),
epoch_samples (an epoch may hold more than the target: peers see each other's progress late),
epoch_end_seconds, final_loss; state_loads_from_peers; bytes_sent / bytes_received (null:
p2pd counts no bytes, its -metricsAddr has no such metric) and interface_bytes (rx/tx per
interface of this network namespace over the training window: this peer's traffic only when it
has a namespace of its own); maddrs; settings (every flag, model shape and checksums, data,
optimizer, hivemind options, versions, patches).

Small epochs (hometrain's 16 samples take ~0.1 s of compute per peer) are dominated by
hivemind's per-epoch costs: matchmaking (at least --matchmaking-time), DHT round trips and the
progress tracker's refresh. Hence the defaults here, not hivemind's: matchmaking 1 s (hivemind
15 s; it suggests 3-5 s locally), request_timeout half of it (hivemind warns unless it is
smaller), tracker refresh 0.1-1 s (hivemind 0.5-10 s, with which the first epochs took ~2x the
target batch). Peers' weights are not bit-identical even uncompressed: all-reduce returns
(average - local) deltas that each peer adds to its own tensors.

Exit status: 0 when --epochs were trained, 2 for a bad setting, 3 on --timeout, 1 on other errors
(the JSON is written in every case but a bad setting, with "status" saying which).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proto.run_config import TrainConfig  # noqa: E402  (after the sys.path line: runs as a plain script)
from proto.schedule import learning_rate  # noqa: E402
from peer.optimizer import param_groups  # noqa: E402

COMPRESSIONS = ("none", "fp16", "uniform8bit", "blockwise8bit", "quantile8bit", "size-adaptive")
SIZE_ADAPTIVE_THRESHOLD = 2**16 + 1  # hivemind's ALBERT example: fp16 below, uniform 8-bit from here on (elements)
EXIT_ERROR, EXIT_BAD_SETTING, EXIT_TIMEOUT = 1, 2, 3
_TRAIN = TrainConfig()


class BaselineError(RuntimeError):
    """A run that cannot go on; the message says what happened and what to do."""


class Stopped(KeyboardInterrupt):
    """SIGTERM: unwind and shut down (a KeyboardInterrupt, the one thing hivemind's retry loops let through)."""


@dataclass(frozen=True, kw_only=True)
class BaselineConfig:
    """One peer's settings; batch shape and seed default to hometrain's TrainConfig."""

    initial_peers: tuple[str, ...] = ()
    host: str = "127.0.0.1"          # what the DHT listens on (0.0.0.0 inside a network namespace)
    announce_host: str = ""          # what it tells others to dial ("" = what it listens on)
    port: int = 0                    # TCP port (0: any free one; picked here when announcing)
    peer_index: int = 0
    num_peers: int = 1
    epochs: int = 10                 # hivemind epochs = global optimizer steps
    seed: int = _TRAIN.seed
    compression: str = "none"        # grads and state averaging alike
    threads: int = 1
    out: str = ""
    timeout: float = 600.0           # whole process, start to exit
    run_id: str = "hometrain-baseline"
    seq_len: int = _TRAIN.seq_len
    micro_batch_size: int = _TRAIN.micro_batch_size
    global_batch_size: int = _TRAIN.global_batch_size
    matchmaking_time: float = 1.0
    averaging_timeout: float = 30.0
    average_state_every: int = 1     # hivemind's default: average the parameters in the background after every epoch
    request_timeout: float = 0.0     # matchmaking's wait for a leader's reply (0: half of matchmaking_time, < it as hivemind asks)
    delay_updates: bool = False      # hivemind's delay_optimizer_step + delay_grad_averaging: compute overlaps averaging, 1 step stale
    refresh_period: float = 0.1      # ProgressTracker min_refresh_period: how stale a peer's view of the others' samples may be
    max_refresh_period: float = 1.0  # ... and at most (hivemind: 10 s, which lets early epochs overshoot the target ~2x)
    start_timeout: float = 120.0     # wait this long for --num-peers peers before training
    linger: float = 30.0             # after the last epoch, keep serving until every peer is done, at most this long

    def __post_init__(self) -> None:
        if self.num_peers < 1 or not 0 <= self.peer_index < self.num_peers:
            raise BaselineError(f"--peer-index must be in [0, --num-peers); got --peer-index {self.peer_index} "
                                f"--num-peers {self.num_peers}")
        if self.epochs < 1:
            raise BaselineError(f"--epochs must be >= 1, got {self.epochs}")
        if self.compression not in COMPRESSIONS:
            raise BaselineError(f"--compression must be one of {', '.join(COMPRESSIONS)}; got {self.compression!r}")
        if self.threads < 1:
            raise BaselineError(f"--threads must be >= 1, got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise BaselineError(f"--port must be 0..65535, got {self.port}")
        if self.global_batch_size % self.micro_batch_size or min(self.seq_len, self.micro_batch_size) < 1:
            raise BaselineError(f"--global-batch-size {self.global_batch_size} must be a multiple of --micro-batch-size "
                                f"{self.micro_batch_size}, and --seq-len ({self.seq_len}) >= 1")
        if self.request_timeout < 0:
            raise BaselineError(f"--request-timeout must be >= 0 seconds (0: half of --matchmaking-time), got {self.request_timeout}")
        for name in ("timeout", "matchmaking_time", "averaging_timeout", "start_timeout", "refresh_period"):
            if getattr(self, name) <= 0:
                raise BaselineError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_refresh_period < self.refresh_period:
            raise BaselineError(f"--max-refresh-period {self.max_refresh_period} must be >= --refresh-period {self.refresh_period}")
        if self.average_state_every < 1:
            raise BaselineError(f"--average-state-every must be >= 1 epoch, got {self.average_state_every}")

    @property
    def train(self) -> TrainConfig:
        """hometrain's training settings with this run's batch shape and seed (lr, betas, ... its defaults)."""
        return TrainConfig(seq_len=self.seq_len, micro_batch_size=self.micro_batch_size,
                           global_batch_size=self.global_batch_size, seed=self.seed)


@dataclass
class Progress:
    """What this peer has done so far: the output's measured fields (read by the watchdog too)."""

    started: float = field(default_factory=time.perf_counter)  # process start
    first_step: float | None = None
    last_epoch_at: float | None = None
    epoch: int = 0
    microbatches: int = 0
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    compute_seconds: float = 0.0
    step_seconds: float = 0.0
    losses: dict[int, list[float]] = field(default_factory=dict)
    samples_by_epoch: dict[int, int] = field(default_factory=dict)
    epoch_reached_at: dict[int, float] = field(default_factory=dict)
    discovery_seconds: float = 0.0  # after the first microbatch, waiting for hivemind's tracker to see every peer
    state_loads: int = 0  # times hivemind found this peer behind and reloaded parameters from others
    peers_done: int = 0
    maddrs: list[str] = field(default_factory=list)
    interfaces_before: dict[str, tuple[int, int]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> BaselineConfig:
    """BaselineConfig from the command line; every flag's default is BaselineConfig's."""
    d = BaselineConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                   help="multiaddrs of running peers (none for the first peer, which prints its own as 'MADDRS [...]')")
    p.add_argument("--host", default=d.host, help="address the DHT listens on (0.0.0.0 in a network namespace)")
    p.add_argument("--announce-host", default=d.announce_host, help="address other peers dial (default: the listening one)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port of the DHT (0: any free one)")
    p.add_argument("--peer-index", type=int, default=d.peer_index, help="this peer's index: its data shard")
    p.add_argument("--num-peers", type=int, default=d.num_peers, help="peers of the run: training starts when all are up")
    p.add_argument("--epochs", type=int, default=d.epochs, help="hivemind epochs (global steps) to train")
    p.add_argument("--seed", type=int, default=d.seed, help="weight init and data seed (hometrain's --seed)")
    p.add_argument("--compression", choices=COMPRESSIONS, default=d.compression, help="gradient and state averaging compression")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    p.add_argument("--out", default=d.out, help="JSON result file (default: none, stdout only)")
    p.add_argument("--timeout", type=float, default=d.timeout, help="exit non-zero after this many seconds, whatever happens")
    p.add_argument("--run-id", default=d.run_id, help="hivemind run id (the DHT key prefix peers share)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sample")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="samples per opt.step()")
    p.add_argument("--global-batch-size", type=int, default=d.global_batch_size, help="target_batch_size: samples per epoch, all peers")
    p.add_argument("--matchmaking-time", type=float, default=d.matchmaking_time, help="hivemind matchmaking_time")
    p.add_argument("--averaging-timeout", type=float, default=d.averaging_timeout, help="hivemind averaging_timeout")
    p.add_argument("--average-state-every", type=int, default=d.average_state_every, help="hivemind average_state_every (epochs)")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="hivemind averager request_timeout (0: half of --matchmaking-time; hivemind wants it below that)")
    p.add_argument("--delay-updates", action="store_true",
                   help="hivemind delay_optimizer_step + delay_grad_averaging: average in the background, one step stale")
    p.add_argument("--refresh-period", type=float, default=d.refresh_period,
                   help="hivemind ProgressTracker min_refresh_period: shorter means epochs closer to --global-batch-size")
    p.add_argument("--max-refresh-period", type=float, default=d.max_refresh_period,
                   help="hivemind ProgressTracker max_refresh_period (its default 10 s lets early epochs overshoot the target)")
    p.add_argument("--start-timeout", type=float, default=d.start_timeout, help="longest wait for --num-peers peers")
    p.add_argument("--linger", type=float, default=d.linger, help="longest wait for the other peers to finish after the last epoch")
    a = p.parse_args(argv)
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(BaselineConfig) if f.name != "initial_peers"}
    return BaselineConfig(initial_peers=tuple(a.initial_peers), **values)


# ---------------------------------------------------------------------------- hometrain's model and data


def build_data(cfg: BaselineConfig):
    """(tokenizer, mixer) of a hometrain run with --ul2-tokens 0 --instruction-share 0: causal LM on the built-in text."""
    from coordinator.data.build import build_mixer, tokenizer_documents, tokenizer_special_tokens
    from coordinator.data.tokenizer import train_tokenizer
    from proto.run_config import CoordinatorConfig

    run = CoordinatorConfig(seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size,
                            seed=cfg.seed, ul2_tokens=0, instruction_share=0.0)
    tokenizer = train_tokenizer(tokenizer_documents(run), run.vocab_size, tokenizer_special_tokens(run))
    return tokenizer, build_mixer(run, tokenizer)


def build_model(cfg: BaselineConfig, tokenizer):
    """The tiny GPT-J hometrain's coordinator describes, whole, with the weights its peers build from the seed."""
    from transformers import GPTJForCausalLM

    from coordinator.model_presets import preset_config
    from peer.stage_model import seeded_init

    config = preset_config("tiny", len(tokenizer), tokenizer.eos_token_id, cfg.seq_len)
    config._attn_implementation = "eager"  # as StageModel: the same math as the pipeline's stages
    model = GPTJForCausalLM(config)
    seeded_init(model.named_parameters(), cfg.seed, config)
    model.train()
    return model


def microbatch_for(mixer, cfg: BaselineConfig, k: int):
    """This peer's k-th microbatch: global microbatch k * num_peers + peer_index, laid out as hometrain's rounds."""
    per_round = cfg.train.microbatches_per_round
    g = k * cfg.num_peers + cfg.peer_index
    return mixer.microbatch(g // per_round + 1, g % per_round, cfg.micro_batch_size, 0)  # one causal phase: tokens seen don't matter


# ---------------------------------------------------------------------------- hivemind


def _patch_quantized_decoders() -> list[str]:
    """Make hivemind's 8-bit decoders work under numpy >= 2.4; returns what was patched (nothing if not needed).

    hivemind 1.1.12 reads each quantized tensor's header with ``int(np.frombuffer(..., count=1))``,
    a TypeError since numpy 2.4. The replacements read ``[0]`` and are otherwise hivemind's own
    code: same wire format, same values. They go into the registry ``deserialize_torch_tensor``
    consults, before the averagers' processes fork, so every decode in this peer uses them."""
    import numpy as np
    import torch
    from hivemind.compression import serialization
    from hivemind.compression.quantization import (_BLOCKWISE_QUANTIZATION_BLOCKSIZE, BlockwiseQuantization,
                                                   Quantile8BitQuantization, Uniform8BitQuantization)

    try:
        int(np.zeros(1))
        return []
    except TypeError:
        pass

    def header(buffer: bytes, offset: int) -> int:
        return int(np.frombuffer(buffer, count=1, offset=offset, dtype=np.int64)[0])

    class CodebookDecoder:
        def extract(self, serialized):
            size = header(serialized.buffer, 0)
            codebook = np.frombuffer(serialized.buffer, offset=8, count=size, dtype=self.codebook_dtype)
            indices = np.frombuffer(serialized.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
            indices = torch.as_tensor(indices, dtype=torch.int64).reshape(tuple(serialized.size))
            table = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized.dtype))
            return table[indices].requires_grad_(serialized.requires_grad)

    class Uniform8Bit(CodebookDecoder, Uniform8BitQuantization):
        pass

    class Quantile8Bit(CodebookDecoder, Quantile8BitQuantization):
        pass

    class Blockwise8Bit(BlockwiseQuantization):
        def extract(self, serialized):
            from bitsandbytes.functional import dequantize_blockwise

            n_absmax, n_code = header(serialized.buffer, 0), header(serialized.buffer, 8)
            absmax = np.frombuffer(serialized.buffer, offset=16, count=n_absmax, dtype=self.codebook_dtype)
            code = np.frombuffer(serialized.buffer, offset=16 + absmax.nbytes, count=n_code, dtype=self.codebook_dtype)
            indices = np.frombuffer(serialized.buffer, offset=16 + absmax.nbytes + code.nbytes, dtype=self.indices_dtype)
            result = dequantize_blockwise(torch.as_tensor(indices).reshape(tuple(serialized.size)), absmax=torch.as_tensor(absmax),
                                          code=torch.as_tensor(code), blocksize=_BLOCKWISE_QUANTIZATION_BLOCKSIZE, nested=False)
            return result.to(getattr(torch, serialized.dtype)).requires_grad_(serialized.requires_grad)

    serialization._BASE_COMPRESSION_TYPES.update(UNIFORM_8BIT=Uniform8Bit(), QUANTILE_8BIT=Quantile8Bit(), BLOCKWISE_8BIT=Blockwise8Bit())
    return [f"hivemind 8-bit decoders re-registered for numpy {np.__version__} (int() of a 1-element array; same wire format)"]


def make_compression(name: str):
    """The hivemind.compression strategy for --compression ``name``: what this peer's averagers encode with.

    Decoding goes through hivemind's registry by the tensor's compression type, whatever the
    sender used (see _patch_quantized_decoders)."""
    from hivemind.compression import (BlockwiseQuantization, Float16Compression, NoCompression, Quantile8BitQuantization,
                                      SizeAdaptiveCompression, Uniform8BitQuantization)

    if name == "blockwise8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise BaselineError(f"--compression blockwise8bit needs bitsandbytes, which does not import here ({e}); "
                                "install it or pick uniform8bit / quantile8bit") from None
    return {
        "none": NoCompression,
        "fp16": Float16Compression,
        "uniform8bit": Uniform8BitQuantization,
        "quantile8bit": Quantile8BitQuantization,
        "blockwise8bit": BlockwiseQuantization,
        "size-adaptive": partial(SizeAdaptiveCompression, threshold=SIZE_ADAPTIVE_THRESHOLD, less=Float16Compression(),
                                 greater_equal=Uniform8BitQuantization()),
    }[name]()


def _maddr(host: str, port: int) -> str:
    return f"/{'ip6' if ':' in host else 'ip4'}/{host}/tcp/{port}"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_dht(cfg: BaselineConfig):
    """A hivemind.DHT listening on --host:--port, announcing --announce-host, joined to --initial-peers."""
    import hivemind

    port = cfg.port or (_free_port(cfg.host) if cfg.announce_host else 0)  # an announced address needs a real port
    announce = [_maddr(cfg.announce_host, port)] if cfg.announce_host else None
    try:
        return hivemind.DHT(initial_peers=list(cfg.initial_peers), start=True, host_maddrs=[_maddr(cfg.host, port)],
                            announce_maddrs=announce)
    except Exception as e:
        raise BaselineError(f"the DHT did not start (listen {_maddr(cfg.host, port)}, announce {announce}, initial peers "
                            f"{list(cfg.initial_peers) or 'none'}): {type(e).__name__}: {e}. Check that --initial-peers are "
                            "the MADDRS a running peer printed and that this host can reach them") from e


def wait_for_peers(dht, key: str, index: int, count: int, deadline: float) -> int:
    """Mark ``index`` under DHT ``key`` and wait until ``count`` peers have (or ``deadline``); returns how many did."""
    from hivemind.utils import get_dht_time

    seen = 0
    while True:
        dht.store(key, subkey=index, value=True, expiration_time=get_dht_time() + 600)
        found = dht.get(key, latest=True)
        seen = len(found.value) if found is not None and isinstance(found.value, dict) else 0
        if seen >= count or time.perf_counter() >= deadline:
            return seen
        time.sleep(0.2)


# ---------------------------------------------------------------------------- measurements


def interface_bytes() -> dict[str, tuple[int, int]]:
    """{interface: (rx bytes, tx bytes)} of this network namespace (/proc/net/dev); {} where unreadable."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return {}
    counters = {}
    for line in lines:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) >= 9:
            counters[name.strip()] = (int(fields[0]), int(fields[8]))
    return counters


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def report(cfg: BaselineConfig, progress: Progress, status: str, message: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The output JSON (fields: see the module docstring)."""
    end = progress.last_epoch_at or time.perf_counter()
    wall = end - progress.first_step - progress.discovery_seconds if progress.first_step is not None else None
    epochs = progress.epoch
    losses = {e: list(v) for e, v in list(progress.losses.items())}
    epoch_losses = [_mean(losses.get(e, [])) for e in range(epochs)]
    after = interface_bytes()
    before = progress.interfaces_before
    per_interface = {name: {"rx": after[name][0] - before[name][0], "tx": after[name][1] - before[name][1]}
                     for name in after if name in before}
    ok = wall is not None and wall > 0
    return {
        "status": status,
        "message": message,
        "peer_index": cfg.peer_index,
        "num_peers": cfg.num_peers,
        "epochs": epochs,
        "epochs_target": cfg.epochs,
        "microbatches": progress.microbatches,
        "samples": progress.samples,
        "tokens": progress.tokens,
        "loss_tokens": progress.loss_tokens,
        "wall_seconds": wall,
        "startup_seconds": (progress.first_step - progress.started) if progress.first_step is not None else None,
        "discovery_seconds": progress.discovery_seconds,
        "compute_seconds": progress.compute_seconds,
        "optimizer_step_seconds": progress.step_seconds,
        "tokens_per_second": progress.tokens / wall if ok else None,
        "collaboration_tokens_per_second_nominal": epochs * cfg.global_batch_size * cfg.seq_len / wall if ok else None,
        "epoch_losses": epoch_losses,
        "epoch_samples": [progress.samples_by_epoch.get(e, 0) for e in range(epochs)],
        "epoch_end_seconds": [progress.epoch_reached_at.get(e + 1) for e in range(epochs)],
        "final_loss": next((x for x in reversed(epoch_losses) if x is not None), None),
        "state_loads_from_peers": progress.state_loads,
        "peers_done_seen": progress.peers_done,
        "bytes_sent": None,
        "bytes_received": None,
        "bytes_note": "hivemind's p2pd exposes no byte counters (its -metricsAddr has none); use kernel counters, e.g. "
                      "interface_bytes when this peer has its own network namespace",
        "interface_bytes": per_interface,
        "maddrs": progress.maddrs,
        "settings": settings,
    }


def write_report(cfg: BaselineConfig, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=2, default=str)
    if cfg.out:
        tmp = Path(cfg.out + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(cfg.out)
    print("RESULT " + json.dumps({k: result[k] for k in ("status", "epochs", "tokens_per_second", "final_loss")}), flush=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children before their own children."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def kill_descendants() -> None:
    """SIGKILL the processes this one started (DHT, averagers, p2pd), by pid."""
    for pid in reversed(_descendants(os.getpid())):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------------------- the run


def train(cfg: BaselineConfig, progress: Progress, settings: dict[str, Any]) -> None:
    """Start the DHT and optimizer, wait for the peers, train --epochs, linger, shut down."""
    os.environ.setdefault("QUANTIZATION_THREADS", str(cfg.threads))  # hivemind's quantizer pool (default 128 threads)
    import torch

    torch.set_num_threads(cfg.threads)
    import hivemind

    from peer.stage_model import summed_token_loss
    from proto.manifest import parameter_checksum
    from proto.lifecycle import die_with_parent

    die_with_parent()  # the DHT's and averagers' processes die with this one
    deadline = progress.started + cfg.timeout
    t = cfg.train
    settings["patches"] = _patch_quantized_decoders()
    compression = make_compression(cfg.compression)
    tokenizer, mixer = build_data(cfg)
    model = build_model(cfg, tokenizer)
    settings |= {
        "model": {"preset": "tiny", **{k: getattr(model.config, k) for k in ("n_layer", "n_embd", "n_head", "rotary_dim", "vocab_size", "n_positions")},
                  "parameters": sum(p.numel() for p in model.parameters()), "initial_checksum": parameter_checksum(model)},
        "data": {"ul2_tokens": 0, "instruction_share": 0.0, "shard": f"global microbatch k*{cfg.num_peers}+{cfg.peer_index}",
                 "phases": [p["objective"] for p in mixer.describe()["phases"]]},
        "optimizer": {"name": "AdamW", "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay},
        "hivemind": {"version": hivemind.__version__, "target_batch_size": cfg.global_batch_size,
                     "batch_size_per_step": cfg.micro_batch_size, "matchmaking_time": cfg.matchmaking_time,
                     "averaging_timeout": cfg.averaging_timeout, "average_state_every": cfg.average_state_every,
                     "tracker_min_refresh_period": cfg.refresh_period, "tracker_max_refresh_period": cfg.max_refresh_period,
                     "request_timeout": cfg.request_timeout or cfg.matchmaking_time / 2,
                     "delay_optimizer_step": cfg.delay_updates, "delay_grad_averaging": cfg.delay_updates,
                     "use_local_updates": False, "grad_compression": repr(compression),
                     "state_averaging_compression": repr(compression)},
        "torch": torch.__version__,
    }

    schedule = dataclasses.replace(t, lr_decay_rounds=t.lr_decay_rounds or cfg.epochs)  # hometrain's: decay to the last round
    dht = start_dht(cfg)
    opt = None
    try:
        progress.maddrs = [str(m) for m in dht.get_visible_maddrs()]
        print("MADDRS " + json.dumps(progress.maddrs), flush=True)
        opt = hivemind.Optimizer(
            dht=dht, run_id=cfg.run_id, params=param_groups(list(model.named_parameters()), t.weight_decay),
            optimizer=partial(torch.optim.AdamW, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps),
            scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda epoch: learning_rate(schedule, epoch + 1) / t.lr),
            batch_size_per_step=cfg.micro_batch_size, target_batch_size=cfg.global_batch_size,
            matchmaking_time=cfg.matchmaking_time, averaging_timeout=cfg.averaging_timeout,
            average_state_every=cfg.average_state_every, use_local_updates=False,
            grad_compression=compression, state_averaging_compression=compression, verbose=False,
            delay_optimizer_step=cfg.delay_updates, delay_grad_averaging=cfg.delay_updates,
            averager_opts={"request_timeout": cfg.request_timeout or cfg.matchmaking_time / 2},
            tracker_opts={"min_refresh_period": cfg.refresh_period, "max_refresh_period": cfg.max_refresh_period,
                          "default_refresh_period": min(max(cfg.refresh_period, 0.5), cfg.max_refresh_period)},
        )
        seen = wait_for_peers(dht, f"{cfg.run_id}_baseline_ready", cfg.peer_index, cfg.num_peers,
                              min(deadline, time.perf_counter() + cfg.start_timeout))
        if seen < cfg.num_peers:
            raise BaselineError(f"only {seen} of --num-peers {cfg.num_peers} peers of run {cfg.run_id!r} showed up within "
                                f"{cfg.start_timeout:g} s (--start-timeout); start the others with --initial-peers "
                                f"{' '.join(progress.maddrs[:1]) or 'MADDR'} and the same --run-id, or lower --num-peers")

        original_load = opt.load_state_from_peers

        def counted_load(**kwargs):
            progress.state_loads += 1
            return original_load(**kwargs)

        opt.load_state_from_peers = counted_load  # opt.step() calls it when this peer fell behind the others

        def train_microbatch(k: int) -> None:
            started = time.perf_counter()
            mb = microbatch_for(mixer, cfg, k)
            logits = model(mb.input_ids, use_cache=False).logits
            loss = summed_token_loss(logits, mb.target_ids, mb.loss_mask) / mb.loss_tokens
            loss.backward()
            stepping = time.perf_counter()
            epoch = opt.local_epoch
            opt.step()
            opt.zero_grad()
            done = time.perf_counter()
            value = loss.item()
            progress.compute_seconds += stepping - started
            progress.step_seconds += done - stepping
            progress.losses.setdefault(epoch, []).append(value)
            progress.samples_by_epoch[epoch] = progress.samples_by_epoch.get(epoch, 0) + mb.input_ids.shape[0]
            progress.microbatches += 1
            progress.samples += mb.input_ids.shape[0]
            progress.tokens += mb.input_ids.numel()
            progress.loss_tokens += mb.loss_tokens
            for e in range(epoch + 1, opt.local_epoch + 1):
                progress.epoch_reached_at.setdefault(e, done - progress.first_step - progress.discovery_seconds)
            progress.epoch = opt.local_epoch
            if not math.isfinite(value):
                raise BaselineError(f"loss became {value} at epoch {epoch} (microbatch {k}); the run diverged: lower the lr "
                                    "or check the compression")

        progress.interfaces_before = interface_bytes()
        progress.first_step = time.perf_counter()
        progress.epoch = opt.local_epoch
        # hivemind's progress tracker announces a peer only once it has accumulated samples, and a peer that sees no
        # others takes whole epochs alone (no averaging). So: one microbatch, then wait until every peer is seen.
        train_microbatch(0)
        waiting = time.perf_counter()
        while opt.tracker.global_progress.num_peers < cfg.num_peers and opt.local_epoch == 0:
            if time.perf_counter() > min(deadline, waiting + cfg.start_timeout):
                raise BaselineError(f"hivemind's progress tracker saw {opt.tracker.global_progress.num_peers} of --num-peers "
                                    f"{cfg.num_peers} peers within {cfg.start_timeout:g} s of the first microbatch (--start-timeout); "
                                    "were the others started with the same --run-id, --global-batch-size and --compression?")
            time.sleep(0.05)
        seen = wait_for_peers(dht, f"{cfg.run_id}_baseline_synced", cfg.peer_index, cfg.num_peers,
                              min(deadline, waiting + cfg.start_timeout))  # then start together, not whoever saw the others first
        if seen < cfg.num_peers:
            raise BaselineError(f"only {seen} of --num-peers {cfg.num_peers} peers got past their first microbatch within "
                                f"{cfg.start_timeout:g} s (--start-timeout); see the other peers' output for why they stopped")
        progress.discovery_seconds = time.perf_counter() - waiting
        k = 1
        while opt.local_epoch < cfg.epochs:
            train_microbatch(k)
            k += 1
        progress.last_epoch_at = time.perf_counter()
        settings["final_checksum"] = parameter_checksum(model)
        progress.peers_done = wait_for_peers(dht, f"{cfg.run_id}_baseline_done", cfg.peer_index, cfg.num_peers,
                                             min(deadline, time.perf_counter() + cfg.linger))
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()


def main(argv: list[str] | None = None) -> int:
    progress = Progress()
    try:
        cfg = parse_args(argv)
    except BaselineError as e:
        print(f"hivemind_baseline: {e}", file=sys.stderr)
        return EXIT_BAD_SETTING
    settings: dict[str, Any] = {"config": dataclasses.asdict(cfg)}

    def on_timeout() -> None:
        message = (f"timed out after {cfg.timeout:g} s (--timeout) at epoch {progress.epoch} of {cfg.epochs}, "
                   f"{progress.microbatches} microbatches trained; peers seen done: {progress.peers_done}. Are all "
                   f"--num-peers {cfg.num_peers} peers running and reachable? Raise --timeout for slow links")
        print(f"hivemind_baseline: {message}", file=sys.stderr, flush=True)
        try:
            write_report(cfg, report(cfg, progress, "timeout", message, settings))
        finally:
            kill_descendants()
            os._exit(EXIT_TIMEOUT)

    watchdog = threading.Timer(cfg.timeout, on_timeout)
    watchdog.daemon = True
    watchdog.start()
    def on_sigterm(*_: Any) -> None:
        raise Stopped(f"stopped by SIGTERM at epoch {progress.epoch} of {cfg.epochs}")

    signal.signal(signal.SIGTERM, on_sigterm)  # unwind through train()'s finally: the optimizer and DHT shut down
    try:
        train(cfg, progress, settings)
    except BaselineError as e:
        print(f"hivemind_baseline: {e}", file=sys.stderr, flush=True)
        write_report(cfg, report(cfg, progress, "error", str(e), settings))
        return EXIT_ERROR
    except Stopped as e:
        print(f"hivemind_baseline: {e}", file=sys.stderr, flush=True)
        write_report(cfg, report(cfg, progress, "stopped", str(e), settings))
        return EXIT_ERROR
    except (Exception, KeyboardInterrupt) as e:
        message = f"{type(e).__name__}: {e} (at epoch {progress.epoch} of {cfg.epochs})"
        print(f"hivemind_baseline: {message}", file=sys.stderr, flush=True)
        write_report(cfg, report(cfg, progress, "error", message, settings))
        if not isinstance(e, KeyboardInterrupt):
            raise
        return EXIT_ERROR
    finally:
        watchdog.cancel()
    write_report(cfg, report(cfg, progress, "ok", "", settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
