"""Who holds which stage: per-stage records in the hivemind DHT, checked against their schema as they are read.

One DHT key per stage, one subkey per peer (its libp2p id), with an expiry the peer refreshes.
Anyone can write a DHT value, so a record is used only if it fits ``StageRecord``'s schema and, in
a run with join tokens, its subkey is a member of the run (``is_member``); others are dropped and
counted (``records_rejected``), never raised to the sender that reads it. Records are not signed:
a member could still overwrite another member's, which is why routing prefers the coordinator's list. While the coordinator's own list of a stage is recent (it comes with every round state),
that list stands in for the DHT: the coordinator drops dead peers sooner than records expire.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import hivemind
from hivemind.utils import get_dht_time

log = logging.getLogger(__name__)

RECORD_TTL = 30.0
MAX_ADDRESSES = 8      # multiaddrs kept per peer
MAX_ADDRESS_CHARS = 256
MAX_NAME_CHARS = 64
TOLD_MAX_AGE = 15.0    # seconds the coordinator's list of a stage stands in for the DHT's records


def stage_key(run_id: str, stage: int) -> str:
    return f"hometrain:{run_id}:stage:{stage}"


@dataclass(frozen=True)
class StageRecord:
    """What a peer announces about itself for its stage."""

    throughput: float = 0.0          # samples/s it measured for its stage (0: not yet)
    next_round: int = 0              # round its weights are ready to accumulate
    name: str = ""
    maddrs: tuple[str, ...] = field(default_factory=tuple)  # where it can be dialled
    leaving: bool = False            # a tombstone: the peer withdrew (expiry cannot be shortened in a DHT)

    @property
    def relayed(self) -> bool:
        """Reached only through a relay (it announced relay addresses and nothing else): it is behind NAT."""
        return bool(self.maddrs) and all("/p2p-circuit" in m for m in self.maddrs)

    def to_value(self) -> dict[str, Any]:
        value = asdict(self)
        value["maddrs"] = list(self.maddrs)
        return value

    @classmethod
    def parse(cls, value: Any) -> StageRecord | None:
        """The record a DHT value holds, or None if it does not fit the schema (types, ranges, sizes)."""
        if not isinstance(value, dict) or set(value) - {"throughput", "next_round", "name", "maddrs", "leaving"}:
            return None
        throughput, next_round = value.get("throughput", 0.0), value.get("next_round", 0)
        name, maddrs, leaving = value.get("name", ""), value.get("maddrs", []), value.get("leaving", False)
        if isinstance(throughput, bool) or not isinstance(throughput, (int, float)) or not math.isfinite(throughput) or throughput < 0:
            return None
        if isinstance(next_round, bool) or not isinstance(next_round, int) or next_round < 0:
            return None
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not isinstance(leaving, bool):
            return None
        if not isinstance(maddrs, (list, tuple)) or len(maddrs) > MAX_ADDRESSES:
            return None
        if not all(isinstance(m, str) and 0 < len(m) <= MAX_ADDRESS_CHARS for m in maddrs):
            return None
        return cls(float(throughput), next_round, name, tuple(maddrs), leaving)


class StageDirectory:
    """Per-stage membership records in the hivemind DHT, and the coordinator's lists of them."""

    def __init__(self, dht: hivemind.DHT, run_id: str, addresses: dict[str, list[str]] | None = None) -> None:
        self.dht = dht
        self.run_id = run_id
        self.addresses = addresses if addresses is not None else {}  # peer id -> where it can be dialled
        self.records_rejected = 0
        self.is_member: Callable[[str], bool] = lambda peer_id: True  # set to the run's member set (peer.members)
        self._cache: dict[int, tuple[float, dict[str, StageRecord]]] = {}
        self._told: dict[int, tuple[float, dict[str, StageRecord]]] = {}  # stage -> (when, records) from the coordinator

    def learn(self, stage: int, records: dict[str, StageRecord]) -> None:
        """The coordinator's list of a stage's online peers. While recent, it is what ``replicas``
        returns: the coordinator drops dead peers sooner than DHT records expire, and a peer whose
        DHT view is partitioned (after restarts) still finds the stage."""
        self._told[stage] = (time.monotonic(), records)
        for peer_id, record in records.items():
            self.remember(peer_id, record.maddrs)

    def remember(self, peer_id: str, maddrs: tuple[str, ...] | list[str]) -> None:
        """Where ``peer_id`` can be dialled (the first few addresses), if any are given."""
        if maddrs:
            self.addresses[peer_id] = list(maddrs)[:MAX_ADDRESSES]

    async def announce(self, stage: int, peer_id: str, record: StageRecord) -> None:
        await self.dht.store(stage_key(self.run_id, stage), record.to_value(), get_dht_time() + RECORD_TTL, subkey=peer_id, return_future=True)

    async def withdraw(self, stage: int, peer_id: str) -> None:
        """Replace our record with a tombstone that readers skip."""
        await self.announce(stage, peer_id, StageRecord(leaving=True))

    async def replicas(self, stage: int, max_age: float = 1.0) -> dict[str, StageRecord]:
        """Live records of ``stage`` (peer id -> record): the coordinator's recent list if there is one,
        else the DHT's records, cached for ``max_age`` seconds."""
        told = self._told.get(stage)
        if told and told[1] and time.monotonic() - told[0] < TOLD_MAX_AGE:
            return told[1]
        cached = self._cache.get(stage)
        if cached and time.monotonic() - cached[0] < max_age:
            return cached[1]
        found = await self.dht.get(stage_key(self.run_id, stage), latest=True, return_future=True)
        records: dict[str, StageRecord] = {}
        if found is not None and isinstance(found.value, dict):
            for peer_id, item in found.value.items():
                record = StageRecord.parse(getattr(item, "value", None))
                if not isinstance(peer_id, str) or record is None or not self.is_member(peer_id):
                    self.records_rejected += 1
                    log.debug("dropped a malformed or non-member stage-%d record from the DHT (subkey %r)", stage, peer_id)
                    continue
                if not record.leaving:
                    records[peer_id] = record
                    self.remember(peer_id, record.maddrs)
        self._cache[stage] = (time.monotonic(), records)
        return records
