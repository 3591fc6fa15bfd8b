"""The data plane's member set: the libp2p ids this peer's handlers serve.

The coordinator signs the set with the run's key (the one that signs checkpoint manifests) and
bumps its epoch when it changes; every heartbeat reply names the epoch, and a peer holding an
older one fetches the set. libp2p already authenticates who is calling (a stream's remote id
is its key), so a handler only has to look the caller up. A caller not in the set makes the
peer fetch the set once more, since a replica that joined a moment ago may not be in the copy
held here yet; such fetches are at most one every REFRESH_SECONDS, shared by all who wait for
one, so strangers cannot make the peer poll the coordinator.
An epoch of 0 means an open run (no join tokens): anyone may join it, so everyone is served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from proto import hometrain_pb2 as pb
from proto.auth import verify_member_set

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0
WARN_EVERY = 30.0  # seconds between warnings about refused callers


class Members:
    """Who may call this peer's data-plane handlers, as the coordinator last said."""

    def __init__(self, fetch: Callable[[], Awaitable[pb.MemberSet]], public_key_hex: str, run_id: str) -> None:
        self.fetch = fetch
        self.public_key_hex = public_key_hex
        self.run_id = run_id
        self.epoch = 0
        self.ids: frozenset[str] = frozenset()
        self.refused = 0             # calls from non-members, refused
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._warned_at = float("-inf")

    @property
    def enforced(self) -> bool:
        return self.epoch > 0

    async def update(self, epoch: int) -> None:
        """The coordinator's current epoch (from a heartbeat reply): fetch the set if it is newer than ours."""
        if epoch == 0:
            self.epoch, self.ids = 0, frozenset()
        elif epoch != self.epoch:
            await self._refresh(force=True)

    async def _refresh(self, force: bool = False) -> None:
        """Fetch the set. Unforced fetches are at most one per REFRESH_SECONDS: a caller waits for the next
        one, and every caller waiting then shares it."""
        asked = time.monotonic()
        async with self._lock:
            if self._fetched_at >= asked:
                return  # fetched while this caller waited
            wait = self._fetched_at + REFRESH_SECONDS - time.monotonic()
            if not force and wait > 0:
                await asyncio.sleep(wait)
            self._fetched_at = time.monotonic()
            try:
                reply = await self.fetch()
            except Exception as exc:  # keep serving by the set already held
                log.warning("could not fetch the run's member set: %s", exc)
                return
            if reply.run_id != self.run_id or not verify_member_set(self.public_key_hex, reply.run_id, reply.epoch, reply.dht_peer_ids,
                                                                     reply.signature):
                log.error("the member set the coordinator sent is not signed by this run's key (run %r, epoch %d): kept the old one",
                          reply.run_id, reply.epoch)
                return
            if reply.epoch >= self.epoch:
                self.epoch, self.ids = reply.epoch, frozenset(reply.dht_peer_ids)

    def knows(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is in the set held now (no fetch): for records read from the DHT."""
        return not self.enforced or peer_id in self.ids

    async def admits(self, peer_id: str) -> bool:
        """Whether ``peer_id`` (base58) may use the data plane; counts and logs those refused."""
        if not self.enforced or peer_id in self.ids:
            return True
        await self._refresh()
        if peer_id in self.ids:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at > WARN_EVERY:
            self._warned_at = now
            log.warning("refused a data-plane call from %s: not a member of this run (%d refused so far)", peer_id, self.refused)
        return False
