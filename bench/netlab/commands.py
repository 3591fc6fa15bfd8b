"""Running the system tools (ip, tc, iptables, sysctl) with errors a person can act on."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence


class NetlabError(RuntimeError):
    """A lab could not be built, used or torn down; the message says why and what to do."""


def tool(name: str) -> str:
    """Absolute path of a system tool, or NetlabError naming the package to install."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        package = {"ip": "iproute2", "tc": "iproute2", "iptables": "iptables", "sysctl": "procps"}.get(name, name)
        raise NetlabError(f"`{name}` was not found on PATH; install the {package} package (apt-get install {package})")
    return path


def run(argv: Sequence[str], *, what: str, check: bool = True, timeout: float = 30.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; on failure raise NetlabError with what/received/hint."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    except FileNotFoundError as exc:
        raise NetlabError(f"{what}: cannot execute {argv[0]!r} ({exc}); install it or fix PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetlabError(f"{what}: `{shlex.join(argv)}` did not finish within {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or "(no output)"
        raise NetlabError(f"{what} failed: `{shlex.join(argv)}` exited with {proc.returncode}: {detail}")
    return proc
