"""Measurements between lab hosts (RTT, throughput, dialing), built on the probes module."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from .commands import NetlabError
from .lab import REPO_ROOT, Host, Lab, LinkCounters

_PROBES = [sys.executable, "-m", "bench.netlab.probes"]


@dataclass(frozen=True)
class RttResult:
    median_ms: float
    min_ms: float
    max_ms: float
    samples: int


@dataclass(frozen=True)
class ThroughputResult:
    """Application bytes seen by the receiver vs. kernel counters at both host links."""

    mbit: float             # receiver: bytes*8 / (first byte .. EOF)
    steady_mbit: float      # receiver: over the second half only (after slow start)
    app_bytes: int
    seconds: float
    sender_counters: LinkCounters    # delta over the transfer
    receiver_counters: LinkCounters  # delta over the transfer
    delay_cpu_s: float               # delay router CPU seconds spent during the transfer

    @property
    def kernel_over_app(self) -> float:
        """Sender's kernel up-bytes per application byte (headers + Ethernet framing)."""
        return self.sender_counters.up_bytes / max(1, self.app_bytes)


@dataclass(frozen=True)
class DialResult:
    ok: bool
    error: str | None
    seconds: float


def _probe(host: Host, *args: object, stdout: int = subprocess.PIPE) -> subprocess.Popen:
    return host.popen([*_PROBES, *map(str, args)], env=host.lab.python_env(), cwd=REPO_ROOT,
                      stdout=stdout, stderr=subprocess.PIPE, text=True)


def _json_line(proc: subprocess.Popen, what: str, timeout: float) -> dict:
    import select
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise NetlabError(f"{what}: probe gave no result within {timeout:g} s (exit {proc.poll()}); "
                          f"stderr: {err.strip()[-1500:] or '(empty)'}")
    return json.loads(line)


def start_server(host: Host, kind: str, port: int) -> subprocess.Popen:
    """Start ``echo-server`` or ``sink`` on ``host`` and wait until it listens."""
    proc = _probe(host, kind, "--port", port)
    _json_line(proc, f"start {kind} on {host.name}", timeout=15)
    return proc


def measure_rtt(client: Host, server: Host, *, port: int = 7001, count: int = 10,
                interval_s: float = 0.02) -> RttResult:
    """Median/min/max of ``count`` TCP round trips of 1 byte from ``client`` to ``server``."""
    srv = start_server(server, "echo-server", port)
    try:
        timeout = 15 + count * (interval_s + 1.0)
        res = _json_line(_probe(client, "rtt", "--host", server.ip, "--port", port, "--count", count,
                                "--interval", interval_s), f"RTT {client.name}->{server.name}", timeout)
    finally:
        srv.kill()
        srv.wait()
    return RttResult(res["median_ms"], res["min_ms"], res["max_ms"], count)


def measure_ping(client: Host, server: Host, *, count: int = 10, interval_s: float = 0.02) -> RttResult:
    """Median/min/max ICMP echo RTT from ``client`` to ``server`` (answered by the server's kernel)."""
    timeout = 15 + count * (interval_s + 1.0)
    res = _json_line(_probe(client, "ping", "--host", server.ip, "--count", count, "--interval", interval_s),
                     f"ping {client.name}->{server.name}", timeout)
    return RttResult(res["median_ms"], res["min_ms"], res["max_ms"], count)


def measure_throughput(lab: Lab, sender: Host, receiver: Host, *, seconds: float = 3.0,
                       port: int = 7002) -> ThroughputResult:
    """Bulk TCP from ``sender`` to ``receiver`` for ``seconds``; rate seen by the receiver."""
    sink = start_server(receiver, "sink", port)
    before_s, before_r = lab.counters(sender), lab.counters(receiver)
    cpu0 = lab.delay_stats().cpu_s
    src = _probe(sender, "source", "--host", receiver.ip, "--port", port, "--seconds", seconds)
    try:
        res = _json_line(sink, f"throughput {sender.name}->{receiver.name}", timeout=seconds + 60)
        _json_line(src, f"sender {sender.name}", timeout=30)
    finally:
        for p in (src, sink):
            if p.poll() is None:
                p.kill()
            p.wait()
    cpu1 = lab.delay_stats().cpu_s
    return ThroughputResult(res["mbit"], res["steady_mbit"], res["bytes"], res["seconds"],
                            lab.counters(sender) - before_s, lab.counters(receiver) - before_r, cpu1 - cpu0)


def try_dial(client: Host, address: str, *, port: int, timeout_s: float = 1.0) -> DialResult:
    """Whether ``client`` can open a TCP connection to ``address:port``."""
    res = _json_line(_probe(client, "dial", "--host", address, "--port", port, "--timeout", timeout_s),
                     f"dial {address}:{port} from {client.name}", timeout=timeout_s + 15)
    return DialResult(res["ok"], None if res["ok"] else f"{res['error']}: {res['detail']}", res["seconds"])
