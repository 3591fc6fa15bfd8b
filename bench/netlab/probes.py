"""Measurement programs run inside host namespaces: ICMP ping and TCP echo for RTT, bulk TCP for throughput, dial.

Each prints one JSON line (servers first print ``{"ready": true}`` once they listen).
Usage: ``python -m bench.netlab.probes ping|echo-server|rtt|sink|source|dial ...``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

_CHUNK = 1 << 20


def _say(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _listener(port: int) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    return srv


def echo_server(port: int) -> None:
    """Echo every byte back on every connection (one thread each) until killed."""
    srv = _listener(port)
    _say({"ready": True, "port": port})

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def rtt(host: str, port: int, count: int, interval: float) -> None:
    """Round trips of 1 byte over one TCP connection (TCP_NODELAY), in ms."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    for i in range(count + 1):
        t0 = time.perf_counter()
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise SystemExit("echo server closed the connection")
        if i:  # the first round trip warms up ARP and the connection
            samples.append((time.perf_counter() - t0) * 1000)
        time.sleep(interval)
    sock.close()
    samples.sort()
    _say({"samples_ms": samples, "median_ms": samples[len(samples) // 2], "min_ms": samples[0],
          "max_ms": samples[-1]})


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(host: str, count: int, interval: float, timeout: float = 5.0) -> None:
    """ICMP echo (raw socket, needs root): the peer's kernel answers, so no server process adds delay."""
    import os
    import select
    import struct

    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    samples = []
    for seq in range(count + 1):
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + b"netlab-ping"), ident, seq) + b"netlab-ping"
        t0 = time.perf_counter()
        sock.sendto(packet, (host, 0))
        deadline = t0 + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                raise SystemExit(f"ping {host}: no reply to seq {seq} within {timeout:g} s")
            data = sock.recv(2048)
            t1 = time.perf_counter()
            icmp = data[(data[0] & 0x0F) * 4:]
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
            if typ == 0 and rid == ident and rseq == seq:
                break
        if seq:  # the first exchange warms up ARP
            samples.append((t1 - t0) * 1000)
        time.sleep(interval)
    samples.sort()
    _say({"samples_ms": samples, "median_ms": samples[len(samples) // 2], "min_ms": samples[0],
          "max_ms": samples[-1]})


def sink(port: int) -> None:
    """Accept one connection, count bytes to EOF; rate over all and over the second half."""
    srv = _listener(port)
    _say({"ready": True, "port": port})
    conn, _ = srv.accept()
    total, first, marks = 0, None, []
    buf = bytearray(_CHUNK)
    while n := conn.recv_into(buf):
        now = time.perf_counter()
        if first is None:
            first = now
        total += n
        marks.append((now, total))
    end = time.perf_counter()
    conn.close()
    if first is None:
        _say({"bytes": 0, "seconds": 0.0, "mbit": 0.0, "steady_mbit": 0.0})
        return
    seconds = max(end - first, 1e-9)
    half = first + seconds / 2
    mid = next(((t, b) for t, b in marks if t >= half), marks[-1])
    steady = (total - mid[1]) * 8 / max(end - mid[0], 1e-9) / 1e6
    _say({"bytes": total, "seconds": seconds, "mbit": total * 8 / seconds / 1e6, "steady_mbit": steady})


def source(host: str, port: int, seconds: float) -> None:
    """Send zeros for ``seconds``, then close; reports bytes handed to the kernel.

    The kernel's autotuned send buffer still drains after ``seconds`` (several
    seconds over a slow uplink); the sink times the transfer to EOF, so rates stay right.
    """
    sock = socket.create_connection((host, port), timeout=10)
    payload = bytes(_CHUNK)
    total, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sock.sendall(payload)
        total += len(payload)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # wait for the sink to close: all bytes were received
    sock.close()
    _say({"bytes": total})


def dial(host: str, port: int, timeout: float) -> None:
    """Try one TCP connect; report whether it worked and, if not, how it failed."""
    t0 = time.perf_counter()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        _say({"ok": True, "seconds": time.perf_counter() - t0})
    except OSError as exc:
        kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        _say({"ok": False, "error": kind, "detail": str(exc), "seconds": time.perf_counter() - t0})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("echo-server", "sink"):
        sub.add_parser(name).add_argument("--port", type=int, required=True)
    pg = sub.add_parser("ping")
    pg.add_argument("--host", required=True)
    pg.add_argument("--count", type=int, default=10)
    pg.add_argument("--interval", type=float, default=0.02)
    for name in ("rtt", "source", "dial"):
        s = sub.add_parser(name)
        s.add_argument("--host", required=True)
        s.add_argument("--port", type=int, required=True)
    sub.choices["rtt"].add_argument("--count", type=int, default=10)
    sub.choices["rtt"].add_argument("--interval", type=float, default=0.02)
    sub.choices["source"].add_argument("--seconds", type=float, default=3.0)
    sub.choices["dial"].add_argument("--timeout", type=float, default=2.0)
    a = p.parse_args(argv)
    if a.cmd == "echo-server":
        echo_server(a.port)
    elif a.cmd == "sink":
        sink(a.port)
    elif a.cmd == "ping":
        ping(a.host, a.count, a.interval)
    elif a.cmd == "rtt":
        rtt(a.host, a.port, a.count, a.interval)
    elif a.cmd == "source":
        source(a.host, a.port, a.seconds)
    else:
        dial(a.host, a.port, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
