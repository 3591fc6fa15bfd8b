"""Typed run configuration: the single source of every flag, TOML key and default.

``TrainConfig`` is part of the wire contract: the coordinator sends it to every peer at Join,
so both sides train with the same batch shape, optimizer and seed. ``CoordinatorConfig`` and
``PeerConfig`` are the two processes' settings. The CLIs are derived from these dataclasses
(``add_arguments`` / ``load``): a field's ``help`` is its --help text, its ``unit`` follows its
default, and its section (``SECTIONS`` of its class, as torchtitan groups its own: run,
model, data, optimizer, compression, network, observability) is its argument group in
--help and its table in the TOML file (``[network]\nport = 50051``); a flat file (``port =
50051``) loads too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar


def opt(default: Any, help: str, *, secret: bool = False, unit: str = "") -> Any:
    """A dataclass field with a default, its --help text and the unit its value is in.

    A ``secret`` field never comes from the command line (``ps`` shows every user a command
    line): it comes from ``--<name>-file FILE``, the environment variable ``HOMETRAIN_<NAME>``
    or the TOML file, in that order."""
    return field(default=default, metadata={"help": help, "secret": secret, "unit": unit})


SECTION_HELP = {
    "run": "the run itself: where it lives, how long it lasts, who may join",
    "model": "the GPT-J being trained and how it is split into stages",
    "data": "what each sample holds and where it comes from",
    "optimizer": "AdamW",
    "compression": "what crosses the wire, and how small",
    "network": "addresses, ports, timeouts, pipelining",
    "device": "what this machine lends",
    "observability": "logs and metrics",
    "evaluation": "how every published checkpoint is judged (coordinator eval)",
    "security": "TLS for the control plane, and which coordinator key to trust",
}


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag to change."""


def check_port(flag: str, port: int, allow_zero: bool = True) -> None:
    """Raise ConfigError unless ``port`` is a TCP port (0 means any free one, where allowed)."""
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{flag} must be a TCP port from {low} to 65535{' (0: any free port)' if allow_zero else ''}, got {port}")


def split_host_port(flag: str, address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port); ConfigError names ``flag`` if it is not one."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host:
        raise ConfigError(f"{flag} must be HOST:PORT (e.g. coordinator.example.org:50051), got {address!r}")
    if not port.isdigit():
        raise ConfigError(f"{flag} {address!r}: the port {port!r} is not a number; expected HOST:PORT, e.g. {host}:50051")
    check_port(f"{flag} {address!r}:", int(port), allow_zero=False)
    return host, int(port)


TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def parse_eval_task(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` (an organiser's multiple-choice task file) as (name, path); ConfigError says what is expected."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ConfigError(f"an evaluation task is NAME=PATH of a JSONL file of {{prompt, choices, answer}} lines, got {spec!r}")
    if not TASK_NAME.fullmatch(name.strip()):
        raise ConfigError(f"evaluation task name {name!r}: use letters, digits, '_', '-' and '.' (it names a file and a metric label)")
    if not Path(path).is_file():
        raise ConfigError(f"evaluation task {name}: {path} is not a file")
    return name.strip(), Path(path)


@dataclass(kw_only=True)
class ConsoleConfig:
    """How a process talks to its terminal or its service manager's journal."""

    quiet: bool = opt(False, "Log warnings and errors only.")
    log_format: Literal["text", "json"] = opt("text", "Log format: text, or json (one object per line, for services).")


@dataclass(kw_only=True)
class TrainConfig:
    """How the model trains; identical on every peer of a run (sent at Join)."""

    sections: ClassVar[dict[str, tuple[str, ...]]] = {
        "run": ("seed", "round_timeout", "deadline_factor", "deadline_floor"),
        "model": ("compute_dtype", "activation_checkpointing", "lora_rank", "lora_alpha", "lora_targets", "lora_base_bits"),
        "data": ("seq_len", "micro_batch_size", "global_batch_size"),
        "optimizer": ("optimizer", "lr", "lr_schedule", "lr_warmup_rounds", "lr_decay_rounds", "lr_min_ratio", "clip_grad_norm",
                      "weight_decay", "beta1", "beta2", "eps", "robust_aggregation", "robust_tau", "robust_iterations",
                      "audit_rate", "audit_tolerance"),
        "compression": ("activation_compression", "activation_bits", "activation_first_bits", "gradient_bits", "boundary_block",
                        "sync_compression", "sync_random_ratio", "sync_topk_ratio", "sync_bits", "p_skip", "resync_every",
                        "sync_warmup_rounds", "sync_every", "sync_density", "sync_chunk", "sync_error_decay", "outer_lr"),
        "network": ("sync_timeout", "max_inflight"),
    }

    seq_len: int = opt(64, "Tokens per training sample.", unit="tokens")
    micro_batch_size: int = opt(4, "Samples per microbatch (what one pipeline trip carries).")
    global_batch_size: int = opt(16, "Samples per round, i.e. per optimizer step, across all replicas.")
    lr: float = opt(1e-3, "AdamW peak learning rate (GPT-JT used 1e-5 on GPT-J-6B).")
    lr_schedule: Literal["cosine", "linear", "constant"] = opt(
        "cosine", "After the warm-up the learning rate decays to --lr-min-ratio x --lr by round --lr-decay-rounds: cosine, "
        "linear, or constant (no decay).")
    lr_warmup_rounds: int = opt(10, "The learning rate rises linearly from --lr / N at round 1 to --lr at round N (0: no warm-up).")
    lr_decay_rounds: int = opt(
        0, "Round at which the decay reaches its floor and stays (0: the coordinator's --rounds; with no --rounds, no decay).")
    lr_min_ratio: float = opt(0.1, "The decay's floor, as a share of --lr.")
    clip_grad_norm: float = opt(
        1.0, "Clip the gradient by its global norm over all stages (what one process's clip_grad_norm_ does): stages report "
        "their squared norms and all scale by the same factor, min(1, N / norm); 0: no clipping.")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay, on matrices only (biases, LayerNorm weights never decay).")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.999, "AdamW beta2.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    robust_aggregation: Literal["centered_clip", "off"] = opt(
        "centered_clip", "How a stage of 3 or more replicas combines their gradients (or, compressed, their deltas): "
        "centered_clip (CenteredClip around the coordinate-wise median, so one bad replica moves the result a bounded "
        "amount and is named to the coordinator; with honest replicas it is their token-weighted mean unless one is "
        "beyond the clip radius) or off (the plain sum, bit for bit). Stages of 1 or 2 replicas always sum plainly.")
    robust_tau: float = opt(
        3.0, "centered_clip: the clip radius, as a multiple of the median distance of the replicas' contributions from "
        "their coordinate-wise median (larger: closer to the plain mean with honest replicas, more room for a bad one).")
    robust_iterations: int = opt(10, "centered_clip: the most clipping iterations per aggregate (it stops once one changes nothing).")
    audit_rate: float = opt(
        0.05, "Fraction of microbatches a stage-0 peer runs forward a second time, through other replicas of each stage, "
        "to compare the two losses (the coordinator flags a peer found only on routes that disagree); 0: no audits.")
    audit_tolerance: float = opt(
        0.0, "Relative difference of the two losses of an audit that still counts as agreement (0: from the precision "
        "in use: 1e-4 at float32 with plain activations, 2e-2 at bfloat16/float16, 5e-2 with compressed activations).")
    seed: int = opt(0, "Seed of weight init and data sampling; same seed, same run.")
    round_timeout: float = opt(120.0, "Longest an open round may last; late samples are dropped and counted.", unit="s")
    deadline_factor: float = opt(3.0, "An open round closes after this many times the median length of recent rounds (adaptive deadline).")
    deadline_floor: float = opt(10.0, "The adaptive round deadline is never shorter than this.", unit="s")
    sync_timeout: float = opt(30.0, "How long replicas wait for each other while syncing before retrying without the missing.", unit="s")
    max_inflight: int = opt(2, "Most microbatches a stage-0 peer keeps in flight at once (pipelining; it sizes them from the pipeline's "
                            "round trip up to this, and the memory planner counts this many).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "Precision of the stages' compute: float32 (the exact reference), bfloat16 (autocast over fp32 master "
        "weights) or float16 (autocast with a dynamic loss scale, for cards without bf16; an overflow skips the step).")
    optimizer: Literal["adamw", "adamw8bit"] = opt("adamw", "AdamW with fp32 moments, or bitsandbytes' 8-bit AdamW (a quarter of the optimizer memory).")
    activation_checkpointing: bool = opt(False, "Keep only each block's input through the forward and recompute the block in the backward.")
    lora_rank: int = opt(0, "LoRA: train low-rank adapters of this rank on a frozen base (peft); only adapters cross the wire. "
                            "0: train every weight. The LoRA paper found rank 4-8 on the attention's query and value enough.")
    lora_alpha: float = opt(16.0, "LoRA: the adapters' scale is alpha / rank.")
    lora_targets: str = opt("q_proj,v_proj", "LoRA: the linear layers that get adapters, comma-separated (q_proj, k_proj, v_proj, out_proj, fc_in, fc_out).")
    lora_base_bits: Literal[32, 8, 4] = opt(32, "LoRA: how the frozen base is held: 32 (fp32), 8 (bitsandbytes int8) or 4 (NF4), where the device supports it.")
    activation_compression: Literal["none", "direct", "aqsgd"] = opt("none", "Activations forward: none, direct (quantize each frame) or aqsgd (quantize the change since the sample's last visit).")
    activation_bits: Literal[2, 4, 8] = opt(4, "Bits per activation value when compressed.")
    activation_first_bits: Literal[2, 4, 8] = opt(8, "AQ-SGD: bits for a frame holding a sample's first visit (it fills both caches).")
    gradient_bits: Literal[0, 2, 4, 8] = opt(0, "Bits per activation gradient backward (0: fp32, uncompressed).")
    boundary_block: Literal[64, 128, 256, 512, 1024, 2048, 4096] = opt(64, "Values sharing one scale when activations or their gradients are quantized (larger: fewer bytes on scales, coarser).")
    sync_compression: Literal["none", "cocktail", "sparseloco"] = opt(
        "none", "Replica sync: none (exact gradient sum every round), cocktail (every round, parameter deltas: random subset, "
        "top-k, low-bit, error feedback) or sparseloco (local steps: --sync-every rounds apart, pseudo-gradients through an "
        "error-feedback accumulator, chunk-wise top-k at low bits, an outer step).")
    sync_random_ratio: float = opt(0.1, "cocktail: share of coordinates in the shared random subset.")
    sync_topk_ratio: float = opt(0.2, "cocktail: share of the random subset kept by magnitude.")
    sync_bits: Literal[2, 4, 8] = opt(4, "cocktail and sparseloco: bits per kept value.")
    p_skip: float = opt(0.0, "cocktail: probability that a stage skips a round's sync and keeps training locally (same draw on every replica).")
    resync_every: int = opt(0, "cocktail: never skip the sync of rounds divisible by N, so replicas re-align at least that often (0: no such rule).")
    sync_warmup_rounds: int = opt(
        0, "cocktail and sparseloco: rounds 1..N sum gradients exactly, uncompressed, before the compressed sync starts (as "
        "CocktailSGD warms up: compression costs most early in training from random init)."
    )
    sync_every: int = opt(15, "sparseloco: replicas sync every N rounds and step on their own gradients in between (H local steps).")
    sync_density: float = opt(64 / 4096, "sparseloco: share of each chunk's values sent, the largest by magnitude (Covenant-72B sent 64 of every 4096).")
    sync_chunk: Literal[64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536] = opt(
        4096, "sparseloco: values per top-k chunk; each sent value's offset costs log2(N) bits.")
    sync_error_decay: float = opt(0.95, "sparseloco: the error-feedback accumulator is multiplied by this before each pseudo-gradient is added "
                                        "(it stands in for DiLoCo's outer momentum).")
    outer_lr: float = opt(1.0, "sparseloco: the outer step moves the shared weights by this times the replicas' mean compressed pseudo-gradient.")

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
        if self.activation_compression not in ("none", "direct", "aqsgd"):
            raise ConfigError(f"--activation-compression must be none, direct or aqsgd, got {self.activation_compression!r}")
        if self.sync_compression not in ("none", "cocktail", "sparseloco"):
            raise ConfigError(f"--sync-compression must be none, cocktail or sparseloco, got {self.sync_compression!r}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--lr-schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        for name in ("lr_warmup_rounds", "lr_decay_rounds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ConfigError(f"--lr-min-ratio must be in [0, 1], got {self.lr_min_ratio}")
        if not self.clip_grad_norm >= 0 or not math.isfinite(self.clip_grad_norm):
            raise ConfigError(f"--clip-grad-norm must be a finite number >= 0 (0: no clipping), got {self.clip_grad_norm}")
        if self.robust_aggregation not in ("centered_clip", "off"):
            raise ConfigError(f"--robust-aggregation must be centered_clip or off, got {self.robust_aggregation!r}")
        if not (self.robust_tau > 0 and math.isfinite(self.robust_tau)):
            raise ConfigError(f"--robust-tau must be a finite number > 0 (the clip radius in median distances), got {self.robust_tau}")
        if not 0 <= self.audit_rate <= 1:
            raise ConfigError(f"--audit-rate must be in [0, 1] (a fraction of microbatches), got {self.audit_rate}")
        if not (self.audit_tolerance >= 0 and math.isfinite(self.audit_tolerance)):
            raise ConfigError(f"--audit-tolerance must be a finite number >= 0 (0: from the precision in use), got {self.audit_tolerance}")
        if self.robust_iterations < 1:
            raise ConfigError(f"--robust-iterations must be >= 1, got {self.robust_iterations}")
        if self.sync_every < 1:
            raise ConfigError(f"--sync-every must be >= 1, got {self.sync_every}")
        if not 0 < self.sync_density <= 1:
            raise ConfigError(f"--sync-density must be in (0, 1], got {self.sync_density}")
        if self.sync_chunk not in tuple(2**i for i in range(6, 17)):
            raise ConfigError(f"--sync-chunk must be a power of two from 64 to 65536, got {self.sync_chunk}")
        if not 0 <= self.sync_error_decay <= 1:
            raise ConfigError(f"--sync-error-decay must be in [0, 1], got {self.sync_error_decay}")
        if not self.outer_lr > 0:
            raise ConfigError(f"--outer-lr must be > 0, got {self.outer_lr}")
        for name in ("activation_bits", "activation_first_bits", "sync_bits"):
            if getattr(self, name) not in (2, 4, 8):
                raise ConfigError(f"--{name.replace('_', '-')} must be 2, 4 or 8, got {getattr(self, name)}")
        if self.boundary_block not in tuple(2**i for i in range(6, 13)):
            raise ConfigError(f"--boundary-block must be a power of two from 64 to 4096, got {self.boundary_block}")
        if self.gradient_bits not in (0, 2, 4, 8):
            raise ConfigError(f"--gradient-bits must be 0, 2, 4 or 8, got {self.gradient_bits}")
        if not 0 < self.sync_random_ratio <= 1 or not 0 < self.sync_topk_ratio <= 1:
            raise ConfigError(f"--sync-random-ratio and --sync-topk-ratio must be in (0, 1], got {self.sync_random_ratio}, {self.sync_topk_ratio}")
        if not 0 <= self.p_skip < 1:
            raise ConfigError(f"--p-skip must be in [0, 1), got {self.p_skip}")
        if self.p_skip > 0 and self.sync_compression != "cocktail":
            raise ConfigError(f"--p-skip {self.p_skip} needs --sync-compression cocktail: skipped rounds are caught up by the next parameter-delta sync")
        if self.resync_every < 0:
            raise ConfigError(f"--resync-every must be >= 0, got {self.resync_every}")
        if self.sync_warmup_rounds < 0:
            raise ConfigError(f"--sync-warmup-rounds must be >= 0, got {self.sync_warmup_rounds}")
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        unknown = sorted(set(self.lora_target_modules) - set(LORA_TARGETS))
        if self.lora_rank and (unknown or not self.lora_target_modules):
            raise ConfigError(f"--lora-targets must name some of {', '.join(LORA_TARGETS)}; got {self.lora_targets!r}")
        if self.lora_base_bits != 32 and not self.lora_rank:
            raise ConfigError(f"--lora-base-bits {self.lora_base_bits} needs --lora-rank > 0: only a frozen base can be held in fewer bits")
        if self.sync_warmup_rounds > 0 and self.sync_compression == "none":
            raise ConfigError(f"--sync-warmup-rounds {self.sync_warmup_rounds} needs --sync-compression cocktail or sparseloco: without it every round's sync is exact")

    @property
    def lora_target_modules(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def compresses_sync(self, round: int) -> bool:
        """Whether ``round`` steps locally and syncs compressed (cocktail or sparseloco, past the warm-up) rather than summing
        gradients exactly."""
        return self.sync_compression != "none" and round > self.sync_warmup_rounds

    @property
    def audit_relative_tolerance(self) -> float:
        """--audit-tolerance, or (0) what the precision in use allows between two honest forwards of one microbatch."""
        if self.audit_tolerance > 0:
            return self.audit_tolerance
        if self.activation_compression != "none":
            return 5e-2  # the trained route's activations were quantized, the audit's were not
        return 1e-4 if self.compute_dtype == "float32" else 2e-2

    def losses_agree(self, first_loss: float, first_tokens: int, second_loss: float, second_tokens: int) -> bool:
        """Whether two forwards of one microbatch (an audit) agree: the same tokens, summed losses within the tolerance."""
        if first_tokens != second_tokens or not (math.isfinite(first_loss) and math.isfinite(second_loss)):
            return False
        return abs(first_loss - second_loss) <= self.audit_relative_tolerance * max(abs(first_loss), abs(second_loss), 1e-6)

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
class CoordinatorConfig(TrainConfig, ConsoleConfig):
    """`coordinator serve` settings (a TOML --config may carry the same keys)."""

    sections: ClassVar[dict[str, tuple[str, ...]]] = {
        "run": TrainConfig.sections["run"] + ("state_dir", "rounds", "checkpoint_every", "stall_limit", "linger", "min_replicas",
                                             "heartbeat_interval", "heartbeat_timeout", "heartbeat_rate", "join_token"),
        "model": ("model", "init_from", "stages", "stage_memory_gb") + TrainConfig.sections["model"],
        "data": TrainConfig.sections["data"] + ("ul2_tokens", "instruction_share", "ul2_shares", "pack_instructions", "tokenizer",
                                               "vocab_size", "sources", "heldout_share"),
        "optimizer": TrainConfig.sections["optimizer"],
        "compression": TrainConfig.sections["compression"],
        "network": ("host", "announce_host", "port", "http_port", "dht_port") + TrainConfig.sections["network"],
        "observability": ("quiet", "log_format"),
        "evaluation": ("eval_on", "eval_device", "eval_engine", "eval_tasks", "eval_shots", "eval_probe_items", "eval_max_tokens"),
        "security": ("tls_cert", "tls_key"),
    }

    tls_cert: str = opt("", "PEM certificate chain to serve the gRPC control plane over TLS (with --tls-key; default: plaintext).")
    tls_key: str = opt("", "PEM private key of --tls-cert.")
    host: str = opt("0.0.0.0", "Address the gRPC, HTTP and DHT listeners bind to.")
    announce_host: str = opt(
        "", "Address peers reach this machine at: it goes into checkpoint URLs and the DHT's announced addresses "
        "(default: --host, or 127.0.0.1 when that is a wildcard; a peer on another host then uses the address it dialled)."
    )
    port: int = opt(50051, "gRPC control-plane port.")
    http_port: int = opt(8080, "HTTP port: status page, /api/status, /metrics, checkpoint downloads.")
    dht_port: int = opt(0, "TCP port of the coordinator's DHT node that peers bootstrap from (0: any free port).")
    state_dir: str = opt("run", "Directory of the run's SQLite store, tokenizer and checkpoints.")
    model: Literal["tiny", "small", "gptj-6b"] = opt("tiny", "Model preset: tiny (4 blocks, d_model 128), small (8 blocks, d_model 512) or gptj-6b.")
    init_from: str = opt("", "Start from this Hugging Face GPT-J checkpoint directory instead of random init.")
    stages: int = opt(2, "Pipeline stages the blocks are split into (0 with --stage-memory-gb: as few as fit).")
    stage_memory_gb: float = opt(
        0.0, "Plan the stages' layer ranges so each fits this much device memory with the run's settings (the "
        "planner counts weights, gradients, optimizer, activations, sync); 0: split the blocks evenly.", unit="GiB")
    rounds: int = opt(0, "Stop after this many rounds (0: run until Ctrl-C).")
    checkpoint_every: int = opt(10, "Publish a checkpoint every N rounds.")
    join_token: str = opt("", "Secret a peer must present to join (empty: anyone may join).", secret=True)
    heartbeat_interval: float = opt(2.0, "Time between a peer's heartbeats.", unit="s")
    heartbeat_timeout: float = opt(10.0, "Time without a heartbeat after which a peer is marked gone.", unit="s")
    heartbeat_rate: float = opt(
        100.0, "Most heartbeats a second the whole swarm sends: with more live peers than this x --heartbeat-interval, each "
        "is told to beat less often, and its --heartbeat-timeout stretches alike (0: never pace).", unit="1/s")
    vocab_size: int = opt(1024, "Size of the byte-level BPE trained on the built-in corpus (tiny preset).")
    min_replicas: int = opt(1, "Online replicas every stage needs before rounds open.")
    linger: bool = opt(False, "After --rounds, keep serving the status page and checkpoints until Ctrl-C.")
    tokenizer: str = opt("", "Saved Hugging Face tokenizer directory to use (e.g. GPT-J's) instead of training a BPE on the data; UL2 tokens are added if missing.")
    sources: tuple[dict[str, Any], ...] = opt(
        (), "TOML only: [[sources]] tables with name, path, format (text or prompt_completion), weight and optional "
        "max_records; none: the built-in text and instruction sources."
    )
    ul2_tokens: int = opt(
        4000, "Train the UL2 mixture of denoisers on the text sources until this many loss tokens are trained, then causal LM "
        "(0: causal from the start). The default suits the demo (about 10 rounds of 16 x 64); GPT-JT trained 2.62B UL2 tokens."
    )
    instruction_share: float = opt(0.45, "Share of the causal phase's samples drawn from prompt_completion sources (0..1); text sources get the rest.")
    ul2_shares: str = opt("0.25,0.25,0.5", "Shares of UL2's R (regular), X (extreme) and S (prefix LM) denoiser families, as R,X,S.")
    pack_instructions: bool = opt(False, "Pack several instruction records into one causal row (no padding, but no bidirectional prompt).")
    heldout_share: float = opt(
        0.02, "Share of every source's documents and records held out of training for evaluation, chosen by a hash of "
        "their content (0: none). The mixer never hands them out.")
    eval_on: Literal["coordinator", "peer", "off"] = opt(
        "coordinator", "Who evaluates every published checkpoint (held-out perplexity, multiple-choice accuracy), off the round "
        "path: coordinator (a child process of it), peer (volunteers that run `peer join --role eval`: GPT-J-6B on their GPU) "
        "or off (run `coordinator eval` yourself).")
    eval_device: str = opt("cpu", "Device the automatic evaluation runs on: cpu, cuda or cuda:N.")
    eval_engine: Literal["builtin", "harness"] = opt(
        "builtin", "What scores the multiple-choice questions: builtin, or harness (lm-evaluation-harness, the eval extra).")
    eval_tasks: tuple[str, ...] = opt(
        (), "Multiple-choice tasks of yours, as NAME=PATH of JSONL files with prompt, choices and answer (an index) per line; "
        "the built-in instruction probe runs always.")
    eval_shots: int = opt(2, "Demonstrations before each multiple-choice question.")
    eval_probe_items: int = opt(100, "Questions per task of the built-in probe.")
    eval_max_tokens: int = opt(20_000, "Held-out tokens scored per source for perplexity.")
    stall_limit: int = opt(
        0, "Stop the run, with exit status 3, after a round trained nothing this many times in a row (every microbatch "
        "failed or none finished in time); 0: keep retrying, backing off up to a minute between attempts."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_literal("--model", self.model, CoordinatorConfig, "model")
        for flag, port in (("--port", self.port), ("--http-port", self.http_port), ("--dht-port", self.dht_port)):
            check_port(flag, port)
        if self.init_from and not (Path(self.init_from) / "config.json").is_file():
            raise ConfigError(f"--init-from {self.init_from}: no config.json there; point it at a Hugging Face GPT-J checkpoint directory")
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"--tokenizer {self.tokenizer}: no such directory; point it at a saved Hugging Face tokenizer")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both (PEM files) to serve TLS, or neither for plaintext")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path and not Path(path).is_file():
                raise ConfigError(f"{flag} {path}: no such file; give a PEM file")
        if self.lora_rank and self.eval_on == "peer":
            raise ConfigError("--eval-on peer: evaluating volunteers load plain models, and a LoRA run publishes adapters; use "
                              "--eval-on coordinator (--eval-device cuda), or off and `coordinator export --merge` then `coordinator eval`")
        if self.lora_rank and not self.init_from:
            raise ConfigError("--lora-rank trains adapters on a frozen base: pass --init-from DIR, the Hugging Face GPT-J checkpoint to adapt")
        if self.stall_limit < 0:
            raise ConfigError(f"--stall-limit must be >= 0 (0: never give up), got {self.stall_limit}")
        if self.stages < (0 if self.stage_memory_gb > 0 else 1):
            raise ConfigError(f"--stages must be >= 1 (0 only with --stage-memory-gb), got {self.stages}")
        if self.stage_memory_gb < 0:
            raise ConfigError(f"--stage-memory-gb must be >= 0 (0: split the blocks evenly), got {self.stage_memory_gb}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.ul2_tokens < 0:
            raise ConfigError(f"--ul2-tokens must be >= 0 (0: no UL2 phase), got {self.ul2_tokens}")
        if not 0 <= self.instruction_share <= 1:
            raise ConfigError(f"--instruction-share must be in [0, 1], got {self.instruction_share}")
        if not 0 <= self.heldout_share < 1:
            raise ConfigError(f"--heldout-share must be in [0, 1), got {self.heldout_share}")
        check_literal("--eval-on", self.eval_on, CoordinatorConfig, "eval_on")
        check_literal("--eval-engine", self.eval_engine, CoordinatorConfig, "eval_engine")
        for flag, value, low in (("--eval-shots", self.eval_shots, 0), ("--eval-probe-items", self.eval_probe_items, 0),
                                 ("--eval-max-tokens", self.eval_max_tokens, 2)):
            if value < low:
                raise ConfigError(f"{flag} must be >= {low}, got {value}")
        for spec in self.eval_tasks:
            parse_eval_task(spec)
        self.ul2_share_values  # validates --ul2-shares
        self.sources = tuple(dict(table) for table in self.sources)
        names = [SourceConfig.from_table(i, table).name for i, table in enumerate(self.sources, 1)]
        if len(set(names)) != len(names):
            raise ConfigError(f"[[sources]] names must be unique, got {names}")

    @property
    def ul2_share_values(self) -> tuple[float, float, float]:
        """``--ul2-shares`` as (R, X, S) floats."""
        parts = [p.strip() for p in str(self.ul2_shares).split(",")]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            values = ()
        if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
            raise ConfigError(f"--ul2-shares must be three numbers >= 0 with a positive sum, as R,X,S (e.g. 0.25,0.25,0.5), got {self.ul2_shares!r}")
        return values  # type: ignore[return-value]

    def train_config(self) -> TrainConfig:
        """What peers train with: this run's settings, the decay's horizon resolved (``--rounds`` when not given)."""
        train = TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})
        return dataclasses.replace(train, lr_decay_rounds=self.lr_decay_rounds or self.rounds)

    @property
    def public_host(self) -> str:
        """The host this coordinator names in checkpoint URLs (peers elsewhere replace a loopback one)."""
        if self.announce_host:
            return self.announce_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


TEXT = "text"
PROMPT_COMPLETION = "prompt_completion"
FORMATS = (TEXT, PROMPT_COMPLETION)
BUILTIN_TEXT = "builtin:text"
BUILTIN_INSTRUCTIONS = "builtin:instructions"
SOURCE_KEYS = {"name": str, "path": str, "format": str, "weight": (int, float), "max_records": int}


@dataclass(frozen=True)
class SourceConfig:
    """One data source, a ``[[sources]]`` table of the TOML file; every rule about its values is here.

    ``path``: a ``.txt`` file (one document: the whole file), a ``.jsonl`` file (one JSON
    object per line: ``{"text": ...}`` for text, ``{"prompt": ..., "completion": ...}`` for
    prompt_completion), a folder of such files (recursively, in sorted path order, hidden
    files skipped), ``"builtin:text"``, ``"builtin:instructions"``, or ``""`` for the built-in
    of the format. ``max_records``: keep only the first N documents/records (0: all; the
    built-in instruction generator makes 10,000 then).
    """

    name: str
    path: str = ""
    format: str = TEXT
    weight: float = 1.0
    max_records: int = 0

    def __post_init__(self) -> None:
        if not self.name or not self.name.isprintable():
            raise ConfigError(f"source name {self.name!r} must be a non-empty printable string")
        if self.format not in FORMATS:
            raise ConfigError(f"source {self.name!r}: format must be one of {FORMATS}, got format {self.format!r}")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ConfigError(f"source {self.name!r}: weight must be a finite number >= 0, got weight {self.weight}")
        if not isinstance(self.max_records, int) or self.max_records < 0:
            raise ConfigError(f"source {self.name!r}: max_records must be an integer >= 0 (0: all), got {self.max_records!r}")
        if self.path.startswith("builtin:"):
            expected = {BUILTIN_TEXT: TEXT, BUILTIN_INSTRUCTIONS: PROMPT_COMPLETION}.get(self.path)
            if expected is None:
                raise ConfigError(f"source {self.name!r}: unknown built-in {self.path!r}; use {BUILTIN_TEXT!r} or {BUILTIN_INSTRUCTIONS!r}")
            if expected != self.format:
                raise ConfigError(f"source {self.name!r}: {self.path} has format {expected!r}, not {self.format!r}")

    @property
    def location(self) -> str:
        """``path``, with ``""`` resolved to the built-in of the format."""
        if self.path:
            return self.path
        return BUILTIN_TEXT if self.format == TEXT else BUILTIN_INSTRUCTIONS

    @classmethod
    def from_table(cls, number: int, table: Any) -> SourceConfig:
        """The ``number``-th ``[[sources]]`` table: its keys and their types checked here, its values by ``SourceConfig``."""
        where = f"[[sources]] table {number}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table with name, path, format, weight; got {table!r}")
        unknown = sorted(set(table) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(SOURCE_KEYS)}")
        for key, kind in SOURCE_KEYS.items():
            if key in table and (not isinstance(table[key], kind) or isinstance(table[key], bool)):
                raise ConfigError(f"{where}: {key} = {table[key]!r} has the wrong type")
        if not table.get("name"):
            raise ConfigError(f"{where}: needs a name")
        try:
            return cls(**table)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


@dataclass(kw_only=True)
class PeerConfig(ConsoleConfig):
    """`peer join` settings."""

    sections: ClassVar[dict[str, tuple[str, ...]]] = {
        "run": ("coordinator", "name", "join_token", "role", "stage", "state_dir", "connect_timeout", "serve_after_run"),
        "device": ("gpu", "threads"),
        "compression": ("activation_cache_mb", "activation_disk_mb", "cache_dir"),
        "network": ("initial_peers", "host", "announce_host", "p2p_port", "reachability", "inflight"),
        "observability": ("metrics_port", "quiet", "log_format"),
        "security": ("tls", "tls_ca", "coordinator_key"),
    }

    coordinator: str = opt("127.0.0.1:50051", "HOST:PORT of the coordinator's gRPC control plane.")
    tls: bool = opt(False, "Speak TLS to the coordinator, checking its certificate against the system's roots (or --tls-ca).")
    tls_ca: str = opt("", "PEM file of the certificate authority (or the self-signed certificate) the coordinator's must chain to; implies --tls.")
    coordinator_key: str = opt(
        "", "Fingerprint of the key the coordinator signs checkpoints and member sets with, as its log and status page show it: "
        "refuse a coordinator with another (default: trust the first key seen and, with --state-dir, remember it).")
    gpu: str = opt("auto", "CUDA device index to train on, or 'cpu' (auto: GPU 0 if there is one, else cpu).")
    name: str = opt("", "Public name shown on the status page.")
    join_token: str = opt("", "Token the organiser gave you, if the run requires one.", secret=True)
    initial_peers: tuple[str, ...] = opt((), "DHT multiaddrs to bootstrap from (default: those the coordinator gives).")
    host: str = opt("0.0.0.0", "Address this peer's P2P node listens on.")
    announce_host: str = opt("", "Public address other peers reach this peer at (behind NAT: leave empty).")
    p2p_port: int = opt(0, "TCP port of this peer's P2P node (0: any free port).")
    inflight: int = opt(0, "Stage 0: microbatches to keep in flight (0: enough to cover the pipeline's measured round trip, at most the run's --max-inflight).")
    reachability: Literal["auto", "direct", "relayed"] = opt(
        "auto", "How other peers reach this one: auto (the coordinator dials back to find out), direct (they dial its P2P "
        "port), relayed (behind NAT: through the coordinator's circuit relay).")
    role: Literal["train", "eval"] = opt(
        "train", "train: hold a pipeline stage and train; eval: evaluate the run's published checkpoints on this machine "
        "instead (the organiser runs coordinator serve --eval-on peer).")
    stage: int = opt(-1, "Ask for this pipeline stage (-1: let the coordinator choose).")
    connect_timeout: float = opt(300.0, "How long to keep retrying an unreachable coordinator (or a checkpoint download) before giving up.", unit="s")
    metrics_port: int = opt(0, "Serve Prometheus /metrics on this port (0: off).")
    threads: int = opt(0, "CPU threads for torch (0: torch's default).")
    activation_cache_mb: int = opt(1024, "AQ-SGD: memory for cached activations of all neighbours together before they spill to disk.", unit="MiB")
    activation_disk_mb: int = opt(8192, "AQ-SGD: disk for spilled activations of all neighbours together; beyond it the oldest are "
                                  "dropped (their samples then travel whole once more).", unit="MiB")
    cache_dir: str = opt("", "AQ-SGD: directory for spilled activations (default: DIR/activation-cache under --state-dir, else a temporary directory).")
    state_dir: str = opt("", "Directory this peer keeps between runs: its P2P identity (a stable peer id) and its caches (default: none).")
    serve_after_run: bool = opt(False, "When the run ends, keep serving forward-only (inference) requests until Ctrl-C.")

    def __post_init__(self) -> None:
        check_literal("--log-format", self.log_format, PeerConfig, "log_format")
        check_literal("--reachability", self.reachability, PeerConfig, "reachability")
        check_literal("--role", self.role, PeerConfig, "role")
        if self.inflight < 0:
            raise ConfigError(f"--inflight must be 0 (size it from measurements) or a positive count of microbatches; got {self.inflight}")
        for flag, megabytes in (("--activation-cache-mb", self.activation_cache_mb), ("--activation-disk-mb", self.activation_disk_mb)):
            if megabytes < 0:
                raise ConfigError(f"{flag} must be >= 0 MiB, got {megabytes}")
        split_host_port("--coordinator", self.coordinator)
        for flag, port in (("--p2p-port", self.p2p_port), ("--metrics-port", self.metrics_port)):
            check_port(flag, port)
        if self.tls_ca and not Path(self.tls_ca).is_file():
            raise ConfigError(f"--tls-ca {self.tls_ca}: no such file; give the PEM certificate the organiser published")
        if self.coordinator_key and not all(c in "0123456789abcdef" for c in self.coordinator_key.lower()):
            raise ConfigError(f"--coordinator-key {self.coordinator_key!r} is not a hex fingerprint: copy it from the coordinator's "
                              "log or status page")

    @property
    def coordinator_host(self) -> str:
        """The host part of --coordinator: where this peer reached the coordinator."""
        return split_host_port("--coordinator", self.coordinator)[0]


@dataclass(kw_only=True)
class EvalOptions:
    """How ``coordinator eval`` evaluates a checkpoint: its flags (``proto.run_config.add_arguments``)."""

    heldout: str = opt("", "The run's held-out split (default: STATE_DIR/heldout, beside the checkpoints folder).")
    tasks: tuple[str, ...] = opt((), "Multiple-choice tasks of yours, NAME=PATH of JSONL files of {\"prompt\", \"choices\": [...], "
                                     "\"answer\": index} lines.")
    shots: int = opt(2, "Demonstrations before each question.")
    probe_items: int = opt(100, "Questions per task of the built-in probe.")
    context: int = opt(0, "Tokens per perplexity window, and the longest question context (0: the model's n_positions).")
    stride: int = opt(0, "Tokens a perplexity window moves, below the context (0: half the context).")
    max_tokens: int = opt(20_000, "Held-out tokens scored per source.")
    device: str = opt("auto", "cpu, cuda or cuda:N (auto: a GPU if there is one).")
    base: str = opt("", "LoRA checkpoints: the base model directory, if not where the adapter config says.")
    seed: int = opt(0, "Seed of the probe's questions and of the demonstrations drawn.")
    engine: Literal["builtin", "harness"] = opt(
        "builtin", "What scores the multiple-choice questions: builtin (lm-evaluation-harness's definitions, no more "
        "dependencies) or harness (lm-evaluation-harness itself, on the same questions as local tasks; the eval extra).")

    def __post_init__(self) -> None:
        check_literal("--engine", self.engine, EvalOptions, "engine")
        for flag, value, low in (("--shots", self.shots, 0), ("--probe-items", self.probe_items, 0), ("--context", self.context, 0),
                                 ("--stride", self.stride, 0), ("--max-tokens", self.max_tokens, 2)):
            if value < low:
                raise ConfigError(f"{flag} must be >= {low}, got {value}")
        if self.stride and self.context and self.stride >= self.context:
            raise ConfigError(f"--stride {self.stride} must be below --context {self.context}: a window predicts at most "
                              "context - 1 tokens, after at least one of context")
        for spec in self.tasks:
            parse_eval_task(spec)

    def heldout_dir(self, checkpoint: Path) -> Path:
        return Path(self.heldout) if self.heldout else checkpoint.resolve().parent.parent / "heldout"

    def flags(self) -> list[str]:
        """These options as ``coordinator eval`` flags."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value in ("", ()):
                continue
            out += ["--" + f.name.replace("_", "-"), *(value if isinstance(value, tuple) else [str(value)])]
        return out


C = TypeVar("C")
ENV_PREFIX = "HOMETRAIN_"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")


def _base_type(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` field, else None."""
    tp = _base_type(typing.get_type_hints(cls)[name])
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_literal(flag: str, value: Any, cls: type, name: str) -> None:
    choices = _choices(cls, name)
    if choices is not None and value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _is_str_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple and typing.get_args(tp) == (str, ...)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _RefuseSecretOnCommandLine(argparse.Action):
    """``--join-token X`` would show the secret to every user of the machine in ``ps``."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = self.dest
        parser.error(f"{option_string} on the command line is visible to every user of this machine (ps): put it in a file "
                     f"and pass {_flag(name)}-file FILE, or set {ENV_PREFIX}{name.upper()}")


def section_of(cls: type) -> dict[str, str]:
    """Field name -> its section, for a config class with ``sections`` (every field in exactly one)."""
    sections = getattr(cls, "sections", None) or {"settings": tuple(f.name for f in dataclasses.fields(cls))}
    return {name: section for section, names in sections.items() for name in names}


def _default_text(f: dataclasses.Field) -> str:
    """``(default: 120 s)``, or nothing when the help already says what the default means."""
    text = f.metadata.get("help", "")
    if "default:" in text or "(default" in text:
        return ""
    value = f.default
    shown = "none" if value in ("", ()) else ("on" if value is True else "off" if value is False else f"{value:g}" if isinstance(value, float) else str(value))
    unit = f.metadata.get("unit", "")
    return f" (default: {shown}{' ' + unit if unit and shown != 'none' else ''})"


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one --flag per field of dataclass ``cls`` that a command line can carry (bool, int, float,
    str, a Literal of choices, a list of str), in one argument group per section; unset flags are
    absent from the namespace. A secret field gets ``--<name>-file`` instead. Other fields (such as
    ``CoordinatorConfig.sources``, a list of tables) have no flag: they come from the TOML file only."""
    hints = typing.get_type_hints(cls)
    sections = section_of(cls)
    order = [name for name in SECTION_HELP if name in sections.values()] + sorted(set(sections.values()) - set(SECTION_HELP))
    groups = {name: parser.add_argument_group(name, SECTION_HELP.get(name)) for name in order}
    for f in sorted(dataclasses.fields(cls), key=lambda f: order.index(sections[f.name])):
        group = groups[sections[f.name]]
        tp = _base_type(hints[f.name])
        flag = _flag(f.name)
        if f.metadata.get("secret"):
            group.add_argument(f"{flag}-file", dest=f"{f.name}_file", default=argparse.SUPPRESS, metavar="FILE",
                               help=f"{f.metadata.get('help', '')} Read from FILE (or set {ENV_PREFIX}{f.name.upper()}).")
            group.add_argument(flag, dest=f.name, action=_RefuseSecretOnCommandLine, help=argparse.SUPPRESS)
            continue
        help_text = f.metadata.get("help", "") + _default_text(f)
        choices = _choices(cls, f.name)
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif choices is not None:
            group.add_argument(flag, dest=f.name, choices=choices, type=type(choices[0]), default=argparse.SUPPRESS, help=help_text)
        elif _is_str_tuple(tp):
            group.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper().rstrip("S"))
        elif tp in (int, float, str):
            unit = f.metadata.get("unit", "")
            group.add_argument(flag, dest=f.name, type=tp, default=argparse.SUPPRESS, help=help_text,
                               metavar=unit.upper() if unit in ("s", "MiB") else f.name.upper())


def _coerce(where: str, key: str, value: Any, tp: Any, choices: tuple[Any, ...] | None) -> Any:
    """A TOML value as the field's type, or ConfigError saying what was expected."""
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r} should be {expected}")

    if choices is not None:
        if value not in choices:
            raise wrong("one of " + ", ".join(repr(c) for c in choices))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("a whole number")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise wrong("a string (in quotes)")
    elif _is_str_tuple(tp):
        if isinstance(value, str):  # a space-separated string, as older files wrote it
            return tuple(value.split())
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return tuple(value)
    elif typing.get_origin(tp) is tuple:
        if not isinstance(value, list):
            raise wrong("a list of tables ([[...]])")
        return tuple(value)
    return value


def _settings(data: dict[str, Any], sections: set[str]):
    """(key, value, section table or "") for every setting of a TOML file: flat keys and ``[section]`` tables."""
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            for inner, inner_value in value.items():
                yield inner, inner_value, key
        else:
            yield key, value, ""


def _read_secret(flag: str, path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None


def load(cls: type[C], args: argparse.Namespace, config_path: str | None = None, environ: Mapping[str, str] | None = None) -> C:
    """Defaults, overridden by the TOML file (if any), overridden by flags given on the command line.

    Secret fields come from their ``--<name>-file`` flag, else ``HOMETRAIN_<NAME>``, else the TOML file."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {config_path}: no such file")
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config {config_path} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"--config {config_path}: cannot read it ({exc.strerror or exc})") from None
        sections = section_of(cls)
        for key, value, table in _settings(data, set(sections.values())):
            name = key.replace("-", "_")
            where = f"[{table}] of {config_path}" if table else config_path
            if name not in fields or (table and sections[name] != table):
                known = sorted(n for n in fields if not table or sections[n] == table)
                raise ConfigError(f"{where}: unknown setting {key!r}; known: {', '.join(known)}")
            if name in values:
                raise ConfigError(f"{config_path}: {key!r} is set twice (flat and in [{sections[name]}]); keep one")
            values[name] = _coerce(config_path, key, value, _base_type(hints[name]), _choices(cls, name))
    values.update({k: v for k, v in vars(args).items() if k in fields and not fields[k].metadata.get("secret")})
    for name, f in fields.items():
        if not f.metadata.get("secret"):
            continue
        given = getattr(args, f"{name}_file", None)
        env = environ.get(f"{ENV_PREFIX}{name.upper()}")
        if given:
            values[name] = _read_secret(f"{_flag(name)}-file", given)
        elif env:
            values[name] = env.strip()
    if isinstance(values.get("initial_peers"), list):
        values["initial_peers"] = tuple(values["initial_peers"])
    return cls(**values)
