"""A coordinator and peers as separate processes on this machine (the demo, tests and benchmarks).

The processes are the real `coordinator serve` and `peer join` commands on loopback; this
module only starts them, watches the status API and stops them with Ctrl-C (SIGINT) so each
leaves as a user's would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from proto.lifecycle import ask_for_death_signal

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSwarm:
    """``coordinator serve`` plus ``peer join --gpu cpu`` processes; output to log files or the console."""

    def __init__(self, state_dir: Path, *coordinator_args: str, http_port: int = 0, port: int = 0, log_dir: Path | None = None, startup_timeout: float = 120) -> None:
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.log_dir = log_dir
        self.peers: list[subprocess.Popen] = []
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        self._coordinator_cmd = [sys.executable, "-m", "coordinator", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                                 "--http-port", str(self.http_port), "--state-dir", str(self.state_dir), *coordinator_args]
        self.startup_timeout = startup_timeout
        self.start_coordinator()

    def start_coordinator(self) -> None:
        """(Re)start the coordinator on the same ports and state directory, and wait for its status page."""
        self.coordinator = self._spawn(self._coordinator_cmd, "coordinator")
        self.wait_for(lambda: self.status() is not None, self.startup_timeout, "the coordinator's status page")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    def _spawn(self, cmd: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        # Each process leads its own group: the DHT helpers hivemind forks go down with it in kill().
        # And each dies with this process, so a demo or benchmark killed outright leaves no swarm behind.
        env = {**ENV, **(env or {})}
        if self.log_dir is None:
            return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=ask_for_death_signal)
        log = open(self.log_dir / f"{name}.log", "ab")
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=ask_for_death_signal)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL a process and everything it started, as when its machine loses power."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def add_peer(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``peer join`` (named peer-N) with extra flags ``args`` and environment ``env``."""
        name = f"peer-{len(self.peers)}"
        cmd = [sys.executable, "-m", "peer", "join", "--coordinator", f"127.0.0.1:{self.port}", "--gpu", "cpu",
               "--threads", "1", "--host", "127.0.0.1", "--name", name, *args]
        proc = self._spawn(cmd, name, env)
        self.peers.append(proc)
        return proc

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return response.read().decode()

    def get(self, path: str) -> Any:
        return json.loads(self.get_text(path))

    def status(self) -> dict | None:
        try:
            return self.get("/api/status")
        except OSError:
            return None

    def rounds(self) -> list[dict]:
        return self.get("/api/rounds")

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``condition`` until it is truthy; raise TimeoutError (with the logs' tails) otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None and self.coordinator.returncode != 0:
                raise RuntimeError(f"the coordinator exited with {self.coordinator.returncode} while waiting for {what}\n{self.log_tail()}")
            value = condition()
            if value:
                return value
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_dir is None:
            return ""
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def wait(self, peer_timeout: float = 15) -> int:
        """Wait for the coordinator to exit (after --rounds), then for the peers; returns its exit code."""
        code = self.coordinator.wait()
        for peer in self.peers:
            try:
                peer.wait(timeout=peer_timeout)
            except subprocess.TimeoutExpired:
                peer.send_signal(signal.SIGINT)
        return code

    def stop(self) -> None:
        """Ctrl-C every process, peers first; kill what has not exited after 15 s."""
        procs = [*self.peers, self.coordinator]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            self.kill(proc)  # and whatever it forked that did not exit with it
