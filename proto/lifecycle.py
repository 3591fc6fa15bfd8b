"""Process hygiene shared by both processes: helpers they fork must not outlive them.

hivemind runs its DHT in a forked child (with its own p2pd). If the parent is killed with
SIGKILL, that child would keep running, holding its port and identity and keeping a stale
node in the swarm. On Linux every child forked after ``die_with_parent()`` is asked to be
killed when its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def ask_for_death_signal() -> None:
    """Have this process receive SIGKILL when its parent dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux or no prctl: nothing to do
        pass


def die_with_parent() -> None:
    """Make children forked from now on receive SIGKILL when this process dies (Linux only)."""
    if sys.platform.startswith("linux"):
        os.register_at_fork(after_in_child=ask_for_death_signal)
