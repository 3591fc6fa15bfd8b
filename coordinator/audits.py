"""Judging forward audits (``peer.audit``): who was on routes whose two losses for one microbatch disagreed.

A stage-0 peer reports, with its step report, microbatches it trained along one route (first) and
ran forward again along a second that kept off the first one's peers where it could. The
coordinator judges each pair itself (``TrainConfig.losses_agree``) and tallies, per peer and per
position (first route: training frames; second: audit frames, which a peer can tell apart), the
audits that agreed and that disagreed. A peer on the same stage of both routes is compared with
itself, so the audit says nothing of it; nor does it of its reporter (a bad stage-0 peer cannot
vouch for itself, and an honest one's own routes would only blur the tally).

A bad peer that corrupts what it computes in one position is on a disagreeing audit every time
it is there and never on an agreeing one; an honest peer disagrees only when a bad one shares the
audit. So a peer is flagged (out of routing and syncs) once, in one position, it was on
``FLAG_AFTER`` disagreeing audits and no agreeing one, while two or more other replicas of its
stage were on agreeing ones in that position. With 2 replicas of a stage every audit pits one
against the other: a bad one that lies in the second position would take the honest one down
with it, so neither is flagged (as with robust aggregation, 3 replicas are needed). An honest
peer among 3 or more is flagged only if its first ``FLAG_AFTER`` audits in a position all shared
a bad peer: with one bad replica of 3, at most 2^-FLAG_AFTER (1.6%) per position. Routes are as the peers on
them said (each names itself in its reply): a bad peer could name another in its place, but the
peer it names also takes part in audits that agree, which clears it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

from proto import hometrain_pb2 as pb
from proto.run_config import TrainConfig

FLAG_AFTER = 6          # disagreeing audits in one position (and no agreeing one) before a peer is flagged
MAX_AUDITS_READ = 16    # audits read from one step report
POSITIONS = ("first", "second")


@dataclass(frozen=True)
class Verdict:
    agreed: bool
    concerned: tuple[tuple[str, str], ...]  # (DHT id, position) of the peers it says something of


def judge(audit: pb.Audit, train: TrainConfig, reporter: str) -> Verdict | None:
    """The audit's verdict, and whom it concerns where; None when its routes are not comparable (unequal lengths, empty)."""
    first, second = list(audit.first_route), list(audit.second_route)
    if not first or len(first) != len(second):
        return None
    agreed = train.losses_agree(audit.first_loss, audit.first_tokens, audit.second_loss, audit.second_tokens)
    concerned = {(p, position) for a, b in zip(first, second) if a != b for p, position in ((a, "first"), (b, "second")) if p != reporter}
    return Verdict(agreed, tuple(sorted(concerned)))


def tally_key(position: str, agreed: bool) -> str:
    return f"{position}_{'agreed' if agreed else 'disagreed'}"


def to_flag(tallies: dict[str, dict[str, int]], stage_of: Callable[[str], int | None]) -> dict[str, str]:
    """DHT id -> the position in which it was on FLAG_AFTER or more disagreeing audits and no agreeing one, while at least
    two other replicas of its stage were on agreeing ones there."""
    out = {}
    for position in POSITIONS:
        vouched = Counter(stage_of(p) for p, t in tallies.items() if t.get(tally_key(position, True), 0) > 0)
        for p, t in tallies.items():
            if (p not in out and t.get(tally_key(position, False), 0) >= FLAG_AFTER and not t.get(tally_key(position, True), 0)
                    and stage_of(p) is not None and vouched[stage_of(p)] >= 2):
                out[p] = position
    return out
