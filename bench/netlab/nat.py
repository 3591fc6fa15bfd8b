"""Home-router NAT in its own namespace: masquerade outbound, refuse every new inbound connection."""

from __future__ import annotations

from .commands import run, tool


def nat_rules(wan: str) -> list[list[str]]:
    """iptables argument lists: MASQUERADE out of ``wan``; inbound only for established flows.

    New inbound connections are dropped silently (no RST), like a home router
    without port forwards: a dialer sees a timeout, not "connection refused".
    """
    return [
        ["-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE"],
        ["-A", "FORWARD", "-i", wan, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        ["-A", "FORWARD", "-i", wan, "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"],
        ["-A", "FORWARD", "-i", wan, "-j", "DROP"],
        ["-A", "INPUT", "-i", wan, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        ["-A", "INPUT", "-i", wan, "-j", "DROP"],
    ]


def configure_nat(ns: str, wan: str) -> None:
    """Install the NAT rules in namespace ``ns`` whose uplink interface is ``wan``."""
    for rule in nat_rules(wan):
        run([tool("ip"), "netns", "exec", ns, tool("iptables"), *rule],
            what=f"add NAT rule in {ns} (iptables {' '.join(rule)})")
