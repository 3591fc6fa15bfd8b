"""The round state machine: WAITING -> OPEN -> SYNC -> (PUBLISH) -> next round.

One round is one optimizer step of the global batch. The engine hands microbatches to
stage-0 peers, counts what the pipeline finished or dropped, closes the round when the
target is reached or its deadline passes, tells each stage's replicas who averages with whom
and by how many tokens to divide, collects their post-step checksums, records the round in
the store and, every ``checkpoint_every`` rounds, gathers every stage's tensors into a
published checkpoint. All mutation happens on one asyncio loop; peers long-poll for changes.

A round that trained nothing (every microbatch failed, or none finished in time) is not a
round: nothing is synced or recorded, the engine says that training is stalled and why (the
error, and the stage and peer it came from), waits (1, 2, 4 ... up to 60 s) and opens the same
round again (its next "opening"; frames and reports carry which). So a swarm that cannot
train neither burns round numbers nor hides it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from proto import NO_GRADIENT, codec
from proto import hometrain_pb2 as pb
from proto.run_config import CoordinatorConfig
from proto.schedule import learning_rate

from .membership import Membership, PeerRecord

STALL_BACKOFF_MAX = 60.0


@dataclass
class Failure:
    """The latest microbatch that failed, and where (the stage and peer whose work raised, when known)."""

    round: int
    microbatch: int
    error: str
    stage: int | None          # None: the reporting stage-0 peer could not tell
    peer: str                  # coordinator id of the peer it came from ("" if unknown)
    name: str
    reported_by: str
    time: float

    def describe(self) -> str:
        where = f"stage {self.stage}" if self.stage is not None else "somewhere in the pipeline"
        who = f", peer {self.name or self.peer}" if self.peer else ""
        return f"{where}{who}: {self.error}"


@dataclass
class Stall:
    """Openings of the current round in a row that trained nothing."""

    round: int
    attempts: int
    since: float
    retry_at: float
    cause: str
from .data.accounting import DataAccounting
from .data.batch import MicrobatchInfo
from .data.mixer import DataMixer
from .store import RoundRecord, Store
from .loss_scale import STORE_KEY as LOSS_SCALE_KEY
from .loss_scale import DynamicLossScale
from .audits import MAX_AUDITS_READ, judge, tally_key, to_flag
from .uploads import PARTS, WEIGHTS, UploadError, check_shard, expected_bytes

log = logging.getLogger(__name__)


@dataclass
class OpenRound:
    """Book-keeping of the round in progress."""

    number: int
    started: float
    target: int                                          # microbatches to train
    next_index: int = 0                                  # next microbatch to hand out
    in_flight: dict[int, str] = field(default_factory=dict)  # index -> stage-0 peer id
    done: int = 0
    dropped: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    samples: int = 0
    closed_at: float | None = None
    groups: dict[int, list[str]] = field(default_factory=dict)  # stage -> DHT ids averaging together
    members: dict[str, int] = field(default_factory=dict)       # coordinator peer id -> stage
    step_reports: dict[str, pb.StepReport] = field(default_factory=dict)
    uploaders: dict[int, str] = field(default_factory=dict)     # stage -> peer id asked to upload
    uploads: dict[int, Path] = field(default_factory=dict)             # stage -> its checked weights shard, spooled
    optimizer_uploads: dict[int, Path] = field(default_factory=dict)   # stage -> its optimizer state shard
    publish_started: float | None = None
    sync_attempt: int = 0                                        # bumped when a stage must average again
    deadline: float = 0.0                                        # seconds after `started` the round closes
    tokens_before: int = 0                                       # loss tokens trained before this round: picks the data phase
    infos: dict[int, MicrobatchInfo] = field(default_factory=dict)  # index -> where its samples came from (in flight)
    loss_tokens: dict[int, int] = field(default_factory=dict)  # index -> loss tokens it holds (in flight): what a report may claim
    agreed: dict[int, str] = field(default_factory=dict)  # stage -> the checksum its synced replicas agreed on (the majority)
    suspicions: dict[str, set[str]] = field(default_factory=dict)  # DHT id -> peer ids of the replicas that named it a suspect
    attempt: int = 0                                             # which opening of the round (it opens again after training nothing)
    failed: int = 0                                              # microbatches reported failed (a subset of dropped)
    squared_norms: dict[str, float] = field(default_factory=dict)  # peer id -> its gradient's squared norm (global clipping)
    clip: pb.ClipReply | None = None                               # the round's clip factor, once decided


class RoundEngine:
    """Owns the round lifecycle; the gRPC service and the HTTP page call into it."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: Store,
        data: DataMixer,
        membership: Membership,
        publish: Callable[..., None],
        layer_ranges: list[tuple[int, int]],
        stage_shapes: list[dict[str, tuple[int, ...]]] | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self.stage_shapes = stage_shapes or [{} for _ in layer_ranges]  # what each stage's checkpoint shard holds
        self.spool_dir = spool_dir
        self.loss_scale = (DynamicLossScale.from_json(store.get_meta(LOSS_SCALE_KEY), config.micro_batch_size * config.seq_len)
                           if config.compute_dtype == "float16" else None)
        self.config = config
        self.train = config.train_config()  # what peers train with (the decay's horizon resolved)
        self.layer_ranges = layer_ranges
        self.store = store
        self.data = data
        self.membership = membership
        self._publish = publish
        self.phase = pb.WAITING
        self.round = store.last_round() + 1
        self.current: OpenRound | None = None
        self.changed = asyncio.Condition()
        self._tick_lock = asyncio.Lock()  # one transition at a time: publishing awaits, other ticks must wait
        self.waiting_reason = "starting"
        self.on_round_recorded: list[Callable[[RoundRecord], None]] = []
        self.on_sample_dropped: list[Callable[[int], None]] = []
        self.recent_open_seconds: deque[float] = deque(maxlen=10)  # how long recent rounds took to train
        self.version = 0  # bumped by every change peers must see (_notify): wakes their long polls
        self.latest_checkpoint: tuple[str, int] = ("", 0)  # (url, round), set by the app
        self.max_sync_attempts = 3
        self.audit_verdicts = {True: 0, False: 0}  # forward audits judged, by whether their losses agreed
        self.accounting = DataAccounting(store, data) if data is not None else None
        if self.accounting is not None:
            self.on_round_recorded.append(lambda record: self.accounting.save())
        self.open_attempt = 0                        # openings of self.round so far, minus one
        self.stall: Stall | None = None              # set while rounds train nothing
        self.last_failure: Failure | None = None     # the latest microbatch failure, stalled or not
        self.gave_up = False                         # --stall-limit reached: the run stopped
        self.on_failure: list[Callable[[Failure], None]] = []

    # ------------------------------------------------------------ state changes

    async def _notify(self) -> None:
        """Wake every long-polling peer: the one way a change reaches them."""
        self.version += 1
        async with self.changed:
            self.changed.notify_all()

    async def _set_phase(self, phase: int) -> None:
        self.phase = phase
        await self._notify()

    async def tick(self) -> None:
        """Advance the state machine; called a few times a second and after every report."""
        async with self._tick_lock:
            await self._tick()

    async def _tick(self) -> None:
        now = time.time()
        for gone in self.membership.expire(now):
            log.warning("peer %s (stage %d) missed its heartbeats for %.0fs: marked gone", gone.peer_id, gone.stage,
                        gone.heartbeat_timeout or self.config.heartbeat_timeout)
            self.drop_in_flight_of(gone.peer_id)
        if self.phase == pb.STOPPED:
            return
        if self.phase in (pb.WAITING, pb.OPEN):
            await self._rebalance()
        if self.phase == pb.WAITING:
            await self._maybe_open(now)
        elif self.phase == pb.OPEN:
            await self._maybe_close(now)
        elif self.phase == pb.SYNC:
            await self._maybe_finish_sync(now)
        elif self.phase == pb.PUBLISH:
            await self._maybe_finish_publish(now)

    async def _rebalance(self) -> None:
        moved = self.membership.rebalance(self.config.min_replicas, self.config.heartbeat_timeout)
        if moved is not None:
            record, origin, target = moved
            log.warning("stage %d has had fewer than %d replicas for %.0fs: moving peer %s there from stage %d", target,
                        max(1, self.config.min_replicas), self.config.heartbeat_timeout, record.peer_id, origin)
            await self._notify()

    async def _reconcile(self, now: float) -> None:
        """Line online peers up with the coordinator's round (after restarts, stage refills, missed steps).

        Peers ahead of the coordinator mean it died after they stepped but before it recorded the
        round: those rounds are recorded as recovered (no loss) so no number is reused. In a stage,
        a peer behind the others reloads from them; if nobody in its stage is at the round, the
        most advanced peers adopt the round (their weights are the best the stage has), unless
        the newest checkpoint is more advanced: then they reload (from it) first.
        """
        online = self.membership.online()
        told = False
        ahead = max((p.next_round for p in online), default=0)
        if ahead > self.round:
            for missed in range(self.round, ahead):
                log.warning("round %d was stepped by peers but never recorded (coordinator restart): recorded as recovered", missed)
                self.store.record_round(RoundRecord(missed, None, 0, 0, 0, now, now, [], {}, {"recovered": 1}))
            self.round = ahead
        for stage in range(self.membership.num_stages):
            peers = self.membership.online(stage)
            if not peers or all(p.next_round == self.round for p in peers):
                continue
            at_round = [p for p in peers if p.next_round == self.round]
            # Weights older than the newest checkpoint are not the best the stage has: reload that instead.
            best = max(max(p.next_round for p in peers), self.latest_checkpoint[1] + 1)
            for p in peers:
                if p.next_round == self.round:
                    continue
                if at_round or p.next_round != best:
                    log.warning("peer %s of stage %d is at round %d, not %d: it reloads from a replica", p.peer_id, stage, p.next_round, self.round)
                    self.membership.require_reload(p)
                    told = True
                elif p.adopt_round != self.round:
                    log.warning("stage %d has no replica at round %d: peer %s continues from its round-%d weights", stage, self.round, p.peer_id, p.next_round - 1)
                    p.adopt_round = self.round
                    told = True
        if told:
            await self._notify()

    def _ready_replicas(self, stage: int) -> list[PeerRecord]:
        return [p for p in self.membership.online(stage) if p.next_round == self.round]

    async def _maybe_open(self, now: float) -> None:
        if self.config.rounds and self.round > self.config.rounds:
            self.waiting_reason = f"finished: {self.config.rounds} rounds trained"
            await self._set_phase(pb.STOPPED)
            return
        if self.stall is not None and now < self.stall.retry_at:
            self.waiting_reason = self._stall_reason(now)
            return
        await self._reconcile(now)
        missing = [k for k in range(self.membership.num_stages) if len(self._ready_replicas(k)) < self.config.min_replicas]
        if missing:
            self.waiting_reason = f"waiting for peers on stage(s) {missing}"
            return
        self.waiting_reason = self._stall_reason(now) if self.stall is not None else ""
        self.current = OpenRound(self.round, now, self.config.microbatches_per_round, deadline=self._deadline(),
                                 tokens_before=self.store.totals()["tokens"], attempt=self.open_attempt)
        again = f" (opening {self.open_attempt + 1}: the last trained nothing)" if self.open_attempt else ""
        log.info("round %d open%s: %d microbatches of %d samples, deadline %.0fs", self.round, again, self.current.target,
                 self.config.micro_batch_size, self.current.deadline)
        await self._set_phase(pb.OPEN)

    # ------------------------------------------------------------ stalls

    def _stall_reason(self, now: float) -> str:
        stall = self.stall
        assert stall is not None
        wait = f"; next try in {stall.retry_at - now:.0f}s" if stall.retry_at > now else "; trying again"
        return f"stalled: round {stall.round} trained nothing {stall.attempts} time(s) in a row ({stall.cause}){wait}"

    async def _stalled(self, cur: OpenRound, now: float) -> None:
        """The opening ``cur`` trained nothing: back off, then open the same round again (or give up)."""
        if self.last_failure is not None and self.last_failure.round == cur.number and cur.failed:
            cause = f"{cur.failed} of {cur.target} microbatches failed; last: {self.last_failure.describe()}"
        else:
            cause = f"no microbatch finished within the round's deadline of {cur.deadline:.0f}s"
        attempts = self.stall.attempts + 1 if self.stall is not None else 1
        backoff = min(STALL_BACKOFF_MAX, 2.0 ** (attempts - 1))
        self.stall = Stall(cur.number, attempts, self.stall.since if self.stall is not None else cur.started, now + backoff, cause)
        self.current = None
        self.open_attempt += 1
        if self.config.stall_limit and attempts >= self.config.stall_limit:
            self.gave_up = True
            self.waiting_reason = f"stopped: round {cur.number} trained nothing {attempts} time(s) in a row (--stall-limit): {cause}"
            log.error("%s", self.waiting_reason)
            await self._set_phase(pb.STOPPED)
            return
        self.waiting_reason = self._stall_reason(now)
        log.error("round %d trained nothing (%s); opening it again in %.0fs", cur.number, cause, backoff)
        await self._set_phase(pb.WAITING)

    def record_failure(self, failure: Failure) -> None:
        self.last_failure = failure
        for callback in self.on_failure:
            callback(failure)

    def _deadline(self) -> float:
        """Adaptive: a multiple of the median recent round, within [deadline_floor, round_timeout]."""
        if not self.recent_open_seconds:
            return self.config.round_timeout
        recent = sorted(self.recent_open_seconds)
        median = recent[len(recent) // 2]
        return min(self.config.round_timeout, max(self.config.deadline_floor, self.config.deadline_factor * median))

    async def _maybe_close(self, now: float) -> None:
        cur = self.current
        assert cur is not None
        finished = cur.done + cur.dropped >= cur.target
        late = now - cur.started > cur.deadline
        if not (finished or late):
            return
        if finished and cur.done:
            self.recent_open_seconds.append(now - cur.started)
        if late and not finished:
            missing = cur.target - cur.done - cur.dropped
            log.warning("round %d deadline (%.0fs) passed with %d microbatches unfinished: dropped", cur.number, cur.deadline, missing)
            cur.dropped += missing
            for _ in range(missing):
                self._notify_dropped(1)
            cur.in_flight.clear()
        if cur.done == 0:
            await self._stalled(cur, now)
            return
        if self.stall is not None:
            log.info("round %d trains again after %d opening(s) that trained nothing", cur.number, self.stall.attempts)
            self.stall = None
        cur.closed_at = now
        for stage in range(self.membership.num_stages):
            group = self._ready_replicas(stage)
            cur.groups[stage] = sorted(p.dht_peer_id for p in group)
            cur.members.update({p.peer_id: stage for p in group})
        await self._set_phase(pb.SYNC)

    async def _maybe_finish_sync(self, now: float) -> None:
        """SYNC ends when every live member reported its step (or the wait ran out): retry, judge, record, go on."""
        cur = self.current
        assert cur is not None and cur.closed_at is not None
        alive_members = [pid for pid in cur.members if self.membership.get(pid) is not None]
        waiting = [pid for pid in alive_members if pid not in cur.step_reports]
        if waiting and now - cur.closed_at < self.config.sync_timeout + 2 * self.config.heartbeat_interval + 5:
            return
        if await self._retry_failed_groups(now):
            return
        checksums = self._judge_replicas(cur)
        self._record_round(cur, now, checksums)
        if not await self._maybe_start_publish(cur, now):
            await self._next_round()

    def _judge_replicas(self, cur: OpenRound) -> dict[str, list[str]]:
        """Who holds the stage's agreed weights after the step (the checksum majority) and who must reload; the
        checksums by stage, of the replicas that synced (skipped syncs differ by design until they re-align)."""
        checksums: dict[str, list[str]] = {}
        for pid, report in sorted(cur.step_reports.items()):
            if report.synced and not report.diverged:
                checksums.setdefault(str(cur.members[pid]), []).append(report.checksum)
        cur.agreed = {int(stage): Counter(sums).most_common(1)[0][0] for stage, sums in checksums.items()}
        for pid, report in cur.step_reports.items():
            record = self.membership.get(pid)
            if record is None:
                continue
            stage_sums = checksums.get(str(cur.members[pid]), [])
            majority = Counter(stage_sums).most_common(1)[0][0] if stage_sums else None
            if report.synced and (report.diverged or report.checksum == majority):
                record.next_round = cur.number + 1
            elif not report.synced and not any(r.synced for p2, r in cur.step_reports.items() if cur.members[p2] == record.stage):
                # Nobody in the stage got through: nobody has newer weights to copy. They stay as they
                # are and the next round's reconcile lets them continue (reloading would fall back to
                # an older checkpoint and throw recent training away).
                log.warning("round %d: no replica of stage %d finished its sync; the stage keeps its weights", cur.number, record.stage)
            else:
                log.warning("peer %s of stage %d diverged in round %d (%s): it reloads its weights", pid, record.stage, cur.number, report.error or "checksum differs")
                self.membership.require_reload(record)
        return checksums

    def _record_round(self, cur: OpenRound, now: float, checksums: dict[str, list[str]]) -> None:
        if self.loss_scale is not None:
            overflow = any(r.overflow for r in cur.step_reports.values())
            if overflow:
                log.warning("round %d: a gradient overflowed at loss scale %g; those steps were skipped and the scale halves", cur.number, self.loss_scale.value)
            self.loss_scale.update(overflow)
            self.store.set_meta(LOSS_SCALE_KEY, self.loss_scale.to_json())
        loss = cur.loss_sum / cur.tokens if cur.tokens else None
        record = RoundRecord(
            round=cur.number, loss=loss, tokens=cur.tokens, samples=cur.samples, dropped=cur.dropped * self.config.micro_batch_size,
            started=cur.started, ended=now, participants=sorted(cur.members), checksums=checksums, bytes=self._byte_totals(),
            diverged_stages=sorted({cur.members[pid] for pid, r in cur.step_reports.items() if r.diverged}),
            lr=learning_rate(self.train, cur.number), grad_norm=cur.clip.norm if cur.clip is not None and math.isfinite(cur.clip.norm) else None,
        )
        self.store.record_round(record)
        for callback in self.on_round_recorded:
            callback(record)
        log.info("round %d done: loss %s, %d tokens, %d dropped, %.2fs", cur.number, f"{loss:.4f}" if loss is not None else "n/a", cur.tokens, cur.dropped, record.duration)

    async def _maybe_start_publish(self, cur: OpenRound, now: float) -> bool:
        """Every --checkpoint-every rounds: ask one current replica per stage for its tensors (PUBLISH)."""
        if cur.number % self.config.checkpoint_every or not cur.tokens:
            return False
        cur.uploaders = {stage: self._uploader(stage, cur) for stage in range(self.membership.num_stages)}
        if not all(cur.uploaders.values()):
            log.warning("round %d: no replica of some stage can upload; checkpoint skipped", cur.number)
            return False
        cur.publish_started = now
        await self._set_phase(pb.PUBLISH)
        return True

    async def _retry_failed_groups(self, now: float) -> bool:
        """A stage none of whose replicas finished averaging (a member died) averages again without the dead."""
        cur = self.current
        assert cur is not None
        retry = []
        for stage in range(self.membership.num_stages):
            members = [pid for pid, s in cur.members.items() if s == stage]
            alive = [pid for pid in members if self.membership.get(pid) is not None]
            if alive and not any(pid in cur.step_reports and cur.step_reports[pid].synced for pid in alive):
                retry.append((stage, alive))
        if not retry or cur.sync_attempt + 1 >= self.max_sync_attempts:
            return False
        cur.sync_attempt += 1
        for stage, alive in retry:
            cur.members = {pid: s for pid, s in cur.members.items() if s != stage or pid in alive}
            cur.groups[stage] = sorted(self.membership.peers[pid].dht_peer_id for pid in alive)
            for pid in alive:
                cur.step_reports.pop(pid, None)
            log.warning("round %d: stage %d averages again (attempt %d) with %d replica(s)", cur.number, stage, cur.sync_attempt + 1, len(alive))
        cur.closed_at = now
        await self._notify()
        return True

    def _uploader(self, stage: int, cur: OpenRound) -> str:
        """A current replica of ``stage``, one holding the agreed checksum if any does (its upload is checked against it)."""
        current = [pid for pid, s in sorted(cur.members.items())
                   if s == stage and (record := self.membership.get(pid)) is not None and record.next_round == cur.number + 1]
        agreed = [pid for pid in current if pid in cur.step_reports and cur.step_reports[pid].checksum == cur.agreed.get(stage)]
        return (agreed or current or [""])[0]

    async def _maybe_finish_publish(self, now: float) -> None:
        cur = self.current
        assert cur is not None and cur.publish_started is not None
        weights_in = len(cur.uploads) >= len(cur.uploaders)
        optimizer_in = len(cur.optimizer_uploads) >= len(cur.uploaders)  # each uploader sends its weights, then its optimizer state
        timed_out = now - cur.publish_started >= self.config.round_timeout
        if not (weights_in and optimizer_in) and not timed_out:
            return
        if not weights_in:
            log.warning("round %d: checkpoint uploads incomplete after %.0fs; skipped", cur.number, self.config.round_timeout)
        else:
            if not optimizer_in:
                log.warning("round %d: optimizer state of stages %s did not arrive within %.0fs; the checkpoint holds weights only",
                            cur.number, sorted(set(cur.uploads) - set(cur.optimizer_uploads)), self.config.round_timeout)
            stages = [cur.uploads[k] for k in range(self.membership.num_stages)]
            optimizer = [cur.optimizer_uploads[k] for k in range(self.membership.num_stages)] if optimizer_in else []
            loss = cur.loss_sum / cur.tokens if cur.tokens else None
            tokens_total = self.store.totals()["tokens"]
            await asyncio.get_running_loop().run_in_executor(None, self._publish, cur.number, tokens_total, loss, stages, optimizer)
        for leftover in (*cur.uploads.values(), *cur.optimizer_uploads.values()):  # what the checkpoint did not take
            leftover.unlink(missing_ok=True)
        await self._next_round()

    async def _next_round(self) -> None:
        self.round += 1
        self.open_attempt = 0
        self.current = None
        await self._set_phase(pb.WAITING)
        await self._maybe_open(time.time())

    async def stop(self) -> None:
        self.waiting_reason = "coordinator shutting down"
        await self._set_phase(pb.STOPPED)

    # ------------------------------------------------------------ peer calls

    def drop_in_flight_of(self, peer_id: str) -> None:
        cur = self.current
        if cur is None or self.phase != pb.OPEN:
            return
        lost = [i for i, pid in cur.in_flight.items() if pid == peer_id]
        for index in lost:
            del cur.in_flight[index]
            cur.dropped += 1
            self._notify_dropped(1)
        if lost:
            log.warning("round %d: %d microbatches of peer %s dropped", cur.number, len(lost), peer_id)

    def _notify_dropped(self, count: int) -> None:
        for callback in self.on_sample_dropped:
            callback(count * self.config.micro_batch_size)

    def next_microbatch(self, peer: PeerRecord, round: int, attempt: int = 0) -> pb.Microbatch:
        cur = self.current
        if (self.phase != pb.OPEN or cur is None or round != cur.number or attempt != cur.attempt or peer.stage != 0
                or peer.next_round != cur.number):
            return pb.Microbatch(available=False, round=self.round)
        if cur.next_index >= cur.target:
            return pb.Microbatch(available=False, round=cur.number)
        index = cur.next_index
        cur.next_index += 1
        cur.in_flight[index] = peer.peer_id
        mb, cur.infos[index] = self.data.microbatch_with_info(cur.number, index, self.config.micro_batch_size, cur.tokens_before)
        cur.loss_tokens[index] = int(mb.loss_mask.sum().item())
        return pb.Microbatch(
            available=True, round=cur.number, index=index, sample_ids=mb.sample_ids, open_attempt=cur.attempt, loss_scale=self.current_loss_scale,
            input_ids=codec.to_message(mb.input_ids), target_ids=codec.to_message(mb.target_ids),
            loss_mask=codec.to_message(mb.loss_mask), prefix_lengths=codec.to_message(mb.prefix_lengths),
        )

    async def report_progress(self, peer: PeerRecord, report: pb.ProgressReport) -> bool:
        cur = self.current
        if (self.phase != pb.OPEN or cur is None or report.round != cur.number or report.open_attempt != cur.attempt
                or cur.in_flight.get(report.microbatch_index) != peer.peer_id):
            return False  # late: the round closed (the sample was counted as dropped then)
        del cur.in_flight[report.microbatch_index]
        info = cur.infos.pop(report.microbatch_index, None)
        handed = cur.loss_tokens.pop(report.microbatch_index, 0)
        if report.ok and not _plausible(report, handed):
            log.warning("round %d: peer %s reported %d loss tokens and loss sum %g for microbatch %d, which holds %d loss tokens: "
                        "the report is refused and the microbatch dropped", cur.number, peer.peer_id, report.tokens, report.loss_sum,
                        report.microbatch_index, handed)
            report = pb.ProgressReport(ok=False, round=report.round, microbatch_index=report.microbatch_index,
                                       error=f"implausible report: {report.tokens} loss tokens claimed, {handed} handed out")
        if report.ok:
            if info is not None:
                self.accounting.count(info)
            cur.done += 1
            cur.loss_sum += report.loss_sum
            cur.tokens += report.tokens
            cur.samples += self.config.micro_batch_size
        else:
            cur.dropped += 1
            cur.failed += 1
            self._notify_dropped(1)
            failure = self._failure(peer, report)
            self.record_failure(failure)
            if cur.failed == 1 or cur.failed == cur.target:
                log.warning("round %d: microbatch %d failed (%s)%s", cur.number, report.microbatch_index, failure.describe(),
                            "; every one of this opening did" if cur.failed == cur.target else "")
        await self.tick()
        return True

    def _failure(self, reporter: PeerRecord, report: pb.ProgressReport) -> Failure:
        """Where a failed microbatch broke: the stage and peer a StageFailure names, else the reporter's word."""
        origin = None
        if report.HasField("failure"):
            origin = next((p for p in self.membership.records() if p.dht_peer_id and p.dht_peer_id == report.failure.peer), None)
        stage = report.failure.stage if report.HasField("failure") else None
        error = (report.failure.error if report.HasField("failure") else report.error) or "no error text"
        return Failure(round=report.round, microbatch=report.microbatch_index, error=error[:500], stage=stage,
                       peer=origin.peer_id if origin else (report.failure.peer[-12:] if report.HasField("failure") else ""),
                       name=origin.name if origin else "", reported_by=reporter.peer_id, time=time.time())

    async def report_step(self, peer: PeerRecord, report: pb.StepReport) -> None:
        cur = self.current
        if self.phase != pb.SYNC or cur is None or report.round != cur.number or peer.peer_id not in cur.members:
            return
        cur.step_reports[peer.peer_id] = report
        if report.suspects:
            self._weigh_suspects(cur, peer, report.suspects)
        if report.audits and cur.members[peer.peer_id] == 0:
            self._weigh_audits(cur, peer, list(report.audits)[:MAX_AUDITS_READ])
        await self.tick()

    def _weigh_audits(self, cur: OpenRound, reporter: PeerRecord, audits: list[pb.Audit]) -> None:
        """A stage-0 peer's forward audits of this round: tally each concerned peer's, and flag the peers
        ``coordinator.audits.to_flag`` names."""
        by_dht = {p.dht_peer_id: p for p in self.membership.live() if p.dht_peer_id}
        for audit in audits:
            verdict = judge(audit, self.train, reporter.dht_peer_id)
            if verdict is None:
                continue
            self.audit_verdicts[verdict.agreed] += 1
            for dht_id, position in verdict.concerned:
                if (record := by_dht.get(dht_id)) is not None:
                    key = tally_key(position, verdict.agreed)
                    record.audits[key] = record.audits.get(key, 0) + 1
        flags = to_flag({d: p.audits for d, p in by_dht.items()}, lambda d: by_dht[d].stage if d in by_dht else None)
        for dht_id, position in flags.items():
            suspect = by_dht[dht_id]
            if not suspect.flagged:
                suspect.flagged = (f"round {cur.number}: on {suspect.audits[tally_key(position, False)]} forward audits whose two losses "
                                   f"disagreed ({position} route) and on none that agreed, while other replicas of its stage were")
                log.warning("peer %s (stage %d) flagged and taken out of routing and syncs: %s", suspect.peer_id, suspect.stage, suspect.flagged)

    def _weigh_suspects(self, cur: OpenRound, reporter: PeerRecord, suspects: list[str]) -> None:
        """A replica named others of its group whose updates its robust aggregation clipped hard. A peer named by a
        majority of the other replicas of its group is flagged: one bad replica cannot get an honest one flagged."""
        group = cur.groups.get(cur.members[reporter.peer_id], [])
        for dht_id in set(suspects):
            if dht_id == reporter.dht_peer_id or dht_id not in group:
                continue
            named_by = cur.suspicions.setdefault(dht_id, set())
            named_by.add(reporter.peer_id)
            suspect = next((p for p in self.membership.live() if p.dht_peer_id == dht_id), None)
            if suspect is None or suspect.flagged or len(named_by) < (len(group) - 1) // 2 + 1:
                continue
            suspect.flagged = (f"round {cur.number}: {len(named_by)} of its {len(group) - 1} fellow replicas found its update far "
                               "from theirs (robust aggregation)")
            log.warning("peer %s (stage %d) flagged and taken out of routing and syncs: %s", suspect.peer_id, suspect.stage, suspect.flagged)

    async def clip_factor(self, peer: PeerRecord, request: pb.ClipRequest) -> pb.ClipReply | str:
        """Global gradient clipping: wait until every stage's squared norm is in (one replica's under exact sync,
        where they are equal; every live replica's when replicas step on their own gradients), then give each
        the same factor, min(1, --clip-grad-norm / (norm + 1e-6)) as torch's clip_grad_norm_. A stage that does
        not report within --sync-timeout is left out, with a warning. Returns why not, as a string, if the
        request is not for the round in sync."""
        cur = self.current
        if self.phase != pb.SYNC or cur is None or request.round != cur.number or peer.peer_id not in cur.members:
            return f"no round is syncing with this peer as round {request.round} (now round {self.round}, {pb.RoundPhase.Name(self.phase)})"
        cur.squared_norms[peer.peer_id] = request.squared_norm
        deadline = time.monotonic() + self.config.sync_timeout
        async with self.changed:
            self.changed.notify_all()  # the other stages' waits (long polls re-check their own condition and sleep on)
            while cur.clip is None and self.current is cur and not self._norms_complete(cur):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self.changed.wait(), left)
                except asyncio.TimeoutError:
                    break
        if self.current is not cur:
            return f"round {request.round} ended before every stage reported its gradient norm"
        if cur.clip is None:
            cur.clip = self._decide_clip(cur)
        return cur.clip

    def _norms_complete(self, cur: OpenRound) -> bool:
        every_replica = self.config.compresses_sync(cur.number)  # local steps: each replica's own gradient
        for stage in range(self.membership.num_stages):
            alive = [pid for pid, s in cur.members.items() if s == stage and self.membership.get(pid) is not None]
            reported = [pid for pid in alive if pid in cur.squared_norms]
            if alive and (len(reported) < len(alive) if every_replica else not reported):
                return False
        return True

    def _decide_clip(self, cur: OpenRound) -> pb.ClipReply:
        """One factor from the stages' squared norms: the mean over each stage's replicas, summed over stages."""
        by_stage: dict[int, list[float]] = {}
        for pid, squared in cur.squared_norms.items():
            if squared != NO_GRADIENT and pid in cur.members:  # a member an averaging retry left out no longer counts
                by_stage.setdefault(cur.members[pid], []).append(squared)
        missing = sorted(set(cur.members.values()) - set(by_stage))
        if missing:
            log.warning("round %d: stage(s) %s reported no gradient norm within --sync-timeout; clipping by the others'", cur.number, missing)
        total = sum(sum(values) / len(values) for values in by_stage.values())
        if not math.isfinite(total):
            log.warning("round %d: a gradient is not finite; no stage steps this round", cur.number)
            return pb.ClipReply(factor=0.0, norm=total, skip=True)
        norm = math.sqrt(total)
        factor = min(1.0, self.config.clip_grad_norm / (norm + 1e-6))
        return pb.ClipReply(factor=factor, norm=norm, skip=False)

    def upload_wanted(self, peer: PeerRecord, round: int, stage: int, part: str, nbytes: int) -> str:
        """"" if ``peer`` may upload ``part`` of ``stage`` for ``round`` now, of ``nbytes``; else why not."""
        cur = self.current
        if self.phase != pb.PUBLISH or cur is None or round != cur.number or cur.uploaders.get(stage) != peer.peer_id or part not in PARTS:
            return f"no upload of stage {stage} ({part!r}) for round {round} was requested from this peer (now round {self.round})"
        limit = expected_bytes(self.stage_shapes[stage], part)
        if nbytes > limit:
            return f"an upload of {nbytes} bytes is more than stage {stage}'s {part} can hold ({limit} bytes)"
        return ""

    def spool_path(self, round: int, stage: int, part: str) -> Path:
        return self.spool_dir / f"round-{round:06d}-stage-{stage}-{part}.safetensors"

    async def accept_upload(self, peer: PeerRecord, round: int, stage: int, part: str, path: Path) -> str:
        """Keep one stage's spooled shard if it is what the stage holds; returns "" if accepted, else why not."""
        cur = self.current
        problem = self.upload_wanted(peer, round, stage, part, 0)
        if not problem:
            try:
                await asyncio.get_running_loop().run_in_executor(None, check_shard, path, part, self.stage_shapes[stage],
                                                                 cur.agreed.get(stage) if part == WEIGHTS else None, self.train.lora_rank > 0)
            except UploadError as exc:
                problem = str(exc)
            # The check takes a while on a large shard: the round may have ended (or a newer one begun) meanwhile.
            problem = problem or ("" if self.current is cur else f"round {round} ended while its upload was checked")
        if problem:
            path.unlink(missing_ok=True)
            return problem
        (cur.uploads if part == WEIGHTS else cur.optimizer_uploads)[stage] = path
        await self.tick()
        return ""

    def round_state_for(self, peer: PeerRecord) -> pb.RoundState:
        a, b = self.layer_ranges[peer.stage]
        state = pb.RoundState(round=self.round, phase=self.phase, stage=peer.stage, layer_start=a, layer_end=b,
                              message=self.waiting_reason, adopt_round=peer.adopt_round, open_attempt=self.open_attempt,
                              loss_scale=self.current_loss_scale,
                              checkpoint_url=self.latest_checkpoint[0], checkpoint_round=self.latest_checkpoint[1])
        for stage, field in ((peer.stage, state.stage_peers), (peer.stage + 1, state.next_stage_peers)):
            others = [p for p in self.membership.online(stage) if p.peer_id != peer.peer_id and p.dht_peer_id]
            for other in sorted(others, key=lambda p: (-p.next_round, p.dht_peer_id)):
                field.add(dht_peer_id=other.dht_peer_id, maddrs=other.maddrs, next_round=other.next_round, throughput=other.throughput)
        cur = self.current
        state.reload_state = peer.state == pb.JOINING and peer.loads > 0 and peer.loads <= peer.reload_below
        if cur is not None and self.phase in (pb.SYNC, pb.PUBLISH):
            state.in_sync_group = peer.peer_id in cur.members
            state.sync_group.extend(cur.groups.get(peer.stage, []))
            state.tokens_in_round = cur.tokens
            state.sync_attempt = cur.sync_attempt
            state.upload_checkpoint = self.phase == pb.PUBLISH and cur.uploaders.get(peer.stage) == peer.peer_id and peer.stage not in cur.uploads
        return state

    @property
    def current_loss_scale(self) -> float:
        return self.loss_scale.value if self.loss_scale is not None else 1.0

    def _attempt(self) -> int:
        return self.current.sync_attempt if self.current is not None else 0

    def stall_status(self, now: float) -> dict | None:
        """JSON for /api/status: why training is stalled and what comes next, or None while it trains."""
        stall = self.stall
        if stall is None:
            return None
        failure = self.last_failure if self.last_failure is not None and self.last_failure.round == stall.round else None
        return {
            "round": stall.round, "attempts": stall.attempts, "since": stall.since, "cause": stall.cause,
            "retry_in_seconds": max(0.0, stall.retry_at - now) if self.phase == pb.WAITING else 0.0,
            "gave_up": self.gave_up, "error": failure.error if failure else None,
            "stage": failure.stage if failure else None, "peer": failure.peer if failure else None,
            "peer_name": failure.name if failure else None,
        }

    def failure_status(self) -> dict | None:
        f = self.last_failure
        if f is None:
            return None
        return {"round": f.round, "microbatch": f.microbatch, "error": f.error, "stage": f.stage, "peer": f.peer,
                "peer_name": f.name, "reported_by": f.reported_by, "time": f.time}

    async def wait_for_change(self, known_round: int, known_phase: int, known_attempt: int, timeout: float, known_opening: int = 0) -> None:
        """Long poll: return when (round, phase, sync attempt, opening) differs from what the caller knows, or on timeout."""
        version = self.version
        known = (known_round, known_phase, known_attempt, known_opening)
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(
                        lambda: (self.round, self.phase, self._attempt(), self.open_attempt) != known or self.version != version
                    ),
                    timeout,
                )
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------ data accounting

    def data_progress(self) -> dict:
        """The data phase in force and the loss tokens trained so far (the open round's finished microbatches included)."""
        cur = self.current
        return self.accounting.progress(cur.tokens_before if cur is not None else self.store.totals()["tokens"])

    # ------------------------------------------------------------ reporting

    def _byte_totals(self) -> dict[str, int]:
        """Flat copy of the sent-byte counters, stored with each round (cumulative; differences give per round)."""
        totals: dict[str, int] = {}
        for kind, value in self.membership.wire_totals("sent").items():
            totals[f"{kind}_sent"] = value["bytes"]
            totals[f"{kind}_uncompressed_sent"] = value["uncompressed_bytes"]
        return totals

    def progress(self) -> dict:
        cur = self.current
        return {
            "round": self.round,
            "phase": pb.RoundPhase.Name(self.phase).lower(),
            "reason": self.waiting_reason,
            "microbatches_target": cur.target if cur else 0,
            "microbatches_done": cur.done if cur else 0,
            "microbatches_dropped": cur.dropped if cur else 0,
            "in_flight": len(cur.in_flight) if cur else 0,
        }


MAX_MEAN_LOSS = 100.0  # nats per token a report may claim: far above any real cross-entropy (ln 50400 = 10.8 at uniform)


def _plausible(report: pb.ProgressReport, handed: int) -> bool:
    """A stage-0 peer's word on a microbatch it fed cannot exceed what the coordinator handed out: its loss tokens
    (they set the gradient divisor) at most the microbatch's, its loss sum finite, non-negative and bounded."""
    return report.tokens <= handed and 0.0 <= report.loss_sum <= MAX_MEAN_LOSS * max(report.tokens, 1)
