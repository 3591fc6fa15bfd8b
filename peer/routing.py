"""Which peer of the next stage takes a microbatch: SWARM's stochastic wiring, with bans for failures.

``choose_next_hop`` is a pure function of the candidates' measured throughputs, the bans in
force, the time and an rng. ``Router`` only keeps the bans: a peer whose hop failed is skipped
for 1, 2, 4 ... up to 60 s, and forgiven once a hop to it succeeds. Direct paths are preferred:
a peer reached only through a relay (behind NAT) weighs ``RELAYED_WEIGHT`` of its throughput,
so it still trains, but the relay carries as little as the direct replicas allow.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import AbstractSet, Mapping

BAN_MAX_SECONDS = 60.0
RELAYED_WEIGHT = 0.25


def choose_next_hop(candidates: Mapping[str, float], banned: Mapping[str, float], now: float, rng: random.Random,
                    relayed: AbstractSet[str] = frozenset()) -> str | None:
    """Pick a peer id, weighted by throughput; unmeasured peers weigh as the median (so they get measured).

    ``banned`` maps peer id -> time its ban ends; ``relayed`` peers weigh ``RELAYED_WEIGHT`` as much.
    Returns None when no candidate is usable. Candidates are visited in sorted order so the same rng
    state gives the same choice.
    """
    usable = sorted(p for p in candidates if banned.get(p, 0.0) <= now)
    if not usable:
        return None
    measured = sorted(candidates[p] for p in usable if candidates[p] > 0)
    default = measured[len(measured) // 2] if measured else 1.0
    weights = [(candidates[p] if candidates[p] > 0 else default) * (RELAYED_WEIGHT if p in relayed else 1.0) for p in usable]
    return rng.choices(usable, weights=weights, k=1)[0]


@dataclass
class Router:
    """Chooses the next-stage peer for each hop; bans failures with exponential backoff."""

    rng: random.Random = field(default_factory=random.Random)
    banned: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)

    def choose(self, candidates: Mapping[str, float], relayed: AbstractSet[str] = frozenset()) -> str | None:
        """One of ``candidates`` (peer id -> measured throughput; ``relayed``: those behind NAT), or None if all are banned."""
        return choose_next_hop(candidates, self.banned, time.monotonic(), self.rng, relayed)

    def ban(self, peer_id: str) -> float:
        self.strikes[peer_id] = self.strikes.get(peer_id, 0) + 1
        seconds = min(BAN_MAX_SECONDS, 2.0 ** (self.strikes[peer_id] - 1))
        self.banned[peer_id] = time.monotonic() + seconds
        return seconds

    def succeeded(self, peer_id: str) -> None:
        self.strikes.pop(peer_id, None)
