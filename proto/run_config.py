"""Typed run configuration: the single source of every flag, TOML key and default.

``TrainConfig`` is part of the wire contract: the coordinator sends it to every peer at Join,
so both sides train with the same batch shape, optimizer and seed. ``CoordinatorConfig`` and
``PeerConfig`` are the two processes' settings. The CLIs are derived from these dataclasses
(``add_arguments`` / ``load``): a field's ``help`` is its --help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and its --help text."""
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag to change."""


@dataclass(kw_only=True)
class TrainConfig:
    """How the model trains; identical on every peer of a run (sent at Join)."""

    seq_len: int = opt(64, "Tokens per training sample.")
    micro_batch_size: int = opt(4, "Samples per microbatch (what one pipeline trip carries).")
    global_batch_size: int = opt(16, "Samples per round, i.e. per optimizer step, across all replicas.")
    lr: float = opt(1e-3, "AdamW learning rate (GPT-JT used 1e-5 on GPT-J-6B).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.999, "AdamW beta2.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    seed: int = opt(0, "Seed of weight init and data sampling; same seed, same run.")
    round_timeout: float = opt(120.0, "Longest an open round may last; late samples are dropped and counted.")
    deadline_factor: float = opt(3.0, "An open round closes after this many times the median length of recent rounds (adaptive deadline).")
    deadline_floor: float = opt(10.0, "The adaptive round deadline is never shorter than this (seconds).")
    sync_timeout: float = opt(30.0, "Seconds replicas wait for each other while averaging gradients before retrying without the missing.")
    max_inflight: int = opt(2, "Microbatches a stage-0 peer keeps in flight at once (pipelining).")
    compute_dtype: str = opt("float32", "Dtype of stage weights and activations on peers: float32, bfloat16 or float16.")

    def __post_init__(self) -> None:
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --micro-batch-size {self.micro_batch_size}"
            )
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "max_inflight"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--compute-dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")

    @property
    def microbatches_per_round(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"the coordinator sent settings this peer does not know: {sorted(unknown)}; upgrade hometrain")
        return cls(**data)


@dataclass(kw_only=True)
class CoordinatorConfig(TrainConfig):
    """`coordinator serve` settings (a TOML --config may carry the same keys)."""

    host: str = opt("0.0.0.0", "Address the gRPC, HTTP and DHT listeners bind to.")
    announce_host: str = opt("", "Address peers reach this machine at (default: 127.0.0.1 when --host is 0.0.0.0).")
    port: int = opt(50051, "gRPC control-plane port.")
    http_port: int = opt(8080, "HTTP port: status page, /api/status, /metrics, checkpoint downloads.")
    dht_port: int = opt(0, "TCP port of the coordinator's DHT node that peers bootstrap from (0: any free port).")
    state_dir: str = opt("run", "Directory of the run's SQLite store, tokenizer and checkpoints.")
    model: str = opt("tiny", "Model preset: tiny (4 blocks, d_model 128), small (8 blocks, d_model 512) or gptj-6b.")
    init_from: str = opt("", "Start from this Hugging Face GPT-J checkpoint directory instead of random init.")
    stages: int = opt(2, "Pipeline stages the blocks are split into.")
    rounds: int = opt(0, "Stop after this many rounds (0: run until Ctrl-C).")
    checkpoint_every: int = opt(10, "Publish a checkpoint every N rounds.")
    join_token: str = opt("", "Secret a peer must present to join (empty: anyone may join).")
    heartbeat_interval: float = opt(2.0, "Seconds between peer heartbeats.")
    heartbeat_timeout: float = opt(10.0, "Seconds without a heartbeat after which a peer is marked gone.")
    vocab_size: int = opt(1024, "Size of the byte-level BPE trained on the built-in corpus (tiny preset).")
    min_replicas: int = opt(1, "Online replicas every stage needs before rounds open.")
    linger: bool = opt(False, "After --rounds, keep serving the status page and checkpoints until Ctrl-C.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stages < 1:
            raise ConfigError(f"--stages must be >= 1, got {self.stages}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    @property
    def public_host(self) -> str:
        if self.announce_host:
            return self.announce_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


@dataclass(kw_only=True)
class PeerConfig:
    """`peer join` settings."""

    coordinator: str = opt("127.0.0.1:50051", "HOST:PORT of the coordinator's gRPC control plane.")
    gpu: str = opt("auto", "CUDA device index to train on, or 'cpu' (auto: GPU 0 if there is one, else cpu).")
    name: str = opt("", "Public name shown on the status page.")
    join_token: str = opt("", "Token the organiser gave you, if the run requires one.")
    initial_peers: str = opt("", "Space-separated DHT multiaddrs to bootstrap from (default: those the coordinator gives).")
    host: str = opt("0.0.0.0", "Address this peer's P2P node listens on.")
    announce_host: str = opt("", "Public address other peers reach this peer at (behind NAT: leave empty).")
    p2p_port: int = opt(0, "TCP port of this peer's P2P node (0: any free port).")
    stage: int = opt(-1, "Ask for this pipeline stage (-1: let the coordinator choose).")
    connect_timeout: float = opt(300.0, "Seconds to keep retrying an unreachable coordinator before giving up.")
    metrics_port: int = opt(0, "Serve Prometheus /metrics on this port (0: off).")
    threads: int = opt(0, "CPU threads for torch (0: torch's default).")
    serve_after_run: bool = opt(False, "When the run ends, keep serving forward-only (inference) requests until Ctrl-C.")
    quiet: bool = opt(False, "Log warnings and errors only.")
    log_format: str = opt("text", "Log format: text or json.")

    def __post_init__(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"--log-format must be text or json, got {self.log_format!r}")
        if ":" not in self.coordinator:
            raise ConfigError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")


C = TypeVar("C")


def _base_type(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one --flag per field of dataclass ``cls``; unset flags are absent from the namespace."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper())


def load(cls: type[C], args: argparse.Namespace, config_path: str | None = None) -> C:
    """Defaults, overridden by the TOML file (if any), overridden by flags given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {config_path}: no such file")
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ConfigError(f"{config_path}: unknown setting {key!r}; known: {', '.join(sorted(names))}")
            values[name] = value
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)
