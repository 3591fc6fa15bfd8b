"""Helpers that start real coordinator and peer processes on loopback, as a user would."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Swarm:
    """A coordinator plus peers as subprocesses; logs go to files under the run directory."""

    def __init__(self, state_dir: Path, *coordinator_args: str) -> None:
        self.state_dir = state_dir
        self.port, self.http_port = free_port(), free_port()
        self.peers: list[subprocess.Popen] = []
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "coordinator", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--http-port", str(self.http_port), "--state-dir", str(state_dir), "--model", "tiny", *coordinator_args]
        self.coordinator = self._spawn(cmd, "coordinator")
        self.wait_for(lambda: self.status() is not None, 120, "the coordinator's status page")

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)

    def add_peer(self, *args: str) -> subprocess.Popen:
        name = f"peer-{len(self.peers)}"
        cmd = [sys.executable, "-m", "peer", "join", "--coordinator", f"127.0.0.1:{self.port}", "--gpu", "cpu",
               "--threads", "1", "--host", "127.0.0.1", "--name", name, *args]
        proc = self._spawn(cmd, name)
        self.peers.append(proc)
        return proc

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def status(self) -> dict | None:
        try:
            return self.get("/api/status")
        except OSError:
            return None

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None and self.coordinator.returncode != 0:
                raise AssertionError(f"coordinator exited with {self.coordinator.returncode} while waiting for {what}\n{self.log_tail()}")
            value = condition()
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.log_tail()}")

    def rounds(self) -> list[dict]:
        db = sqlite3.connect(self.state_dir / "coordinator.sqlite")
        try:
            rows = db.execute("SELECT round, loss, tokens, dropped, participants, checksums FROM rounds ORDER BY round").fetchall()
        finally:
            db.close()
        return [{"round": r[0], "loss": r[1], "tokens": r[2], "dropped": r[3], "participants": json.loads(r[4]), "checksums": json.loads(r[5])} for r in rows]

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        procs = [*self.peers, self.coordinator]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
