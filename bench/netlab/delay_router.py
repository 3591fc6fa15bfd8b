"""User-space delaying router: adds latency and jitter to every packet between hosts.

``netem`` is not available, so the router namespace sends every packet that
arrives from a host link into a TUN device (policy routing, see lab.py). This
process reads each IPv4 packet from the TUN, holds it for
``one_way(src link) + one_way(dst link)`` (+ jitter, see JitterCurve), and writes it back into
the TUN; the kernel then routes it out of the destination's link, where ``tc``
shapes it. Release times are monotone per (src, dst) address pair, so jitter
never reorders a flow.

CPU: one read + one write syscall per packet. The lab raises every MTU to
~64 KB, so 1 Gbit/s of TCP is ~2000 packets/s, which Python handles.

Run by the lab as ``ip netns exec <router-ns> python -m bench.netlab.delay_router``.
Control protocol on stdin/stdout, one JSON object per line:
``{"op": "link", "key": "10.0.3", "one_way_ms": 5, "jitter_ms": 1}`` -> ``{"ok": true}``;
``{"op": "stats"}`` -> counters; EOF on stdin (the lab closed or died) -> exit.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import json
import os
import random
import resource
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO

from .commands import NetlabError

TUN_NAME = "dly0"
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_PR_SET_TIMERSLACK = 29
# Release a packet this early rather than sleep again for a few microseconds.
_EARLY_S = 20e-6


class JitterCurve:
    """A link's jitter as a function of time: piecewise linear between random targets.

    Targets are drawn uniformly in [-amplitude/2, +amplitude/2] every
    ``4 * amplitude`` seconds, so the offset changes at most 0.25 s per s. Two
    links together change by at most 0.5 s/s: later packets are never released
    before earlier ones, and, unlike independent per-packet draws clamped to stay
    in order, a dense flow sees the same mean delay as a sparse ping.
    """

    def __init__(self, amplitude_s: float, rng: random.Random) -> None:
        self.amplitude = amplitude_s
        self.period = max(4.0 * amplitude_s, 1e-3)
        self._rng = rng
        self._t0: float | None = None
        self._v0 = self._v1 = 0.0

    def _draw(self) -> float:
        return (self._rng.random() - 0.5) * self.amplitude

    def at(self, now: float) -> float:
        if self._t0 is None or now - self._t0 > 8 * self.period:  # first use, or idle for long
            self._t0, self._v0, self._v1 = now, self._draw(), self._draw()
        while now >= self._t0 + self.period:
            self._t0 += self.period
            self._v0, self._v1 = self._v1, self._draw()
        return self._v0 + (self._v1 - self._v0) * (now - self._t0) / self.period


@dataclass
class LinkDelay:
    """Delay one host link adds, in seconds: fixed part plus an optional jitter curve."""

    one_way_s: float
    jitter: JitterCurve | None = None

    def at(self, now: float) -> float:
        return self.one_way_s + self.jitter.at(now) if self.jitter else self.one_way_s


@dataclass
class DelayScheduler:
    """Computes each packet's release time; pure logic, unit-testable without a TUN.

    Links are keyed by the first three octets of an address (each host link is a
    /24). Addresses outside every link (e.g. a NATed host's private address)
    add no delay; the kernel then answers with "unreachable".
    """

    seed: int | None = None
    compensation_s: float = 0.0  # taken off each delayed packet: the router's own wake-up latency
    links: dict[bytes, LinkDelay] = field(default_factory=dict)
    last_release: dict[bytes, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def set_link(self, key: str, one_way_ms: float, jitter_ms: float = 0.0) -> None:
        octets = bytes(int(x) for x in key.split("."))
        if len(octets) != 3:
            raise ValueError(f"link key must be the first three octets of a /24, e.g. '10.0.3'; got {key!r}")
        curve = JitterCurve(jitter_ms / 1000.0, self._rng) if jitter_ms > 0 else None
        self.links[octets] = LinkDelay(one_way_ms / 1000.0, curve)

    def release_time(self, packet: bytes, now: float) -> float:
        """When ``packet`` (an IP packet read at ``now``) may leave the router."""
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return now  # not IPv4 (IPv6 is disabled in the lab): pass through undelayed
        links = self.links
        src, dst = links.get(packet[12:15]), links.get(packet[16:19])
        delay = (src.at(now) if src else 0.0) + (dst.at(now) if dst else 0.0)
        if delay > 0.0:
            delay -= self.compensation_s
        release = now + (delay if delay > 0.0 else 0.0)
        pair = packet[12:20]
        previous = self.last_release.get(pair)
        if previous is not None and release < previous:
            release = previous  # safety net: never overtake an earlier packet of the same (src, dst)
        self.last_release[pair] = release
        return release


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    ifr = struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI)
    fcntl.ioctl(fd, _TUNSETIFF, ifr)
    return fd


def _set_timer_slack_ns(ns: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, ns, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def serve(tun_name: str = TUN_NAME, seed: int | None = None, compensation_ms: float = 0.0) -> int:
    """Process main: create the TUN, print "ready", then delay packets until stdin closes."""
    _set_timer_slack_ns(1000)
    tun = _open_tun(tun_name)
    ctl = sys.stdin.fileno()
    os.set_blocking(ctl, False)
    out = sys.stdout
    sched = DelayScheduler(seed=seed, compensation_s=compensation_ms / 1000.0)
    heap: list[tuple[float, int, bytes]] = []
    seq = 0
    stats = {"packets": 0, "bytes": 0, "max_queue_packets": 0, "max_queue_bytes": 0,
             "late_sum_s": 0.0, "late_max_s": 0.0, "write_errors": 0}
    queued_bytes = 0
    ctl_buf = b""
    read, write, mono = os.read, os.write, time.monotonic
    push, pop = heapq.heappush, heapq.heappop
    release_time = sched.release_time
    rfds = [tun, ctl]
    print(json.dumps({"ready": True, "pid": os.getpid()}), file=out, flush=True)

    while True:
        if heap:
            timeout = heap[0][0] - mono() - _EARLY_S
            ready, _, _ = select.select(rfds, [], [], timeout if timeout > 0 else 0)
        else:
            ready, _, _ = select.select(rfds, [], [])
        if tun in ready:
            now = mono()
            for _ in range(1024):
                try:
                    pkt = read(tun, 65536)
                except BlockingIOError:
                    break
                seq += 1
                push(heap, (release_time(pkt, now), seq, pkt))
                queued_bytes += len(pkt)
            if len(heap) > stats["max_queue_packets"]:
                stats["max_queue_packets"] = len(heap)
            if queued_bytes > stats["max_queue_bytes"]:
                stats["max_queue_bytes"] = queued_bytes
        if ctl in ready:
            chunk = os.read(ctl, 65536)
            if not chunk:
                return 0  # the lab closed our stdin (or died): stop
            ctl_buf += chunk
            while b"\n" in ctl_buf:
                line, ctl_buf = ctl_buf.split(b"\n", 1)
                reply = _control(sched, stats, json.loads(line))
                print(json.dumps(reply), file=out, flush=True)
        if heap:
            now = mono()
            while heap and heap[0][0] <= now + _EARLY_S:
                due, _, pkt = pop(heap)
                queued_bytes -= len(pkt)
                try:
                    write(tun, pkt)
                except OSError:
                    stats["write_errors"] += 1
                    continue
                stats["packets"] += 1
                stats["bytes"] += len(pkt)
                late = now - due
                if late > 0:
                    stats["late_sum_s"] += late
                    if late > stats["late_max_s"]:
                        stats["late_max_s"] = late


def _control(sched: DelayScheduler, stats: dict, msg: dict) -> dict:
    op = msg.get("op")
    if op == "link":
        sched.set_link(msg["key"], float(msg["one_way_ms"]), float(msg.get("jitter_ms", 0.0)))
        return {"ok": True}
    if op == "stats":
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"ok": True, **stats, "cpu_user_s": ru.ru_utime, "cpu_system_s": ru.ru_stime}
    return {"ok": False, "error": f"unknown op {op!r}; expected 'link' or 'stats'"}


@dataclass(frozen=True)
class DelayStats:
    """What the delay router has done so far (from the process itself)."""

    packets: int
    bytes: int
    max_queue_packets: int
    max_queue_bytes: int
    mean_late_ms: float
    max_late_ms: float
    write_errors: int
    cpu_s: float

    @classmethod
    def from_reply(cls, r: dict) -> "DelayStats":
        n = max(1, r["packets"])
        return cls(r["packets"], r["bytes"], r["max_queue_packets"], r["max_queue_bytes"],
                   1000 * r["late_sum_s"] / n, 1000 * r["late_max_s"], r["write_errors"],
                   r["cpu_user_s"] + r["cpu_system_s"])


class DelayRouterProcess:
    """The lab's handle on the delay router process running in the router namespace."""

    def __init__(self, argv: list[str], *, cwd: str, env: dict[str, str], stderr: IO[bytes]) -> None:
        self._stderr = stderr
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=stderr, start_new_session=True)
        hello = self._reply(timeout=15.0, what="start the delay router")
        self.pid: int = hello["pid"]

    def _stderr_tail(self) -> str:
        try:
            self._stderr.flush()
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace")[-2000:].strip() or "(empty)"
        except (OSError, ValueError):
            return "(unavailable)"

    def _reply(self, *, timeout: float, what: str) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            rc = self.proc.poll()
            raise NetlabError(
                f"could not {what}: the delay router process "
                f"{'exited with ' + str(rc) if rc is not None else 'did not answer within %.0f s' % timeout}; "
                f"its stderr: {self._stderr_tail()}")
        return json.loads(line)

    def request(self, msg: dict, *, timeout: float = 5.0) -> dict:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise NetlabError(f"the delay router is gone (exit code {self.proc.poll()}); "
                              f"its stderr: {self._stderr_tail()}") from exc
        reply = self._reply(timeout=timeout, what=f"send {msg.get('op')!r} to the delay router")
        if not reply.get("ok"):
            raise NetlabError(f"delay router refused {msg!r}: {reply.get('error')}")
        return reply

    def add_link(self, key: str, one_way_ms: float, jitter_ms: float) -> None:
        self.request({"op": "link", "key": key, "one_way_ms": one_way_ms, "jitter_ms": jitter_ms})

    def stats(self) -> DelayStats:
        return DelayStats.from_reply(self.request({"op": "stats"}))

    def stop(self, timeout: float = 2.0) -> None:
        """Close stdin (the process exits on EOF), then escalate to SIGKILL."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe:
                    pipe.close()
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tun", default=TUN_NAME)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--compensation-ms", type=float, default=0.0,
                        help="subtract from each delayed packet's delay (the router's own latency)")
    parser.add_argument("--nice", type=int, default=0, help="niceness change (negative: higher priority)")
    args = parser.parse_args(argv)
    if args.nice:
        try:
            os.nice(args.nice)
        except OSError:
            pass
    try:
        return serve(args.tun, args.seed, args.compensation_ms)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
