"""Teardown that always happens: namespace removal, process killing, atexit and signals.

Every lab registers here. On interpreter exit (atexit), SIGINT and SIGTERM all
live labs of this process are closed before the previous handler runs (SIGINT
still raises KeyboardInterrupt, SIGTERM still terminates). A run that was
SIGKILLed cannot clean up after itself; ``cleanup_stale()`` (called by every
new Lab by default) removes namespaces whose owning process is gone. Only
namespaces named by ``names.LabName`` are ever touched.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from .commands import run, tool
from .names import NAME_PREFIX, parse_ns


class _Closable(Protocol):
    def close(self) -> None: ...


_live: "weakref.WeakSet[Any]" = weakref.WeakSet()
_lock = threading.Lock()
_atexit_installed = False
_signals_installed = False
_previous: dict[int, Any] = {}
_busy = 0  # teardowns in progress; signals wait until they finish
_pending: list[int] = []


def list_namespaces() -> list[str]:
    """Names of all network namespaces mounted under /run/netns."""
    out = run([tool("ip"), "netns", "list"], what="list network namespaces").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    """Processes living in namespace ``ns`` (empty if it is gone)."""
    proc = run([tool("ip"), "netns", "pids", ns], what=f"list processes in {ns}", check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()] if proc.returncode == 0 else []


def kill_pids(pids: Iterable[int], grace_s: float = 1.0) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL whatever is left."""
    pids = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive or sig == signal.SIGKILL:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            alive = [p for p in alive if _running(p)]
            if not alive:
                return
            time.sleep(0.02)
        pids = alive


def _running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def remove_namespaces(names: Iterable[str]) -> list[str]:
    """Kill every process inside each namespace, then delete it; returns names that remain."""
    names = list(names)
    pids = [pid for ns in names for pid in namespace_pids(ns)]
    kill_pids(pids)
    for ns in names:
        run([tool("ip"), "netns", "del", ns], what=f"delete namespace {ns}", check=False)
    present = set(list_namespaces())
    return [ns for ns in names if ns in present]


def cleanup_stale() -> list[str]:
    """Remove lab namespaces whose owning process is dead; returns the names removed."""
    stale = []
    for ns in list_namespaces():
        if not ns.startswith(NAME_PREFIX):
            continue
        owner = parse_ns(ns)
        if owner is not None and not owner.owner_alive():
            stale.append(ns)
    if stale:
        remove_namespaces(stale)
    return stale


@contextlib.contextmanager
def teardown() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a lab is torn down, so a second Ctrl-C cannot leave junk;
    held signals are delivered again when the outermost teardown ends."""
    global _busy
    _busy += 1
    try:
        yield
    finally:
        _busy -= 1
        if _busy == 0:
            while _pending:
                os.kill(os.getpid(), _pending.pop(0))


def close_all() -> None:
    """Close every live lab of this process (used by atexit and the signal handlers)."""
    with teardown():
        for lab in list(_live):
            try:
                lab.close()
            except Exception as exc:  # noqa: BLE001 - teardown must go on for the other labs
                print(f"netlab: cleanup of {lab!r} failed: {exc}", file=sys.stderr)


def _on_signal(signum: int, frame: Any) -> None:
    if _busy:
        _pending.append(signum)  # finish tearing down first; teardown() re-delivers it
        return
    close_all()
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # SIGINT: default_int_handler raises KeyboardInterrupt
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    # SIG_IGN: the process chose to ignore it; the labs are closed, nothing more to do.


def register(lab: _Closable, *, handle_signals: bool = True) -> None:
    """Track ``lab`` for atexit/signal cleanup; installs the handlers once (main thread only)."""
    global _atexit_installed, _signals_installed
    with _lock:
        _live.add(lab)
        if not _atexit_installed:
            atexit.register(close_all)
            _atexit_installed = True
        if handle_signals and not _signals_installed and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                _previous[sig] = signal.getsignal(sig)
                signal.signal(sig, _on_signal)
            _signals_installed = True


def unregister(lab: _Closable) -> None:
    _live.discard(lab)
