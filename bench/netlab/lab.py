"""A lab of emulated hosts: one network namespace per host, joined through a router namespace.

Topology (addresses are per lab; parallel labs never see each other)::

    host ns "h-a"  eth0 10.0.1.2 --veth-- l1 10.0.1.1  \\
    host ns "h-b"  eth0 10.0.2.2 --veth-- l2 10.0.2.1   router ns  (dly0: TUN, delay router)
    host ns "h-c"  eth0 192.168.1.2 -- lan1 [nat ns "n-c" wan 10.0.3.2] --veth-- l3 10.0.3.1  /

* Every packet arriving at the router from a host link is policy-routed into
  the TUN ``dly0`` (``ip rule iif lN lookup 100``; table 100: ``default dev dly0``);
  the delay router process (delay_router.py) holds it for the two links'
  one-way delays and writes it back; with ``iif dly0`` the main table sends it
  out of the destination link.
* Each link is shaped with tbf on both egresses: the host side (upload) and the
  router side (download), rates from the host's Profile.
* All MTUs are 65000 so TCP moves ~64 KB packets and Python keeps up (~2k packets/s per Gbit/s).
* A NATed host sits behind its own home-router namespace (or shares one, see
  ``add_host(nat=...)``): outbound is masqueraded, new inbound connections are dropped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import cleanup
from .commands import NetlabError, run, tool
from .delay_router import TUN_NAME, DelayRouterProcess, DelayStats
from .names import HOST_NAME_RE, LabName, check_ifname
from .nat import configure_nat
from .preflight import can_make_namespaces
from .profiles import Profile, get_profile
from .shaping import Shaping, shape

REPO_ROOT = Path(__file__).resolve().parents[2]
_ROUTE_TABLE = "100"
_MAX_LINKS = 250


@dataclass(frozen=True)
class LabConfig:
    """How a lab is built; the defaults suit benchmarks of TCP over home links."""

    mtu: int = 65000                      # every veth and the TUN; large so Python can move 1 Gbit/s
    queue_ms: float = 50.0                # tbf queue per direction, as time at line rate
    tcp_buffer_max_bytes: int = 64 << 20  # tcp_rmem/tcp_wmem max in hosts: long fat links need > BDP
    seed: int | None = None               # jitter RNG seed (None: random)
    remove_stale: bool = True             # run cleanup_stale() when the lab starts
    handle_signals: bool = True           # install SIGINT/SIGTERM handlers that tear the lab down
    delay_router_nice: int = -5           # keep the delay router's timing under CPU contention
    # Measured: waking the router to read a packet and again to release it costs ~0.12 ms per
    # traversal on an idle 2-core box; taking 0.1 ms off each delayed packet makes ping match rtt_ms.
    delay_compensation_ms: float = 0.1
    python: str = sys.executable          # interpreter for the delay router

    def __post_init__(self) -> None:
        if not 576 <= self.mtu <= 65535:
            raise ValueError(f"LabConfig.mtu must be within 576..65535 bytes, got {self.mtu}")


@dataclass(frozen=True)
class LinkCounters:
    """Kernel byte/packet counters of a host's interface: up = sent by the host, down = received.

    Counted by the kernel per Ethernet frame: application bytes plus TCP/IP
    headers, 14 bytes of Ethernet header per packet, ACKs, handshakes.
    """

    up_bytes: int
    down_bytes: int
    up_packets: int
    down_packets: int

    def __sub__(self, other: "LinkCounters") -> "LinkCounters":
        return LinkCounters(self.up_bytes - other.up_bytes, self.down_bytes - other.down_bytes,
                            self.up_packets - other.up_packets, self.down_packets - other.down_packets)


@dataclass
class _Link:
    """One shaped, delayed link between an endpoint namespace and the router."""

    index: int
    router_dev: str
    endpoint_ns: str
    endpoint_dev: str
    profile: Profile

    @property
    def net(self) -> str:
        return f"10.0.{self.index}"

    @property
    def router_ip(self) -> str:
        return f"{self.net}.1"

    @property
    def endpoint_ip(self) -> str:
        return f"{self.net}.2"


@dataclass
class _Nat:
    name: str
    ns: str
    link: _Link
    hosts: list[str] = field(default_factory=list)


class Host:
    """An emulated host: a network namespace with one interface ``eth0``."""

    def __init__(self, lab: "Lab", name: str, ns: str, ip: str, profile: Profile,
                 nat: str | None, public_ip: str) -> None:
        self.lab = lab
        self.name = name
        self.ns = ns
        self.ip = ip
        """The host's own address. Others dial it, unless the host is behind NAT (then unreachable)."""
        self.profile = profile
        self.nat = nat
        """Name of the NAT the host sits behind, or None for a public host."""
        self.public_ip = public_ip
        """Where the host's connections appear to come from (its NAT's WAN address if NATed)."""

    @property
    def dialable(self) -> bool:
        """False for hosts behind NAT: nobody can open a connection to them."""
        return self.nat is None

    def __repr__(self) -> str:
        where = f"behind NAT {self.nat!r} (public {self.public_ip})" if self.nat else "public"
        return f"Host({self.name!r}, ip={self.ip}, profile={self.profile.name!r}, {where})"

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped so it runs inside this host's namespace."""
        return [tool("ip"), "netns", "exec", self.ns, *argv]

    def popen(self, argv: list[str], *, env: dict[str, str] | None = None, stdout: Any = None,
              stderr: Any = None, stdin: Any = None, cwd: str | os.PathLike[str] | None = None,
              text: bool = False) -> subprocess.Popen:
        """Start ``argv`` inside the namespace (own process group); the lab kills it at cleanup.

        ``env`` replaces the environment, as with subprocess (None inherits ours).
        """
        return self.lab._popen(self, argv, env=env, stdout=stdout, stderr=stderr, stdin=stdin, cwd=cwd, text=text)

    def run(self, argv: list[str], *, timeout: float = 60.0, check: bool = True, env: dict[str, str] | None = None,
            input: str | None = None, cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace, wait for it and capture its output as text."""
        proc = self.popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, cwd=cwd, text=True)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.lab._kill_group(proc)
            out, err = proc.communicate()
            raise NetlabError(f"on host {self.name!r}: {argv!r} did not finish within {timeout:g} s and was killed; "
                              f"stderr: {err.strip()[-1000:] or '(empty)'}") from None
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise NetlabError(f"on host {self.name!r}: {argv!r} exited with {proc.returncode}; "
                              f"stderr: {err.strip()[-1000:] or '(empty)'}")
        return result


class Lab:
    """Emulated hosts with shaped, delayed links; use as ``with Lab() as lab:``.

    Teardown (namespaces, veths, the delay router, every process started with
    ``Host.popen``) happens on ``close()``, on leaving the ``with`` block, at
    interpreter exit and on SIGINT/SIGTERM (handlers are installed by the first
    lab made in the main thread; they chain to the previous handlers). After a
    SIGKILL the delay router exits by itself (its stdin closes) and the next
    Lab, or ``python -m bench.netlab cleanup``, removes the rest.
    Methods are thread-safe.
    """

    def __init__(self, config: LabConfig | None = None) -> None:
        self.config = config or LabConfig()
        ok, reason = can_make_namespaces()
        if not ok:
            raise NetlabError(f"cannot build a network lab here: {reason}")
        self.name = LabName.new()
        self.prefix = self.name.prefix
        self.router_ns = self.name.ns("r")
        self.hosts: dict[str, Host] = {}
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()
        self._closed = False
        self._namespaces: list[str] = []
        self._links: list[_Link] = []
        self._nats: dict[str, _Nat] = {}
        self._lan_count = 0
        self._procs: list[subprocess.Popen] = []
        self._delay: DelayRouterProcess | None = None
        self._delay_log: IO[bytes] = tempfile.TemporaryFile(prefix="netlab-delay-")
        cleanup.register(self, handle_signals=self.config.handle_signals)
        if self.config.remove_stale:
            cleanup.cleanup_stale()
        try:
            self._build_router()
        except BaseException:
            self.close()
            raise

    # ----- context manager -------------------------------------------------------------
    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.close()
        except NetlabError as err:
            if exc_type is None:
                raise
            print(f"netlab: {err}", file=sys.stderr)  # do not mask the body's exception

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r}, hosts={list(self.hosts)}, closed={self._closed})"

    # ----- building ------------------------------------------------------------------------
    def _ip(self, *args: str, what: str) -> None:
        run([tool("ip"), *args], what=what)

    def _sysctl(self, ns: str, *settings: str) -> None:
        run([tool("ip"), "netns", "exec", ns, tool("sysctl"), "-qw", *settings], what=f"set sysctls in {ns}")

    def _new_ns(self, role: str, *, forward: bool) -> str:
        self._check_open()
        ns = self.name.ns(role)
        self._namespaces.append(ns)  # before creation: a half-built namespace still gets removed
        self._ip("netns", "add", ns, what=f"create namespace {ns}")
        self._ip("-n", ns, "link", "set", "lo", "up", what=f"bring up loopback in {ns}")
        tcp = f"4096 131072 {self.config.tcp_buffer_max_bytes}"
        self._sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
                     f"net.ipv4.ip_forward={int(forward)}", f"net.ipv4.tcp_rmem={tcp}", f"net.ipv4.tcp_wmem={tcp}",
                     "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        return ns

    def _build_router(self) -> None:
        ns = self._new_ns("r", forward=True)
        self._sysctl(ns, "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0")
        argv = [tool("ip"), "netns", "exec", ns, self.config.python, "-m", "bench.netlab.delay_router",
                "--nice", str(self.config.delay_router_nice),
                "--compensation-ms", str(self.config.delay_compensation_ms)]
        if self.config.seed is not None:
            argv += ["--seed", str(self.config.seed)]
        env = dict(os.environ, PYTHONPATH=_pythonpath())
        self._delay = DelayRouterProcess(argv, cwd=str(REPO_ROOT), env=env, stderr=self._delay_log)
        self._ip("-n", ns, "link", "set", TUN_NAME, "mtu", str(self.config.mtu), "txqueuelen", "2000", "up",
                 what="bring up the delay router's TUN")
        self._sysctl(ns, f"net.ipv4.conf.{TUN_NAME}.rp_filter=0")
        self._ip("-n", ns, "route", "add", "default", "dev", TUN_NAME, "table", _ROUTE_TABLE,
                 what="route host traffic into the delay router")

    def _new_link(self, endpoint_ns: str, endpoint_dev: str, profile: Profile) -> _Link:
        if len(self._links) >= _MAX_LINKS:
            raise NetlabError(f"a lab holds at most {_MAX_LINKS} host links (public hosts + NATs); "
                              "build a second Lab for more")
        link = _Link(len(self._links) + 1, check_ifname(f"l{len(self._links) + 1}"), endpoint_ns,
                     check_ifname(endpoint_dev), profile)
        self._links.append(link)
        r, mtu = self.router_ns, str(self.config.mtu)
        self._ip("-n", r, "link", "add", link.router_dev, "mtu", mtu, "type", "veth", "peer", "name", endpoint_dev,
                 "netns", endpoint_ns, "mtu", mtu, what=f"create the link of {endpoint_ns}")
        self._ip("-n", r, "addr", "add", f"{link.router_ip}/24", "dev", link.router_dev, what="address the router side")
        self._ip("-n", r, "link", "set", link.router_dev, "up", what="bring up the router side")
        self._ip("-n", endpoint_ns, "addr", "add", f"{link.endpoint_ip}/24", "dev", endpoint_dev,
                 what="address the host side")
        self._ip("-n", endpoint_ns, "link", "set", endpoint_dev, "up", what="bring up the host side")
        self._ip("-n", endpoint_ns, "route", "add", "default", "via", link.router_ip, what="add the default route")
        self._ip("-n", r, "rule", "add", "iif", link.router_dev, "lookup", _ROUTE_TABLE, "pref", "100",
                 what="send the link's traffic through the delay router")
        cfg = self.config
        shape(endpoint_ns, endpoint_dev, Shaping.for_rate(profile.up_mbit, mtu=cfg.mtu, queue_ms=cfg.queue_ms))
        shape(r, link.router_dev, Shaping.for_rate(profile.down_mbit, mtu=cfg.mtu, queue_ms=cfg.queue_ms))
        assert self._delay is not None
        self._delay.add_link(link.net, profile.one_way_ms, profile.jitter_ms)
        return link

    def add_host(self, name: str, profile: Profile | str = "home", nat: bool | str = False) -> Host:
        """Add a host on ``profile``. ``nat=True``: behind its own NAT; ``nat="x"``: behind the
        NAT named "x", shared with other hosts that name it (its link uses the first host's profile)."""
        if not HOST_NAME_RE.match(name):
            raise ValueError(f"host name {name!r} must be 1-32 chars of a-z, 0-9, '-', '_' starting with a "
                             "letter or digit (it becomes part of a namespace name)")
        prof = get_profile(profile)
        with self._lock:
            self._check_open()
            if name in self.hosts:
                raise ValueError(f"host {name!r} already exists in this lab; hosts: {list(self.hosts)}")
            if not nat:
                ns = self._new_ns(f"h-{name}", forward=False)
                link = self._new_link(ns, "eth0", prof)
                host = Host(self, name, ns, link.endpoint_ip, prof, None, link.endpoint_ip)
            else:
                nat_name = name if nat is True else str(nat)
                if not HOST_NAME_RE.match(nat_name):
                    raise ValueError(f"NAT name {nat_name!r} must match {HOST_NAME_RE.pattern}")
                gw = self._nats.get(nat_name) or self._new_nat(nat_name, prof)
                if gw.link.profile != prof:
                    raise ValueError(f"NAT {nat_name!r} already has profile {gw.link.profile.name!r}; host {name!r} "
                                     f"asked for {prof.name!r}. Hosts behind one NAT share its uplink: use the same "
                                     "profile, or nat=True for a NAT of its own")
                ns = self._new_ns(f"h-{name}", forward=False)
                ip = self._add_lan_host(gw, ns)
                gw.hosts.append(name)
                host = Host(self, name, ns, ip, prof, nat_name, gw.link.endpoint_ip)
            self.hosts[name] = host
            return host

    def _new_nat(self, nat_name: str, profile: Profile) -> _Nat:
        ns = self._new_ns(f"n-{nat_name}", forward=True)
        link = self._new_link(ns, "wan", profile)
        configure_nat(ns, "wan")
        gw = _Nat(nat_name, ns, link)
        self._nats[nat_name] = gw
        return gw

    def _add_lan_host(self, gw: _Nat, host_ns: str) -> str:
        """Connect ``host_ns`` to the NAT with an unshaped, undelayed LAN veth; returns its address."""
        self._lan_count += 1
        j = self._lan_count
        if j > 254:
            raise NetlabError("a lab holds at most 254 hosts behind NAT")
        dev, mtu = check_ifname(f"lan{j}"), str(self.config.mtu)
        self._ip("-n", gw.ns, "link", "add", dev, "mtu", mtu, "type", "veth", "peer", "name", "eth0",
                 "netns", host_ns, "mtu", mtu, what=f"connect {host_ns} to NAT {gw.name}")
        self._ip("-n", gw.ns, "addr", "add", f"192.168.{j}.1/24", "dev", dev, what="address the NAT's LAN side")
        self._ip("-n", gw.ns, "link", "set", dev, "up", what="bring up the NAT's LAN side")
        self._ip("-n", host_ns, "addr", "add", f"192.168.{j}.2/24", "dev", "eth0", what="address the NATed host")
        self._ip("-n", host_ns, "link", "set", "eth0", "up", what="bring up the NATed host's interface")
        self._ip("-n", host_ns, "route", "add", "default", "via", f"192.168.{j}.1", what="route via the NAT")
        return f"192.168.{j}.2"

    # ----- using -----------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in this lab; hosts: {list(self.hosts)}") from None

    def counters(self, host: Host | str) -> LinkCounters:
        """Bytes/packets the kernel counted on the host's interface (up = sent, down = received)."""
        h = self.host(host) if isinstance(host, str) else host
        out = run([tool("ip"), "-n", h.ns, "-s", "-j", "link", "show", "dev", "eth0"],
                  what=f"read interface counters of host {h.name!r}").stdout
        stats = json.loads(out)[0]["stats64"]
        return LinkCounters(stats["tx"]["bytes"], stats["rx"]["bytes"], stats["tx"]["packets"], stats["rx"]["packets"])

    def delay_stats(self) -> DelayStats:
        """Packets, queue depth, timing error and CPU seconds of the delay router so far."""
        self._check_open()
        assert self._delay is not None
        return self._delay.stats()

    @property
    def delay_router_pid(self) -> int | None:
        return self._delay.pid if self._delay else None

    def python_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Our environment plus PYTHONPATH to this repository, for Python processes in hosts."""
        return dict(os.environ, PYTHONPATH=_pythonpath(), **(extra or {}))

    def namespaces(self) -> list[str]:
        """Namespaces of this lab that exist right now (from the kernel, not our records)."""
        return [ns for ns in cleanup.list_namespaces() if ns.startswith(self.prefix)]

    # ----- processes -------------------------------------------------------------------------
    def _popen(self, host: Host, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            self._check_open()
            if not argv:
                raise ValueError("popen needs a non-empty argv, e.g. ['python3', '-c', 'print(1)']")
            proc = subprocess.Popen(host.argv(list(map(str, argv))), start_new_session=True, **kwargs)
            self._procs = [p for p in self._procs if p.poll() is None]
            self._procs.append(proc)
            return proc

    @staticmethod
    def _kill_group(proc: subprocess.Popen, grace_s: float = 1.0) -> None:
        if proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace_s)
                return
            except subprocess.TimeoutExpired:
                continue

    # ----- teardown ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise NetlabError(f"lab {self.prefix!r} is closed (left its `with` block, close() was called, "
                              "or a signal tore it down); build a new Lab")

    def close(self) -> None:
        """Kill every process, stop the delay router, delete every namespace; idempotent."""
        if os.getpid() != self._owner_pid:
            return  # a forked child must not tear down its parent's lab
        with cleanup.teardown(), self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                for proc in self._procs:
                    if proc.poll() is None:
                        try:
                            os.killpg(proc.pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
                deadline = time.monotonic() + 1.0
                for proc in self._procs:
                    try:
                        proc.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        self._kill_group(proc, grace_s=0.5)
                if self._delay is not None:
                    self._delay.stop()
                names = set(self._namespaces) | {ns for ns in cleanup.list_namespaces() if ns.startswith(self.prefix)}
                left = cleanup.remove_namespaces(sorted(names))
            finally:
                cleanup.unregister(self)
                self._delay_log.close()
            if left:
                raise NetlabError(f"could not delete namespaces {left}; something outside the lab holds them. "
                                  "Delete them with `ip netns del NAME`, or run `python -m bench.netlab cleanup` "
                                  "after this process exits")


def _pythonpath() -> str:
    existing = os.environ.get("PYTHONPATH")
    return str(REPO_ROOT) + (os.pathsep + existing if existing else "")
