"""Announced addresses, and how a peer on another host reads them.

A coordinator that listens on a wildcard address (0.0.0.0) and is given no --announce-host
names itself 127.0.0.1 in checkpoint URLs, and hivemind lists its loopback address among
its DHT multiaddrs. From another host those mean this host. Where the coordinator names a
loopback or wildcard address, a peer uses the host it dialled (``--coordinator HOST:PORT``)
instead: that one demonstrably reaches the coordinator's machine.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit


def is_local(host: str) -> bool:
    """Loopback, wildcard or ``localhost``: an address that means "this machine" wherever it is read."""
    host = host.strip("[]").lower()
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def reachable_url(url: str, dialled_host: str) -> str:
    """``url`` with a loopback or wildcard host replaced by ``dialled_host`` (unless that is local too)."""
    parts = urlsplit(url)
    if not url or not is_local(parts.hostname or "") or is_local(dialled_host):
        return url
    host = f"[{dialled_host}]" if ":" in dialled_host else dialled_host
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def resolve_ipv4(host: str) -> str | None:
    """An IPv4 address of ``host`` (itself if it is one), or None if it has none."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        return None


def reachable_maddrs(maddrs: list[str], dialled_host: str) -> list[str]:
    """Multiaddrs with loopback and wildcard ones rewritten to ``dialled_host`` (first: that host is known
    to reach the coordinator), then the others, without duplicates.

    ``/ip4/127.0.0.1/tcp/31337/p2p/ID`` becomes ``/ip4/<dialled>/tcp/31337/p2p/ID`` (``/dns4/<name>/...``
    when the name does not resolve here). Kept as they are when ``dialled_host`` is local too."""
    if is_local(dialled_host):
        return list(dict.fromkeys(maddrs))
    ip4 = resolve_ipv4(dialled_host)
    outside, rewritten = [], []
    for maddr in maddrs:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6") and is_local(parts[2]):
            parts[1:3] = ["ip4", ip4] if ip4 else ["dns4", dialled_host]
            rewritten.append("/".join(parts))
        else:
            outside.append(maddr)
    return list(dict.fromkeys(rewritten + outside))
