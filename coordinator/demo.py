"""`coordinator demo`: a whole swarm on this machine, as separate processes on loopback.

Starts `coordinator serve` with a tiny GPT-J split into stages and N `peer join --gpu cpu`
processes, prints the status page URL, and trains until Ctrl-C or --rounds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

from proto.run_config import ConfigError, opt


@dataclass(kw_only=True)
class DemoConfig:
    """`coordinator demo` settings."""

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, coordinator: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if coordinator.poll() is not None:
            raise RuntimeError(f"the coordinator exited with code {coordinator.returncode} during start-up; see its log above")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the coordinator did not answer at {url} within {timeout:.0f}s")


def run_demo(config: DemoConfig) -> int:
    state_dir = config.state_dir or tempfile.mkdtemp(prefix="hometrain-demo-")
    port = config.port or free_port()
    http_port = config.http_port if config.http_port else free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    coordinator_cmd = [
        sys.executable, "-m", "coordinator", "serve", "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port),
        "--state-dir", state_dir, "--model", "tiny", "--stages", str(config.stages), "--rounds", str(config.rounds),
        "--checkpoint-every", str(config.checkpoint_every), "--seed", str(config.seed),
    ]
    coordinator = subprocess.Popen(coordinator_cmd, env=env)
    peers: list[subprocess.Popen] = []
    try:
        _wait_http(f"http://127.0.0.1:{http_port}/api/status", 120, coordinator)
        for i in range(config.peers):
            peers.append(subprocess.Popen(
                [sys.executable, "-m", "peer", "join", "--coordinator", f"127.0.0.1:{port}", "--gpu", "cpu", "--threads", "1",
                 "--host", "127.0.0.1", "--name", f"demo-{i}"], env=env,
            ))
        print(f"\nhometrain demo: status page http://127.0.0.1:{http_port}/  (run dir {state_dir}; Ctrl-C stops)\n", flush=True)
        code = coordinator.wait()
        for peer in peers:
            try:
                peer.wait(timeout=15)
            except subprocess.TimeoutExpired:
                peer.send_signal(signal.SIGINT)
        return code
    except KeyboardInterrupt:
        print("\nstopping the demo swarm...", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"coordinator demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in [*peers, coordinator]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in [*peers, coordinator]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
