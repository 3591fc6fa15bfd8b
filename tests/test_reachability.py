"""The coordinator's dial-back probe (coordinator.reachability) and the peer's side of it (peer.reachability)."""

from __future__ import annotations

import asyncio
import socket

from coordinator.reachability import ProbeLimiter, dial_back, observed_host
from peer.reachability import Reachability, circuit_maddrs, p2p_options, probe
from proto import hometrain_pb2 as pb


def test_the_address_a_grpc_connection_came_from():
    assert observed_host("ipv4:203.0.113.7:51234") == "203.0.113.7"
    assert observed_host("ipv6:[2001:db8::1]:51234") == "2001:db8::1"
    assert observed_host("ipv6:[::ffff:203.0.113.7]:51234") == "203.0.113.7"
    assert observed_host("unix:/tmp/sock") == ""


class DialingCoordinator:
    """The coordinator's side of CheckReachability, on loopback, as the peer's control client sees it."""

    def __init__(self, nonce_override: bytes | None = None) -> None:
        self.nonce_override = nonce_override

    async def check_reachability(self, request: pb.ReachabilityRequest) -> pb.ReachabilityReply:
        nonce = self.nonce_override or request.nonce
        result = await dial_back(request.host or "127.0.0.1", request.port, nonce, timeout=2.0)
        return pb.ReachabilityReply(reachable=result.reachable, observed_host="127.0.0.1", detail=result.detail)


def test_a_peer_the_coordinator_can_connect_to_is_direct_and_one_it_cannot_is_relayed():
    reach = asyncio.run(probe(DialingCoordinator(), "p1", "127.0.0.1", 0, ""))
    assert reach.mode == "direct" and reach.port > 0 and "reached" in reach.detail
    # Something else answers there (a port forward to another machine): not this peer, so not direct.
    other = asyncio.run(probe(DialingCoordinator(nonce_override=b"x" * 16), "p1", "127.0.0.1", 0, ""))
    assert other.mode == "relayed" and "nonce" in other.detail


def test_dialing_a_closed_port_says_why():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: the connection is refused
        result = asyncio.run(dial_back("127.0.0.1", port, b"n" * 16, timeout=2.0))
    assert not result.reachable and f"127.0.0.1:{port}" in result.detail


def test_one_probe_per_peer_per_interval():
    limiter = ProbeLimiter(interval=10.0)
    assert limiter.allow("a", now=100.0) and not limiter.allow("a", now=105.0) and limiter.allow("b", now=105.0)
    assert limiter.allow("a", now=110.5)


def test_p2p_options_for_each_reachability():
    relays = ["/ip4/198.51.100.1/tcp/31337/p2p/12D3KooWS4ikruusyM48AkxpHhvWJESSCho1UmPNexVz8ZubURM1"]
    direct = p2p_options(Reachability("direct", 4001, ""), "0.0.0.0", "203.0.113.7", relays)
    assert direct["host_maddrs"] == ["/ip4/0.0.0.0/tcp/4001"] and direct["announce_maddrs"] == ["/ip4/203.0.113.7/tcp/4001"]
    assert direct["force_reachability"] == "public"  # a relay for others, as the coordinator is
    relayed = p2p_options(Reachability("relayed", 4001, ""), "0.0.0.0", "", relays)
    assert relayed["no_listen"] and relayed["use_auto_relay"] and relayed["trusted_relays"] == relays and relayed["client_mode"]
    assert circuit_maddrs(relays, "12D3KooWme") == [f"{relays[0]}/p2p-circuit/p2p/12D3KooWme"]
