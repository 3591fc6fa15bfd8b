"""`coordinator demo`: a whole swarm on this machine, as separate processes on loopback.

Starts `coordinator serve` with a tiny GPT-J split into stages and N `peer join --gpu cpu`
processes, prints the status page URL, and trains until Ctrl-C or --rounds.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from proto.run_config import ConfigError, ConsoleConfig, opt

from .local_swarm import LocalSwarm

EXIT_STALLED = 3  # coordinator serve's exit status when --stall-limit stopped the run

DEMO_STALL_LIMIT = 4
"""A demo whose rounds train nothing this many times in a row stops with an error (1 + 2 + 4 s of backoff)."""


@dataclass(kw_only=True)
class DemoConfig(ConsoleConfig):
    """`coordinator demo` settings."""

    sections: ClassVar[dict[str, tuple[str, ...]]] = {
        "run": ("peers", "stages", "rounds", "state_dir", "checkpoint_every", "seed"),
        "network": ("http_port", "port"),
        "observability": ("quiet", "log_format"),
    }

    peers: int = opt(3, "Peers to start (CPU, one torch thread each).")
    stages: int = opt(2, "Pipeline stages of the tiny GPT-J.")
    rounds: int = opt(0, "Stop after this many rounds (0: until Ctrl-C).")
    state_dir: str = opt("", "Run directory (default: a new temporary directory).")
    http_port: int = opt(8080, "Status page port (0: any free port).")
    port: int = opt(0, "gRPC port of the coordinator (0: any free port).")
    checkpoint_every: int = opt(10, "Publish a checkpoint every N rounds.")
    seed: int = opt(0, "Seed of weights and data.")

    def __post_init__(self) -> None:
        if self.peers < self.stages:
            raise ConfigError(f"--peers {self.peers} cannot fill --stages {self.stages}: every stage needs a peer")


def run_demo(config: DemoConfig) -> int:
    state_dir = Path(config.state_dir or tempfile.mkdtemp(prefix="hometrain-demo-"))
    console = ["--log-format", config.log_format] + (["--quiet"] if config.quiet else [])
    args = ["--model", "tiny", "--stages", str(config.stages), "--rounds", str(config.rounds), "--stall-limit", str(DEMO_STALL_LIMIT),
            "--checkpoint-every", str(config.checkpoint_every), "--seed", str(config.seed), *console]
    swarm = None
    try:
        swarm = LocalSwarm(state_dir, *args, http_port=config.http_port, port=config.port)
        for _ in range(config.peers):
            swarm.add_peer(*console)
        print(f"\nhometrain demo: status page {swarm.url}  (run dir {state_dir}; Ctrl-C stops)\n", flush=True)
        code = swarm.wait()
        if code == EXIT_STALLED:
            print(f"coordinator demo: training stalled: its rounds trained nothing {DEMO_STALL_LIMIT} times in a row; "
                  "the errors above say where (stage, peer) and why", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("\nstopping the demo swarm...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"coordinator demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if swarm is not None:
            swarm.stop()
