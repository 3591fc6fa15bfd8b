"""CLI: ``python -m bench.netlab selftest [--profile home|all] [--seconds 3]``, ``check``, ``cleanup``."""

from __future__ import annotations

import argparse
import sys

from .cleanup import cleanup_stale
from .commands import NetlabError
from .preflight import can_make_namespaces
from .profiles import PROFILES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.netlab", description="Emulated home-internet hosts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("selftest", help="measure RTT, throughput, NAT and delay-router CPU per profile")
    st.add_argument("--profile", default="home", help=f"one of {', '.join(PROFILES)}, or 'all'")
    st.add_argument("--seconds", type=float, default=3.0, help="length of each bulk transfer")
    sub.add_parser("check", help="say whether this machine can build labs, and why not")
    sub.add_parser("cleanup", help="remove namespaces left by lab owners that died")
    a = p.parse_args(argv)

    if a.cmd == "check":
        ok, reason = can_make_namespaces()
        print("ok" if ok else f"cannot build labs: {reason}")
        return 0 if ok else 1
    if a.cmd == "cleanup":
        removed = cleanup_stale()
        print(f"removed {len(removed)} stale namespaces" + (f": {' '.join(removed)}" if removed else ""))
        return 0

    names = list(PROFILES) if a.profile == "all" else [a.profile]
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        print(f"unknown profile {unknown[0]!r}; choose one of {', '.join(PROFILES)} or 'all'", file=sys.stderr)
        return 2
    from .selftest import format_rows, selftest
    try:
        rows = selftest(names, seconds=a.seconds)
    except NetlabError as exc:
        print(f"selftest failed: {exc}", file=sys.stderr)
        return 1
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
