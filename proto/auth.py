"""Who may speak: join tokens, per-peer credentials and the signed member set.

A join token admits a newcomer once (at Join); the coordinator then hands the peer a credential
of its own, and every later control-plane call carries it in gRPC metadata, so knowing a peer's
public id grants nothing. Both are kept only as sha256 digests and compared in constant time.
The data plane admits only the libp2p ids in the member set, which the coordinator signs with
the key that signs checkpoint manifests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

CREDENTIAL_METADATA = "x-hometrain-credential"
"""The gRPC metadata key that carries a peer's credential on every call after Join."""

SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh token or credential: 32 random bytes, URL-safe text."""
    return secrets.token_urlsafe(SECRET_BYTES)


def digest(secret: str) -> str:
    """What is stored instead of the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    """Constant-time check of ``secret`` against a stored digest (an empty secret never matches)."""
    return bool(secret) and hmac.compare_digest(digest(secret), stored_digest)


def credential_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The credential among a call's metadata ('' if none)."""
    for key, value in metadata or ():
        if key == CREDENTIAL_METADATA:
            return value.decode() if isinstance(value, bytes) else value
    return ""


def member_set_payload(run_id: str, epoch: int, dht_peer_ids: Iterable[str]) -> bytes:
    """The bytes a member set's signature covers."""
    return json.dumps({"run_id": run_id, "epoch": epoch, "members": sorted(dht_peer_ids)}, separators=(",", ":")).encode()


def sign_member_set(key: Ed25519PrivateKey, run_id: str, epoch: int, dht_peer_ids: Iterable[str]) -> bytes:
    return key.sign(member_set_payload(run_id, epoch, dht_peer_ids))


def verify_member_set(public_key_hex: str, run_id: str, epoch: int, dht_peer_ids: Iterable[str], signature: bytes) -> bool:
    """True if the coordinator whose key is ``public_key_hex`` signed this set for this run."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(signature, member_set_payload(run_id, epoch, dht_peer_ids))
        return True
    except (InvalidSignature, ValueError):
        return False


def key_fingerprint(public_key_hex: str) -> str:
    """A short, stable name for a signing key, to pin: the first 16 bytes of its sha256, hex."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:32]
