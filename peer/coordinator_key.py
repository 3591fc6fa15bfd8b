"""Which coordinator to trust: the key it signs checkpoints and member sets with, pinned or remembered.

The key arrives over the control plane, which is plaintext unless the run uses TLS: whoever sits
on the path could hand a peer their own key and then their own weights. ``--coordinator-key``
pins the key by fingerprint (the coordinator's log and status page show it); without it the
first key seen is trusted and, with ``--state-dir``, remembered per coordinator address, so a
key that changes later is refused (as ssh does with host keys).
"""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path

from proto.auth import key_fingerprint

log = logging.getLogger(__name__)

KNOWN_KEYS = "coordinator_keys.json"


class UntrustedCoordinator(RuntimeError):
    """The coordinator's key is not the one this peer trusts; the message says what to do."""


def trust_coordinator_key(public_key_hex: str, coordinator: str, pinned: str = "", state_dir: str = "") -> str:
    """Check ``public_key_hex`` against the pinned fingerprint or the one remembered for ``coordinator``; returns its fingerprint."""
    try:
        fingerprint = key_fingerprint(public_key_hex)
    except ValueError:
        raise UntrustedCoordinator(f"the coordinator at {coordinator} sent no usable signing key ({public_key_hex[:20]!r})") from None
    if pinned:
        if not hmac.compare_digest(fingerprint, pinned.lower()):
            raise UntrustedCoordinator(
                f"the coordinator at {coordinator} signs with key {fingerprint}, not the {pinned.lower()} given by --coordinator-key: "
                "refusing its checkpoints. Check the address, and the fingerprint on the organiser's status page")
        return fingerprint
    if not state_dir:
        log.info("trusting the coordinator's key %s on first use (pin it with --coordinator-key %s)", fingerprint, fingerprint)
        return fingerprint
    path = Path(state_dir) / KNOWN_KEYS
    known = json.loads(path.read_text()) if path.is_file() else {}
    remembered = known.get(coordinator)
    if remembered is None:
        known[coordinator] = fingerprint
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1, sort_keys=True))
        log.info("trusting the coordinator's key %s on first use; remembered in %s", fingerprint, path)
    elif not hmac.compare_digest(remembered, fingerprint):
        raise UntrustedCoordinator(
            f"the coordinator at {coordinator} now signs with key {fingerprint}, but it signed with {remembered} before ({path}): "
            "refusing its checkpoints. If the organiser really moved the run to a new key, remove that entry from the file "
            f"or pass --coordinator-key {fingerprint}")
    return fingerprint
