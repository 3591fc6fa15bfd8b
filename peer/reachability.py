"""Can other machines dial this peer? And how its P2P node is set up either way.

Before its P2P node starts, a peer listens on its P2P port and asks the coordinator to connect
back (``CheckReachability``). A peer the coordinator reaches is ``direct``: it listens, and
libp2p is told it is public, which also makes it a circuit relay for others. A peer behind a
home NAT is ``relayed``: it listens nowhere (nobody could connect), reserves a slot on the
coordinator's circuit relay (libp2p circuit relay v2, auto-relay), and reaches the others by
dialling out. Its relays are static (``StaticRelayP2P``): p2pd's default relay discovery waits
for four relay candidates, or 3 minutes, before it reserves a slot anywhere. libp2p connections
carry streams both ways, so a direct peer's frames to it ride the connection it opened, and it
dials back direct peers that reached it over the relay (``FrameTransport.dial_back``); two
relayed peers talk through the relay. ``--reachability`` skips the probe.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import grpc
from hivemind.p2p import P2P

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


class StaticRelayP2P(P2P):
    """A p2pd whose auto-relay reserves a slot on its trusted relays at once (``-relayDiscovery=0``).

    hivemind leaves p2pd's relay discovery on, and then libp2p's auto-relay waits until it knows four
    relay candidates, or for its 3-minute boot delay, before it reserves anything; a swarm's one
    relay (the coordinator) is never four. Two relayed peers could not reach each other for about
    181 s after they started. With static relays the reservation is made as the daemon starts:
    0.6 s on loopback. hivemind's ``create`` takes no such option; it reads this mapping through
    ``cls``, so the subclass changes only the daemons it starts."""

    FORCE_REACHABILITY_MAPPING = {**P2P.FORCE_REACHABILITY_MAPPING,
                                  "private": {**P2P.FORCE_REACHABILITY_MAPPING["private"], "relayDiscovery": 0}}


def p2p_options(reach: Reachability, host: str, announce_host: str, relays: list[str]) -> dict[str, Any]:
    """``StaticRelayP2P.create`` keyword arguments for this peer's reachability."""
    if not reach.relayed:
        announce = [f"/ip4/{announce_host}/tcp/{reach.port}"] if announce_host else None
        return dict(host_maddrs=[f"/ip4/{host}/tcp/{reach.port}"], announce_maddrs=announce, force_reachability="public")
    # Behind NAT: no listener, a reservation on the coordinator's relay (the DHT runs in client mode: others cannot query it).
    return dict(host_maddrs=[], no_listen=True, use_auto_relay=True, force_reachability="private", trusted_relays=relays,
                dht_mode="client")


def circuit_maddrs(relays: list[str], own_id: str) -> list[str]:
    """Where a relayed peer is dialled: ``<relay>/p2p-circuit/p2p/<own id>`` for each relay."""
    return [f"{relay}/p2p-circuit/p2p/{own_id}" for relay in relays if "/p2p/" in relay]
