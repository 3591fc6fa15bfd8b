"""Can other machines dial this peer? And how its P2P node is set up either way.

Before its P2P node starts, a peer listens on its P2P port and asks the coordinator to connect
back (``CheckReachability``). A peer the coordinator reaches is ``direct``: it listens, and
libp2p is told it is public, which also makes it a circuit relay for others. A peer behind a
home NAT is ``relayed``: it listens nowhere (nobody could connect), reserves a slot on the
coordinator's circuit relay (libp2p circuit relay v2, auto-relay), and reaches the others by
dialling out. libp2p connections carry streams both ways, so a direct peer's frames to it ride
the connection it opened; two relayed peers talk through the relay. ``--reachability`` skips
the probe.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import grpc

from proto import REACHABILITY_NONCE_BYTES
from proto import hometrain_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reachability:
    """How others reach this peer: ``direct`` (they dial ``port``) or ``relayed`` (through the coordinator's relay)."""

    mode: str
    port: int
    detail: str
    observed_host: str = ""

    @property
    def relayed(self) -> bool:
        return self.mode == "relayed"


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the P2P node binds it right after the probe)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def probe(client, peer_id: str, host: str, port: int, announce_host: str) -> Reachability:
    """Listen on ``host:port`` (0: a free port) and have the coordinator dial it back."""
    nonce = secrets.token_bytes(REACHABILITY_NONCE_BYTES)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(nonce)
        try:
            await writer.drain()
        finally:
            writer.close()

    port = port or free_port(host)
    try:
        server = await asyncio.start_server(answer, host, port, reuse_address=True)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port} (--host, --p2p-port): {exc.strerror or exc}; pick a free port") from None
    try:
        reply = await client.check_reachability(pb.ReachabilityRequest(peer_id=peer_id, port=port, nonce=nonce, host=announce_host))
    except grpc.aio.AioRpcError as exc:
        # An older coordinator, or one that refused the probe: direct is what peers assumed before probes existed.
        return Reachability("direct", port, f"the coordinator did not probe this peer ({exc.code().name}: {exc.details()}); assuming direct")
    finally:
        server.close()
        await server.wait_closed()
    return Reachability("direct" if reply.reachable else "relayed", port, reply.detail, reply.observed_host)


def p2p_options(reach: Reachability, host: str, announce_host: str, relays: list[str]) -> dict[str, Any]:
    """``hivemind.DHT`` keyword arguments (passed on to its p2pd) for this peer's reachability."""
    if not reach.relayed:
        announce = [f"/ip4/{announce_host}/tcp/{reach.port}"] if announce_host else None
        return dict(host_maddrs=[f"/ip4/{host}/tcp/{reach.port}"], announce_maddrs=announce, force_reachability="public")
    # Behind NAT: no listener, DHT client mode (others cannot query it), a reservation on the coordinator's relay.
    return dict(host_maddrs=[], no_listen=True, client_mode=True, use_auto_relay=True, force_reachability="private",
                trusted_relays=relays)


def circuit_maddrs(relays: list[str], own_id: str) -> list[str]:
    """Where a relayed peer is dialled: ``<relay>/p2p-circuit/p2p/<own id>`` for each relay."""
    return [f"{relay}/p2p-circuit/p2p/{own_id}" for relay in relays if "/p2p/" in relay]
