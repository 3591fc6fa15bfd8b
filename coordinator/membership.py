"""Who is in the run: peers, their stage, state, liveness and reported statistics."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from proto import hometrain_pb2 as pb

from .assignment import Replica, StageNeeds, choose_stage, plan_rebalance

GRACE_CAP = 3           # a short stage is refilled after at most this many graces, joins or not
MAX_MADDRS = 8          # addresses kept per peer (the rest are dropped)
MAX_MADDR_CHARS = 256
MEMBERS_REFRESH = 0.5   # seconds a computed member set is reused
EXPIRE_EVERY = 0.25     # seconds between walks of the table for silent peers (the engine ticks on every report)
RETIRE_AFTER = 300.0    # seconds a departed peer's record stays on the table (and the status page) before only its totals do
OBSERVER_SECONDS = 600.0  # how long an observer (Observe) stays a member of the data plane
MAX_OBSERVERS = 64        # the oldest is dropped beyond this


@dataclass
class PeerRecord:
    """The coordinator's view of one peer."""

    peer_id: str
    name: str
    device: str
    dht_peer_id: str             # empty until the first heartbeat after the peer's DHT started
    stage: int
    requested_stage: int = -1    # the --stage it asked for (-1: none): such a peer is never moved to another stage
    state: int = pb.JOINING
    joined: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    next_round: int = 0          # round its weights are ready to accumulate (0: still loading)
    throughput: float = 0.0
    free_memory: int = 0         # bytes free on its device at Join (0: not reported)
    bandwidth: float = 0.0       # bytes/s its link carried in large transfers (0: not measured yet)
    maddrs: list[str] = field(default_factory=list)  # where other peers can dial it
    reachability: str = ""       # "direct" or "relayed" (behind NAT), as the peer reports it; "": not yet known
    loads: int = 0               # weight loads the peer has completed
    reload_below: int = 0        # the peer must reload until it reports more loads than this
    adopt_round: int = 0         # nonzero: the peer is told to continue as of this round
    microbatches_done: int = 0
    microbatches_failed: int = 0  # its own stage's work raised on these
    audits_dropped: int = 0       # stage 0: forward audits it could not run
    last_heartbeat: float = 0.0   # when its last Heartbeat RPC arrived (0: none yet)
    heartbeat_gap_max: float = 0.0  # the longest time between two of its heartbeats: a peer whose loop stalls shows it
    heartbeat_timeout: float = 0.0  # silent this long, it is gone (0: the run's --heartbeat-timeout; paced peers get longer)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)
    uncompressed_sent: dict[str, int] = field(default_factory=dict)
    uncompressed_received: dict[str, int] = field(default_factory=dict)
    credential_digest: str = ""   # sha256 of the credential its Join returned (never shown)
    token_id: str = ""            # the join token it joined with ("": an open run); revoking it removes the peer
    flagged: str = ""             # why its replicas distrust it (robust aggregation, audits); a flagged peer gets no work
    audits: dict[str, int] = field(default_factory=dict)  # forward audits it was on, by position and verdict (coordinator.audits)

    @property
    def alive(self) -> bool:
        return self.state in (pb.JOINING, pb.ONLINE)

    def as_json(self) -> dict:
        return {
            "id": self.peer_id,
            "p2p_id": self.dht_peer_id,
            "reachability": self.reachability or None,
            "flagged": self.flagged or None,
            "token": self.token_id or None,  # the id of the join token it joined with (coordinator token list/revoke), not the token
            "audits": dict(self.audits),
            "audits_dropped": self.audits_dropped,
            "name": self.name,
            "stage": self.stage,
            "device": self.device,
            "state": pb.PeerState.Name(self.state).lower(),
            "last_seen": self.last_seen,
            "joined": self.joined,
            "next_round": self.next_round,
            "throughput": self.throughput,
            "free_memory": self.free_memory,
            "link_bytes_per_second": self.bandwidth,
            "microbatches": self.microbatches_done,
            "microbatches_failed": self.microbatches_failed,
            "heartbeat_gap_max": self.heartbeat_gap_max,
            "bytes_sent": dict(self.bytes_sent),
            "bytes_received": dict(self.bytes_received),
        }


class Membership:
    """The peer table. Mutated only on the coordinator's event loop."""

    def __init__(self, num_stages: int, heartbeat_timeout: float, needs: list[StageNeeds] | None = None,
                 heartbeat_interval: float = 2.0, heartbeat_rate: float = 0.0) -> None:
        self.num_stages = num_stages
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_rate = heartbeat_rate  # heartbeats/s the whole swarm may send (0: unpaced)
        self.live_count = 0  # counted up at add(), recounted by each walk of expire(): a heartbeat must not walk the table
        self.needs = needs  # per stage: memory and link bytes per sample of one replica (None: not considered)
        self.peers: dict[str, PeerRecord] = {}     # present: joining or online (a departure moves out at the next expire())
        self.departed: dict[str, PeerRecord] = {}  # left or gone, kept RETIRE_AFTER seconds for the status page
        self.short_since: dict[int, float] = {}  # stage -> when it fell below the replicas it needs
        self.last_join = 0.0
        self.extra_members: list[str] = []  # libp2p ids that are members without a record (the coordinator's own node)
        self.observers: dict[str, tuple[float, str]] = {}  # libp2p id -> (member until, monotonic; the token it came with)
        self.token_revoked: Callable[[str], bool] = lambda token_id: False
        self.members_epoch = 0
        self._members: tuple[str, ...] = ()
        self._members_at = float("-inf")
        self._expired_at = float("-inf")
        self.retired = 0  # departed peers whose records were folded into the totals below
        self.retired_audits_dropped = 0
        self.retired_wire: dict[str, dict[str, dict[str, int]]] = {"sent": {}, "received": {}}

    def add(self, name: str, device: str, throughput: float, requested_stage: int, free_memory: int = 0,
            credential_digest: str = "", token_id: str = "") -> PeerRecord:
        """Admit a peer to the stage the policy picks; ValueError if its memory fits no stage."""
        newcomer = Replica(-1, throughput, free_memory)
        stage = choose_stage([_replica(p) for p in self.live()], self.num_stages, requested_stage, newcomer, self.needs)
        record = PeerRecord(uuid.uuid4().hex[:12], name, device, "", stage, requested_stage=requested_stage, throughput=throughput,
                            free_memory=free_memory, credential_digest=credential_digest, token_id=token_id)
        self.peers[record.peer_id] = record
        self.live_count += 1
        self.last_join = time.time()  # peers are arriving: give those that may be on their way the grace again
        return record

    def get(self, peer_id: str) -> PeerRecord | None:
        record = self.peers.get(peer_id)
        return record if record is not None and record.alive else None

    def member_ids(self, now: float, fresh: bool = False) -> tuple[int, tuple[str, ...]]:
        """(epoch, sorted libp2p ids of live peers): the data plane's member set. Recomputed at most every
        MEMBERS_REFRESH seconds (a heartbeat must not walk the whole table) unless ``fresh``; the epoch grows when the set changes."""
        if fresh or now - self._members_at >= MEMBERS_REFRESH:
            self.observers = {k: v for k, v in self.observers.items() if v[0] > now and not (v[1] and self.token_revoked(v[1]))}
            ids = tuple(sorted({p.dht_peer_id for p in self.live() if p.dht_peer_id} | set(self.extra_members) | set(self.observers)))
            if ids != self._members:
                self._members, self.members_epoch = ids, self.members_epoch + 1
            self._members_at = now
        return self.members_epoch, self._members

    def observe(self, dht_peer_id: str, token_id: str, now: float) -> float:
        """Make ``dht_peer_id`` a data-plane member for OBSERVER_SECONDS without a stage; returns the seconds."""
        self.observers.pop(dht_peer_id, None)
        while len(self.observers) >= MAX_OBSERVERS:
            self.observers.pop(next(iter(self.observers)))
        self.observers[dht_peer_id] = (now + OBSERVER_SECONDS, token_id)
        self._members_at = float("-inf")  # recomputed at the next heartbeat
        return OBSERVER_SECONDS

    def live(self) -> list[PeerRecord]:
        return [p for p in self.peers.values() if p.alive]

    def online(self, stage: int | None = None) -> list[PeerRecord]:
        """Peers that train (flagged ones do not: they are out of routing and sync groups)."""
        return [p for p in self.peers.values() if p.state == pb.ONLINE and not p.flagged and (stage is None or p.stage == stage)]

    def expire(self, now: float) -> list[PeerRecord]:
        """Mark peers silent for longer than the heartbeat timeout as gone; return them. Walks the table at most every
        EXPIRE_EVERY seconds: timeouts are seconds long, and with 1,000 peers a walk on every report costs more than the reports."""
        if now - self._expired_at < EXPIRE_EVERY:
            return []
        self._expired_at = now
        live = self.live()
        gone = [p for p in live if now - p.last_seen > (p.heartbeat_timeout or self.heartbeat_timeout)]
        for p in gone:
            p.state = pb.GONE
        self.live_count = len(live) - len(gone)
        if len(self.peers) > self.live_count:
            for record in [p for p in self.peers.values() if not p.alive]:
                self.departed[record.peer_id] = self.peers.pop(record.peer_id)
        if self.departed:
            self._retire(now)
        return gone

    def _retire(self, now: float) -> None:
        """Fold the records of peers that left or went silent more than RETIRE_AFTER seconds ago into totals: in an open
        run volunteers come and go for weeks, and the status page would otherwise list every one of them."""
        for record in [p for p in self.departed.values() if now - p.last_seen > RETIRE_AFTER]:
            del self.departed[record.peer_id]
            self.retired += 1
            self.retired_audits_dropped += record.audits_dropped
            for direction, totals in self.retired_wire.items():
                _add_wire(totals, record, direction)

    def records(self) -> list[PeerRecord]:
        """Every record on the table: present peers, then those departed in the last RETIRE_AFTER seconds."""
        return [*self.peers.values(), *self.departed.values()]

    def paced(self) -> tuple[float, float]:
        """(interval, timeout) in force: the run's interval, stretched so the whole swarm sends at most --heartbeat-rate
        beats a second, and the run's timeout stretched by the same factor, so pacing never makes a peer look gone."""
        interval = self.heartbeat_interval
        if self.heartbeat_rate > 0:
            interval = max(interval, self.live_count / self.heartbeat_rate)
        return interval, self.heartbeat_timeout * interval / self.heartbeat_interval

    def pace(self, record: PeerRecord) -> float:
        """Seconds until ``record``'s next heartbeat; its timeout is the paced one told with it."""
        interval, record.heartbeat_timeout = self.paced()
        return interval

    def update_stats(self, record: PeerRecord, stats: pb.PeerStats, dht_peer_id: str, maddrs: Sequence[str] = (),
                     reachability: str = "") -> None:
        record.last_seen = time.time()
        if dht_peer_id and dht_peer_id != record.dht_peer_id:
            # A peer restarted with its --state-dir keeps its DHT identity: its old record is that same node.
            for other in self.live():
                if other is not record and other.dht_peer_id == dht_peer_id:
                    other.state = pb.GONE
        record.dht_peer_id = dht_peer_id or record.dht_peer_id
        record.maddrs = [m for m in maddrs if len(m) <= MAX_MADDR_CHARS][:MAX_MADDRS] or record.maddrs
        if reachability in ("direct", "relayed"):
            record.reachability = reachability
        reloaded = stats.loads > record.loads  # its weights changed under it: its round may have gone back
        record.loads = stats.loads
        if record.state == pb.JOINING and record.dht_peer_id and stats.next_round > 0 and stats.loads > record.reload_below:
            record.state = pb.ONLINE
            record.next_round = stats.next_round
        elif record.state == pb.ONLINE and (stats.next_round > record.next_round or reloaded):
            # Forwards (it adopted a round) always; backwards only after a reload, never on a late heartbeat.
            record.next_round = stats.next_round
        if record.adopt_round and stats.next_round == record.adopt_round:
            record.adopt_round = 0  # the peer confirmed it continues as of that round
        record.throughput = stats.throughput or record.throughput
        record.bandwidth = stats.link_bytes_per_second or record.bandwidth
        record.microbatches_done = stats.microbatches_done
        record.microbatches_failed = stats.microbatches_failed
        record.audits_dropped = stats.audits_dropped
        record.bytes_sent = dict(stats.bytes_sent)
        record.bytes_received = dict(stats.bytes_received)
        record.uncompressed_sent = dict(stats.uncompressed_bytes_sent)
        record.uncompressed_received = dict(stats.uncompressed_bytes_received)

    def heard(self, record: PeerRecord, now: float) -> None:
        """A heartbeat arrived: note the gap since the last one."""
        if record.last_heartbeat:
            record.heartbeat_gap_max = max(record.heartbeat_gap_max, now - record.last_heartbeat)
        record.last_heartbeat = now

    def require_reload(self, record: PeerRecord) -> None:
        """The peer's weights are wrong: it goes back to JOINING until it has loaded them again."""
        record.state = pb.JOINING
        record.next_round = 0
        record.reload_below = record.loads
        record.adopt_round = 0

    def move(self, record: PeerRecord, stage: int) -> None:
        """Reassign the peer to ``stage``; it loads that stage's weights and comes back online."""
        record.stage = stage
        self.require_reload(record)

    def rebalance(self, min_replicas: int = 1, grace: float = 0.0, now: float | None = None) -> tuple[PeerRecord, int, int] | None:
        """Move a peer into a stage that has had fewer than ``min_replicas`` (at least one) for ``grace`` seconds;
        returns (peer, from, to) or None. The grace lets peers that are still starting join the stage they ask for
        (a move at once could leave their own stage short in turn); peers that asked for a stage are not moved."""
        now = time.time() if now is None else now
        live = self.live()
        counts = dict.fromkeys(range(self.num_stages), 0)
        for p in live:
            counts[p.stage] += 1
        for k, n in counts.items():
            if n >= max(1, min_replicas):
                self.short_since.pop(k, None)
            else:
                self.short_since.setdefault(k, now)
        # Due: short for the grace since the later of falling short and the last join, and never short for more than
        # GRACE_CAP graces whatever joins (a stream of joiners elsewhere must not hold a refill off for ever).
        due = sorted((k for k, since in self.short_since.items()
                      if now - max(since, self.last_join) >= grace or now - since >= GRACE_CAP * grace),
                     key=lambda k: (counts[k], k))  # the emptiest first
        if not due:
            return None
        live.sort(key=lambda p: p.peer_id)  # a plan that does not depend on arrival order
        pinned = {p.peer_id for p in live if p.requested_stage >= 0}
        plan = plan_rebalance([(p.peer_id, _replica(p)) for p in live], self.num_stages, self.needs, min_replicas, due, pinned)
        if plan is None:
            return None
        record = self.peers[plan[0]]
        origin = record.stage
        self.move(record, plan[1])
        self.short_since.pop(plan[1], None)  # counted afresh from its new replica count
        return record, origin, plan[1]

    def wire_totals(self, direction: str = "sent") -> dict[str, dict[str, int]]:
        """Bytes every peer ever seen reported, by kind, beside their fp32 equivalent (retired records included)."""
        totals = {kind: dict(counts) for kind, counts in self.retired_wire[direction].items()}
        for p in self.records():
            _add_wire(totals, p, direction)
        return totals

    def counts(self) -> dict[tuple[int, str], int]:
        """Peers per (stage, state name) for metrics."""
        out: dict[tuple[int, str], int] = {}
        for p in self.records():
            key = (p.stage, pb.PeerState.Name(p.state).lower())
            out[key] = out.get(key, 0) + 1
        return out


def _add_wire(totals: dict[str, dict[str, int]], record: PeerRecord, direction: str) -> None:
    """Add ``record``'s byte counters of ``direction`` ("sent" or "received") to ``totals`` (kind -> bytes, uncompressed_bytes)."""
    actual, plain = (record.bytes_sent, record.uncompressed_sent) if direction == "sent" else (record.bytes_received, record.uncompressed_received)
    for key, counts in (("bytes", actual), ("uncompressed_bytes", plain)):
        for kind, n in counts.items():
            totals.setdefault(kind, {"bytes": 0, "uncompressed_bytes": 0})[key] += n


def _replica(record: PeerRecord) -> Replica:
    return Replica(record.stage, record.throughput, record.free_memory, record.bandwidth)
