"""Dial-back: can other machines open a connection to a peer? The coordinator, reachable by definition, tries.

A home router without a forwarded port drops inbound connections, so a volunteer behind NAT
fails this probe and joins the data plane through a relay instead. The probe connects to the
port the peer names, at the address its gRPC connection came from (what a NAT shows the world)
or at its ``--announce-host``, and must read back the nonce the peer's listener writes: a
different machine answering on that address does not count.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

PROBE_TIMEOUT = 3.0     # a reachable peer answers a TCP connect in one round trip; NAT drops the SYN silently
PROBE_INTERVAL = 10.0   # a peer may ask again after this long (each probe is one outbound connection)


@dataclass(frozen=True)
class DialBack:
    reachable: bool
    detail: str


def observed_host(grpc_peer: str) -> str:
    """The address in a gRPC peer string: ``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``, ``ipv6:[::1]:5678`` -> ``::1``,
    ``ipv6:[::ffff:1.2.3.4]:5678`` -> ``1.2.3.4``."""
    kind, _, rest = grpc_peer.partition(":")
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]")
        return host.removeprefix("::ffff:")  # an IPv4 peer on a dual-stack listener
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return ""


async def dial_back(host: str, port: int, nonce: bytes, timeout: float = PROBE_TIMEOUT) -> DialBack:
    """Connect to ``host:port`` and read ``nonce`` from it."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return DialBack(False, f"no answer from {host}:{port} within {timeout:.0f}s (inbound connections are dropped: NAT or a firewall)")
    except OSError as exc:
        return DialBack(False, f"cannot connect to {host}:{port}: {exc.strerror or exc}")
    try:
        got = await asyncio.wait_for(reader.readexactly(len(nonce)), timeout)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
        got = b""
    finally:
        writer.close()
    if got != nonce:
        return DialBack(False, f"{host}:{port} answered, but not with this peer's nonce (another machine, or a port forward to elsewhere)")
    return DialBack(True, f"reached at {host}:{port}")


class ProbeLimiter:
    """One probe per peer per ``PROBE_INTERVAL``: a member cannot turn the coordinator into a port scanner."""

    def __init__(self, interval: float = PROBE_INTERVAL) -> None:
        self.interval = interval
        self.last: dict[str, float] = {}

    def allow(self, peer_id: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self.last.get(peer_id, -self.interval) < self.interval:
            return False
        self.last[peer_id] = now
        return True
