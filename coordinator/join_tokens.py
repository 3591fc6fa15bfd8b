"""Join tokens: issued and revoked by the organiser, checked at Join and again on every later call.

``coordinator token create`` writes a token's digest into the run's store (the token itself is
shown once and never kept); ``revoke`` marks it, and the running coordinator refuses every peer
that joined with it at that peer's next call. The run's ``--join-token`` (file or environment)
is one more token, which only a restart without it revokes. A run with neither is open.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass

from proto.auth import digest, new_secret

from .store import Store

CONFIG_TOKEN = "config"  # the id of --join-token


@dataclass(frozen=True)
class IssuedToken:
    token_id: str
    secret: str  # shown to the organiser once


def issue(store: Store, name: str = "") -> IssuedToken:
    token = IssuedToken(uuid.uuid4().hex[:12], new_secret())
    store.add_token(token.token_id, name, digest(token.secret))
    return token


class JoinTokens:
    """The tokens the run accepts, re-read whenever another process changed the store."""

    def __init__(self, store: Store | None, config_token: str = "") -> None:
        self.store = store
        self.config_digest = digest(config_token) if config_token else ""
        self._version: int | None = None
        self._live: list[tuple[str, str]] = []  # (digest, id)
        self._revoked: set[str] = set()
        self._issued = False

    def _refresh(self) -> None:
        if self.store is None:
            return
        version = self.store.data_version()
        if version == self._version:
            return
        rows = self.store.tokens()
        self._version = version
        self._issued = bool(rows)
        self._live = [(row["digest"], row["id"]) for row in rows if row["revoked"] is None]
        self._revoked = {row["id"] for row in rows if row["revoked"] is not None}

    @property
    def required(self) -> bool:
        """Whether joining needs a token (the run has --join-token, or the organiser has issued one)."""
        self._refresh()
        return bool(self.config_digest) or self._issued

    def admit(self, secret: str) -> str | None:
        """The id of the live token ``secret`` is, or None; every live digest is compared, in constant time."""
        self._refresh()
        presented = digest(secret) if secret else ""
        found = None
        candidates = ([(self.config_digest, CONFIG_TOKEN)] if self.config_digest else []) + self._live
        for stored, token_id in candidates:
            if hmac.compare_digest(presented, stored) and presented:
                found = token_id
        if found is None and not self.required:
            return ""  # an open run: admitted without a token
        return found

    def revoked(self, token_id: str) -> bool:
        self._refresh()
        return token_id in self._revoked
