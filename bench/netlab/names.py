"""Namespace names: a unique per-lab prefix that also records which process owns the lab.

A lab's namespaces are named ``ht-<pid>-<start>-<tag>-<role>``: ``pid`` and
``start`` (the owner's start time in clock ticks, base 36) identify the owning
process even after pid reuse, ``tag`` tells parallel labs of one process apart.
``cleanup_stale()`` uses this to find namespaces whose owner is gone.
Interface names live inside the namespaces, so they stay short and fixed
(``eth0``, ``l7``, ``wan``, ``dly0``) and never clash between labs.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

NAME_PREFIX = "ht-"
_NS_RE = re.compile(r"^ht-(?P<pid>\d+)-(?P<start>[0-9a-z]+)-(?P<tag>[0-9a-z]+)-(?P<role>.+)$")
HOST_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
IFNAME_MAX = 15


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19])  # field 22 overall


@dataclass(frozen=True)
class LabName:
    """Owner identity of one lab and the namespace names derived from it."""

    pid: int
    start: str
    tag: str

    @classmethod
    def new(cls) -> "LabName":
        pid = os.getpid()
        return cls(pid, _base36(process_start_ticks(pid) or 0), secrets.token_hex(2))

    @property
    def prefix(self) -> str:
        return f"{NAME_PREFIX}{self.pid}-{self.start}-{self.tag}-"

    def ns(self, role: str) -> str:
        return self.prefix + role

    def owner_alive(self) -> bool:
        ticks = process_start_ticks(self.pid)
        return ticks is not None and _base36(ticks) == self.start


def parse_ns(name: str) -> LabName | None:
    """The owner of a lab namespace, or None if ``name`` is not a lab namespace."""
    m = _NS_RE.match(name)
    if m is None:
        return None
    return LabName(int(m["pid"]), m["start"], m["tag"])


def check_ifname(name: str) -> str:
    if not 0 < len(name) <= IFNAME_MAX:
        raise ValueError(f"interface name {name!r} is {len(name)} chars; Linux allows 1..{IFNAME_MAX}")
    return name
