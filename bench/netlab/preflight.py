"""Can this machine build a lab? One answer with a reason, so tests can skip honestly."""

from __future__ import annotations

import functools
import os
import secrets
import sys

from .commands import NetlabError, run, tool


@functools.lru_cache(maxsize=1)
def can_make_namespaces() -> tuple[bool, str]:
    """(True, "ok") if namespaces, veths, tc, iptables and TUN all work here, else (False, why)."""
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux; this is {sys.platform}"
    if os.geteuid() != 0:
        return False, ("creating network namespaces needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN); "
                       f"running as uid {os.geteuid()}")
    try:
        ip, tc, iptables = tool("ip"), tool("tc"), tool("iptables")
        tool("sysctl")
    except NetlabError as exc:
        return False, str(exc)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        return False, (f"/dev/net/tun cannot be opened ({exc}); the delay router needs TUN "
                       "(modprobe tun, or give the container --device /dev/net/tun)")
    # Name matches no owner pattern parse_ns() accepts, so cleanup_stale never mistakes it.
    ns = f"htprobe-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        run([ip, "netns", "add", ns], what="create a test network namespace")
        run([ip, "-n", ns, "link", "add", "p0", "mtu", "65000", "type", "veth", "peer", "name", "p1", "mtu", "65000"],
            what="create a veth pair with a 65000-byte MTU")
        run([tc, "-n", ns, "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "10mbit", "burst", "140000",
             "limit", "300000"], what="add a tbf qdisc")
        run([ip, "netns", "exec", ns, iptables, "-t", "nat", "-A", "POSTROUTING", "-o", "p0", "-j", "MASQUERADE"],
            what="add an iptables NAT rule inside a namespace")
        run([ip, "netns", "exec", ns, iptables, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"],
            what="add an iptables conntrack rule inside a namespace")
    except NetlabError as exc:
        return False, str(exc)
    finally:
        run([ip, "netns", "del", ns], what="delete the test namespace", check=False)
    return True, "ok"
