"""The volunteer's process: join, load the stage, announce it, train rounds, leave cleanly.

Everything runs on one asyncio loop (gRPC client, hivemind P2P handlers, heartbeats); torch
work runs on the stage's single compute thread so the loop stays responsive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc
import hivemind
from hivemind.p2p import PeerID
from safetensors.torch import save as save_safetensors
from tqdm import tqdm
from transformers import GPTJConfig

from proto import PROTOCOL_VERSION, codec
from proto import hometrain_pb2 as pb
from proto.addresses import reachable_maddrs, reachable_url
from proto.manifest import ManifestError, sha256_bytes
from proto.run_config import PeerConfig, TrainConfig
from proto.schedule import resyncs, skips_sync, sync_seed

from .control_client import ControlClient, Stopped, unless_stopped
from .boundary_codec import BoundaryCodec
from .device import DeviceInfo
from .failures import FailureLog, StageFailed, describe
from .metrics import PeerMetrics
from .pipeline import Pipeline, Router, StageDirectory
from .replica_sync import ReplicaSync, SyncError
from .sync_compression import ErrorFeedbackCompressor, SyncCompressionConfig
from .stage_runtime import StageRuntime
from .transport import FrameTransport, WireCounters
from .weights import fetch_checkpoint_tensors

log = logging.getLogger(__name__)

STATE_HANDLER = "hometrain.state"
ANNOUNCE_EVERY = 10.0
STATUS_EVERY = 10.0
UPLOAD_CHUNK = 1 << 20
REPLICA_PASSES = 3          # passes over the stage's replicas for their state before falling back to the checkpoint
REPLICA_RETRY_SECONDS = 2.0
DOWNLOAD_BACKOFF_MAX = 30.0
DROP_LOG_EVERY = 10.0       # seconds between warnings about dropped microbatches (the first is said at once)


class CannotStart(RuntimeError):
    """This peer cannot take part (no weights to load, a port in use); the message says what to do."""


class PeerNode:
    """One peer of a run. ``await run()`` returns an exit code."""

    def __init__(self, config: PeerConfig, device: DeviceInfo) -> None:
        self.config = config
        self.device = device
        self.counters = WireCounters()
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.rounds_seen: dict[str, set] = {"feed": set(), "sync": set(), "upload": set()}
        self.current_round = 0
        self.stage_peers: list[pb.StagePeer] = []  # other online replicas of this stage, from the last round state
        self.throughput = 0.0  # samples per compute-second of this peer's stage (kept across stage moves)
        self.compressor: ErrorFeedbackCompressor | None = None  # cocktail sync: this replica's error feedback
        self._rejoin_lock = asyncio.Lock()
        self.coordinator_host = config.coordinator_host  # where announced loopback addresses really are
        self.client = ControlClient(config.coordinator, self.counters, self.stopping)
        self.drops = 0                   # microbatches this stage-0 peer fed that were dropped
        self._drops_logged = (0.0, 0)    # (when, drops) of the last warning about them
        # Started by run() as it gets to them; _leave() stops those that exist.
        self.dht: hivemind.DHT | None = None
        self.runtime: StageRuntime | None = None
        self.boundary: BoundaryCodec | None = None
        self.metrics: PeerMetrics | None = None
        self.directory: StageDirectory | None = None

    # ------------------------------------------------------------ start

    async def _join(self, requested_stage: int) -> pb.JoinReply:
        request = pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION, join_token=self.config.join_token, name=self.config.name,
            device=self.device.description, free_memory_bytes=self.device.free_memory_bytes,
            throughput=self.throughput, requested_stage=requested_stage,
        )
        return await self.client.join(request, retry_for=self.config.connect_timeout)

    async def run(self) -> int:
        """Join, train until told to stop (or the run ends), leave; returns the exit status."""
        try:
            join = await self._join(self.config.stage)
        except Stopped:
            await self.client.close()
            return 0
        except grpc.aio.AioRpcError as exc:
            log.error("could not join the run at %s: %s", self.config.coordinator, exc.details() or exc.code().name)
            await self.client.close()
            return 1
        try:
            await unless_stopped(self._start(join), self.stopping)  # a long state transfer must not outlast Ctrl-C
            return await self._train()
        except Stopped:
            return 0
        except (CannotStart, ManifestError) as exc:
            log.error("%s", exc)
            return 1
        finally:
            await self._leave()

    async def _start(self, join: pb.JoinReply) -> None:
        """Everything a joined peer runs: DHT node, stage runtime, data-plane handlers, metrics, its weights."""
        self.peer_id, self.stage, self.run_id = join.peer_id, join.stage, join.run_id
        self.public_key = join.checkpoint_public_key
        self.checkpoint_url, self.checkpoint_round = reachable_url(join.checkpoint_url, self.coordinator_host), join.checkpoint_round
        self.heartbeat_interval = join.heartbeat_interval or 2.0
        self.train = TrainConfig.from_json(join.train_config_json)
        model_config = GPTJConfig.from_dict(json.loads(join.model_config_json))
        how = "you asked for it with --stage" if self.config.stage >= 0 else "chosen by the coordinator; --stage N asks for another"
        log.info("joined run %s as %s: stage %d of %d, blocks [%d, %d) (%s)", self.run_id, self.peer_id, self.stage, join.num_stages, join.layer_start, join.layer_end, how)

        initial_peers = list(self.config.initial_peers) or reachable_maddrs(list(join.initial_peers), self.coordinator_host)
        announce = [f"/ip4/{self.config.announce_host}/tcp/{self.config.p2p_port}"] if self.config.announce_host and self.config.p2p_port else None
        state_dir = Path(self.config.state_dir) if self.config.state_dir else None
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
        self.dht = hivemind.DHT(
            initial_peers=initial_peers, start=True, host_maddrs=[f"/ip4/{self.config.host}/tcp/{self.config.p2p_port}"],
            announce_maddrs=announce, await_ready=True,
            identity_path=str(state_dir / "p2p_identity.key") if state_dir is not None else None,
        )
        self.dht_id = self.dht.peer_id.to_base58()
        self.failures = FailureLog(self.dht_id)
        p2p = await self.dht.replicate_p2p()
        self.runtime = StageRuntime(model_config, self.train, join.layer_start, join.layer_end, self.device.device)
        self.transport = FrameTransport(p2p, self.counters)
        self.directory = StageDirectory(self.dht, self.run_id, self.transport.addresses)
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        self.router = Router(self.directory, rng=random.Random(self.dht_id))
        cache_dir = self.config.cache_dir or (str(state_dir / "activation-cache") if state_dir is not None
                                              else tempfile.mkdtemp(prefix="hometrain-aqsgd-"))
        self.boundary = BoundaryCodec(self.train, self.config.activation_cache_mb << 20, cache_dir, self.device.device)
        self.pipeline = Pipeline(self.runtime, self.transport, self.router, self.boundary, self.run_id, self.stage,
                                 self.train.round_timeout, self.failures)
        self.sync = ReplicaSync(self.transport, self.run_id, self.dht_id)
        await self.pipeline.start()
        await self.sync.start()
        await self.transport.serve(STATE_HANDLER, self._serve_state, receive_kind="control", send_kind="state")
        if self.config.metrics_port:
            self.metrics = PeerMetrics(self)
            try:
                self.metrics.start(self.config.metrics_port)
            except OSError as exc:
                self.metrics = None
                raise CannotStart(f"cannot serve metrics on port {self.config.metrics_port} (--metrics-port): {exc.strerror or exc}; "
                                         "pick a free port or 0 to turn metrics off") from None
        await self._load_weights()

    async def _train(self) -> int:
        """Heartbeats, DHT records and the round loop, until the run ends or the peer is told to stop."""
        await self._heartbeat()
        await self._announce()
        self._spawn(self._heartbeat_loop())
        self._spawn(self._announce_loop())
        if not self.config.quiet:
            self._spawn(self._status_loop())
        round_loop = asyncio.ensure_future(self._round_loop())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({round_loop, stop}, return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        if round_loop.done() and not round_loop.cancelled() and round_loop.exception() is not None:
            exc = round_loop.exception()
            if not isinstance(exc, Stopped):
                log.error("training stopped: %s", describe(exc))
                exit_code = 1
        round_loop.cancel()
        stop.cancel()
        return exit_code

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception(), exc_info=task.exception())

    # ------------------------------------------------------------ weights

    async def _load_weights(self) -> None:
        """Current weights from a live replica of the stage, else from the latest checkpoint."""
        self.compressor = None  # error feedback belongs to the weights it was computed on
        # Refuse new microbatches and let those in flight finish: their backward needs the old weights.
        self.runtime.next_round = 0
        deadline = time.monotonic() + self.train.sync_timeout
        while self.runtime.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # A replica may be busy loading too, or just gone with its record not yet expired: a few passes
        # before the checkpoint, since weights older than the stage's send this peer straight back here.
        for attempt in range(REPLICA_PASSES):
            others = await self._state_sources()
            if not others:
                break
            for replica in others:
                try:
                    header, tensors = await self.transport.call(
                        PeerID.from_base58(replica), STATE_HANDLER,
                        pb.FrameHeader(kind=pb.STATE_REQUEST, run_id=self.run_id, stage=self.stage), {},
                        "control", "state", timeout=300,
                    )
                    if header.round <= self.checkpoint_round:
                        log.info("replica %s holds round %d, older than the checkpoint of round %d; trying the next source",
                                 replica[-8:], header.round - 1, self.checkpoint_round)
                        continue
                    extras = json.loads(header.json or "{}")
                    await self.runtime.run(self.runtime.import_state, tensors, extras, header.round)
                    got = await self.runtime.run(self.runtime.checksum)
                    if got != extras.get("checksum"):
                        self.runtime.next_round = 0  # not usable: the next source (or the checkpoint) replaces it
                        raise codec.FrameError(f"state checksum {got[:12]} does not match the {str(extras.get('checksum'))[:12]} the replica sent")
                    log.info("loaded stage %d weights and optimizer state of round %d from replica %s", self.stage, header.round - 1, replica[-8:])
                    return
                except Exception as exc:
                    log.warning("replica %s could not give its state (%s); trying the next source", replica[-8:], exc)
            if attempt + 1 < REPLICA_PASSES:
                await asyncio.sleep(REPLICA_RETRY_SECONDS)
        names = set(self.runtime.weights())
        bars: dict[str, tqdm] = {}

        def progress(shard: str, got: int, total: int) -> None:
            bar = bars.get(shard)
            if bar is None:
                bar = bars[shard] = tqdm(total=total or None, unit="B", unit_scale=True, desc=f"stage {self.stage} weights {shard}",
                                         disable=self.config.quiet or not sys.stderr.isatty(), leave=False)
            bar.update(got - bar.n)

        tensors, round = await self._download(names, progress, bars)
        await self.runtime.run(self.runtime.import_state, tensors, None, round + 1)
        log.info("loaded stage %d weights from the checkpoint of round %d (%s)", self.stage, round, self.checkpoint_url)

    async def _download(self, names: set[str], progress, bars: dict) -> tuple[dict, int]:
        """The stage's tensors from the latest checkpoint, retried with backoff until --connect-timeout."""
        delay, give_up = 1.0, time.monotonic() + self.config.connect_timeout
        while True:
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    None, fetch_checkpoint_tensors, self.checkpoint_url, names, self.public_key, progress)
            except ConnectionError as exc:
                left = give_up - time.monotonic()
                advice = (f"no live replica of stage {self.stage} gave its state, and the checkpoint download failed ({exc}). "
                          f"Check that this machine can reach the coordinator's HTTP port at {self.checkpoint_url} (a firewall?); "
                          "an organiser whose machine is behind NAT or a container network starts it with --announce-host ADDRESS")
                if left < delay:
                    raise CannotStart(f"giving up after --connect-timeout {self.config.connect_timeout:.0f}s: {advice}") from None
                log.warning("%s. Retrying in %.0fs (for another %.0fs, --connect-timeout; Ctrl-C stops)", advice, delay, left)
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                    raise Stopped()
                except asyncio.TimeoutError:
                    pass
                delay = min(2 * delay, DOWNLOAD_BACKOFF_MAX)
            finally:
                for bar in bars.values():
                    bar.close()
                bars.clear()

    async def _state_sources(self) -> list[str]:
        """Replicas to copy the stage's state from: those the coordinator says are at the current
        round first, then the rest it knows, then any the DHT shows (each group shuffled). Those it
        knows to be no newer than the checkpoint are left out: their state would be refused after
        the whole transfer."""
        known = [p for p in self.stage_peers if p.dht_peer_id != self.dht_id]
        current = [p.dht_peer_id for p in known if p.next_round == self.current_round]
        behind = [p.dht_peer_id for p in known if p.next_round != self.current_round and p.next_round > self.checkpoint_round]
        try:
            found = [p for p in await self.directory.replicas(self.stage, max_age=0)
                     if p != self.dht_id and p not in {k.dht_peer_id for k in known}]
        except Exception as exc:
            log.debug("stage directory lookup failed: %s", exc)
            found = []
        for group in (current, behind, found):
            random.shuffle(group)
        return current + behind + found

    async def _move_to(self, stage: int, layer_start: int, layer_end: int) -> None:
        """The coordinator moved this peer to another stage (one was left empty): rebuild and reload."""
        log.warning("the coordinator moved this peer from stage %d to stage %d (blocks [%d, %d))", self.stage, stage, layer_start, layer_end)
        try:
            await self.directory.withdraw(self.stage, self.dht_id)
        except Exception as exc:
            log.debug("withdraw failed: %s", exc)
        old = self.runtime
        async with old.state_lock:
            self.runtime = StageRuntime(old.model.config, self.train, layer_start, layer_end, self.device.device)
            self.runtime.loads = old.loads
            self.stage = stage
            self.pipeline.runtime, self.pipeline.stage = self.runtime, stage
        old.executor.shutdown(wait=False, cancel_futures=True)
        await self._load_weights()
        await self._heartbeat()
        await self._announce()

    async def _serve_state(self, header: pb.FrameHeader, tensors: dict, sender: PeerID) -> tuple[pb.FrameHeader, dict]:
        if header.kind != pb.STATE_REQUEST or header.run_id != self.run_id or header.stage != self.stage:
            raise codec.FrameError(f"this peer serves stage {self.stage} of run {self.run_id}; asked for stage {header.stage} of run {header.run_id!r}")
        if self.runtime.next_round == 0:
            raise codec.FrameError("this peer is still loading its own weights")
        async with self.runtime.state_lock:  # never mid-step: the copy is of one round
            state, extras = await self.runtime.run(self.runtime.export_state)
            extras["checksum"] = await self.runtime.run(self.runtime.checksum)  # the receiver verifies what it loaded
            next_round = self.runtime.next_round
        log.info("sent stage %d state of round %d to %s", self.stage, next_round - 1, sender.to_base58()[-8:])
        return pb.FrameHeader(kind=pb.STATE, run_id=self.run_id, stage=self.stage, round=next_round, json=json.dumps(extras)), state

    # ------------------------------------------------------------ liveness

    def stats(self) -> pb.PeerStats:
        self.throughput = self.runtime.throughput or self.throughput
        c = self.counters
        return pb.PeerStats(
            microbatches_done=self.runtime.microbatches_done, bytes_sent=dict(c.sent), bytes_received=dict(c.received),
            uncompressed_bytes_sent=dict(c.uncompressed_sent), uncompressed_bytes_received=dict(c.uncompressed_received),
            next_round=self.runtime.next_round, throughput=self.throughput, loads=self.runtime.loads,
            link_bytes_per_second=self.transport.link.bytes_per_second, microbatches_failed=self.failures.count,
        )

    async def _send_heartbeat(self) -> pb.HeartbeatReply:
        request = pb.HeartbeatRequest(peer_id=self.peer_id, dht_peer_id=self.dht_id, stats=self.stats(), maddrs=self.maddrs)
        return await self.client.heartbeat(request)

    async def _heartbeat(self) -> None:
        asked_as = self.peer_id
        reply = await self._send_heartbeat()
        if reply.known:
            return
        async with self._rejoin_lock:  # the heartbeat loop and the round loop may both find out; join once
            if self.peer_id != asked_as:
                return
            log.warning("the coordinator does not know this peer any more (it restarted?); joining again")
            join = await self._join(self.stage)
            self.peer_id = join.peer_id
            self.rounds_seen = {kind: set() for kind in self.rounds_seen}
            # Gradients of a round the old coordinator never closed must not leak into the next one.
            await self.runtime.run(self.runtime.restart_at, self.runtime.next_round)
            if join.stage != self.stage:
                await self._move_to(join.stage, join.layer_start, join.layer_end)
                return
            await self._send_heartbeat()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self._heartbeat()
            except Stopped:
                return
            except grpc.aio.AioRpcError as exc:
                log.warning("heartbeat failed: %s", exc.details() or exc.code().name)

    async def _announce(self) -> None:
        info = {"throughput": self.throughput, "next_round": self.runtime.next_round, "name": self.config.name, "maddrs": self.maddrs}
        await self.directory.announce(self.stage, self.dht_id, info)

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(ANNOUNCE_EVERY)
            try:
                await self._announce()
            except Exception as exc:
                log.warning("could not refresh the DHT record: %s", exc)

    async def _status_loop(self) -> None:
        """The volunteer's live line: what this peer is doing, every few seconds."""
        last_time, last_done = time.monotonic(), self.runtime.microbatches_done
        while True:
            await asyncio.sleep(STATUS_EVERY)
            now, done = time.monotonic(), self.runtime.microbatches_done
            rate = (done - last_done) / (now - last_time)
            last_time, last_done = now, done
            try:
                in_stage = len(await self.directory.replicas(self.stage, max_age=STATUS_EVERY))
            except Exception:
                in_stage = 0
            c = self.counters
            failed = f" | {self.failures.count} failed here" if self.failures.count else ""
            log.info(
                "round %d | stage %d | %.2f microbatches/s | up %s down %s | %d peer(s) in stage%s",
                self.current_round, self.stage, rate, human_bytes(sum(c.sent.values())), human_bytes(sum(c.received.values())), in_stage, failed,
            )

    async def _leave(self) -> None:
        """Withdraw from the DHT and tell the coordinator; bounded so Ctrl-C returns within seconds."""
        for task in list(self.tasks):
            task.cancel()
        if self.directory is not None:
            try:
                await asyncio.wait_for(self.directory.withdraw(self.stage, self.dht_id), 2.0)
            except Exception as exc:
                log.debug("withdraw failed: %s", exc)
        try:
            await self.client.leave(pb.LeaveRequest(peer_id=self.peer_id), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            log.debug("leave failed: %s", exc)
        if self.metrics is not None:
            self.metrics.stop()
        await self.client.close()
        if self.dht is not None:
            self.dht.shutdown()
        if self.runtime is not None:
            self.runtime.executor.shutdown(wait=False, cancel_futures=True)
        if self.boundary is not None:
            self.boundary.close()
        log.info("left the run")

    # ------------------------------------------------------------ rounds

    async def _round_loop(self) -> None:
        known_round, known_phase, known_attempt, known_opening = 0, pb.ROUND_PHASE_UNSPECIFIED, 0, 0
        while True:
            try:
                request = pb.RoundStateRequest(peer_id=self.peer_id, known_round=known_round, known_phase=known_phase,
                                               known_sync_attempt=known_attempt, known_open_attempt=known_opening, wait_seconds=10)
                state = await self.client.round_state(request, retry_for=self.config.connect_timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                await self._heartbeat()  # rejoins
                continue
            known_round, known_phase, known_attempt, known_opening = state.round, state.phase, state.sync_attempt, state.open_attempt
            self.current_round = state.round
            self.stage_peers = list(state.stage_peers)
            for other in self.stage_peers:  # dialable even before (or without) the DHT showing their records
                self.directory.remember(other.dht_peer_id, list(other.maddrs))
            self.directory.learn(state.stage + 1, {p.dht_peer_id: {"throughput": p.throughput, "maddrs": list(p.maddrs)}
                                                   for p in state.next_stage_peers})
            if state.checkpoint_url:
                self.checkpoint_url, self.checkpoint_round = reachable_url(state.checkpoint_url, self.coordinator_host), state.checkpoint_round
            if state.phase == pb.STOPPED:
                log.info("the coordinator ended the run (%s)", state.message or "stopped")
                if self.config.serve_after_run:
                    log.info("serving forward-only requests until Ctrl-C (--serve-after-run)")
                    await self.stopping.wait()
                return
            if state.stage != self.stage:
                await self._move_to(state.stage, state.layer_start, state.layer_end)
            elif state.reload_state:
                log.warning("this replica's weights are stale; reloading them")
                await self._load_weights()
                await self._heartbeat()
            elif state.adopt_round and state.adopt_round != self.runtime.next_round:
                log.warning("no replica of stage %d is at round %d: continuing from this peer's weights", self.stage, state.adopt_round)
                await self.runtime.run(self.runtime.restart_at, state.adopt_round)
                await self._heartbeat()
            r = state.round
            if state.phase == pb.OPEN and self.stage == 0 and self.runtime.next_round == r and self._first("feed", (r, state.open_attempt)):
                self._spawn(self._feed_round(r, state.open_attempt))
            elif state.phase == pb.SYNC and state.in_sync_group and self.runtime.next_round == r and self._first("sync", (r, state.sync_attempt)):
                self._spawn(self._sync_and_step(r, list(state.sync_group), state.tokens_in_round, state.sync_attempt, state.open_attempt))
            elif state.phase == pb.PUBLISH and state.upload_checkpoint and self._first("upload", r):
                self._spawn(self._upload(r))

    def _first(self, kind: str, round: int | tuple[int, int]) -> bool:
        seen = self.rounds_seen[kind]
        if round in seen:
            return False
        seen.add(round)
        return True

    async def _feed_round(self, round: int, attempt: int) -> None:
        """Stage 0: pull microbatches for opening ``attempt`` of ``round`` and push them through the pipeline, a few at once."""

        async def worker() -> None:
            while self.runtime.accepts(round, attempt) and not self.stopping.is_set():
                mb = await self.client.microbatch(pb.BatchRequest(peer_id=self.peer_id, round=round, open_attempt=attempt))
                if not mb.available:
                    return
                await self._train_microbatch(mb)

        await asyncio.gather(*(worker() for _ in range(self.train.max_inflight)))

    async def _train_microbatch(self, mb: pb.Microbatch) -> None:
        report = pb.ProgressReport(peer_id=self.peer_id, round=mb.round, microbatch_index=mb.index, open_attempt=mb.open_attempt)
        try:
            batch = {
                "input_ids": codec.from_message(mb.input_ids), "target_ids": codec.from_message(mb.target_ids),
                "loss_mask": codec.from_message(mb.loss_mask), "prefix_lengths": codec.from_message(mb.prefix_lengths),
            }
            header = pb.FrameHeader(kind=pb.FORWARD, run_id=self.run_id, round=mb.round, microbatch=mb.index, stage=0,
                                    sample_ids=mb.sample_ids, open_attempt=mb.open_attempt)
            loss_sum, tokens, _ = await self.pipeline.run_stage(header, batch["input_ids"], batch)
            report.ok, report.loss_sum, report.tokens = True, loss_sum, tokens
        except Exception as exc:
            failure = exc.failure if isinstance(exc, StageFailed) else pb.StageFailure(stage=self.stage, peer=self.dht_id, error=describe(exc))
            report.ok, report.error = False, str(exc) if isinstance(exc, StageFailed) else failure.error
            report.failure.CopyFrom(failure)
            self._log_drop(mb, report.error)
        await self.client.report_progress(report)

    def _log_drop(self, mb: pb.Microbatch, error: str) -> None:
        """Say that microbatches are dropped: the first at once, then at most every DROP_LOG_EVERY seconds."""
        self.drops += 1
        logged_at, logged_drops = self._drops_logged
        now = time.monotonic()
        if logged_drops == 0 or now - logged_at >= DROP_LOG_EVERY:
            more = f" ({self.drops - logged_drops - 1} more since the last warning)" if self.drops - logged_drops > 1 else ""
            log.warning("microbatch %d of round %d dropped%s: %s", mb.index, mb.round, more, error)
            self._drops_logged = (now, self.drops)

    async def _sync_and_step(self, round: int, group: list[str], tokens: int, attempt: int, open_attempt: int) -> None:
        """Close the round locally, sync with the replica group, step, report the checksum.

        Two quantities can be synced. Without compression it is the round's summed gradient:
        every replica applies the same AdamW step to the same weights, exactly the step one
        process would take on the whole batch. With cocktail compression it is the parameter
        delta against the weights the replicas last agreed on (the anchor), as CocktailSGD's
        code does: each replica first steps on its own gradient, then the compressed deltas
        are averaged into the anchor, which is bit-identical on every replica after every
        sync (checksums, checkpoints and hand-offs carry it). Each replica's weights stay the
        anchor plus what its own delta did not send, so its progress is never held back by
        the compression, only shared late (resetting the weights to the anchor instead cost 4
        to 7 more points of loss gap at the same settings of bench/compression.py). Only this
        form survives randomly skipped syncs without a full-precision re-alignment: the local
        steps of skipped rounds are simply part of the next delta. Cocktail's first
        ``sync_warmup_rounds`` rounds sum gradients exactly, the anchor following the weights.

        If the group cannot finish (a member vanished), nothing is applied: the coordinator
        starts another attempt without the missing member, or has this replica reload.
        """
        runtime, train = self.runtime, self.train
        runtime.closed_round = round
        try:  # learn the group's addresses, in case libp2p does not know where a member is
            await self.directory.replicas(self.stage, max_age=5.0)
        except Exception as exc:
            log.debug("stage directory lookup failed: %s", exc)
        deadline = time.monotonic() + train.sync_timeout
        while runtime.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        report = pb.StepReport(peer_id=self.peer_id, round=round, synced=True)
        async with runtime.state_lock:
            # Gradients of an earlier opening of the round (this stage saw none of the last one) are stale.
            await runtime.run(runtime.keep_only_attempt, open_attempt)
            try:
                if train.compresses_sync(round):
                    how = await self._delta_sync(round, group, attempt)
                    report.diverged = how == "skipped"
                else:
                    how = await self._gradient_sync(round, group, tokens, attempt)
                runtime.finish_round(round)
            except SyncError as exc:
                report.synced, report.error, how = False, str(exc), "failed"
                log.warning("round %d: sync (attempt %d) failed: %s", round, attempt + 1, exc)
            report.checksum = await runtime.run(runtime.checksum)
        report.stats.CopyFrom(self.stats())
        await self.client.report_step(report)
        if not self.config.quiet:
            log.info("round %d stepped (%s) checksum %s", round, how, report.checksum[:12])

    async def _gradient_sync(self, round: int, group: list[str], tokens: int, attempt: int) -> str:
        """Exact: sum gradients over the group, divide by the round's tokens, one AdamW step."""
        runtime = self.runtime
        flat = await runtime.run(runtime.flat_gradients)
        summed = flat if len(group) == 1 else await self.sync.all_reduce_sum(flat.cpu(), group, round, self.stage, self.train.sync_timeout, attempt)
        if tokens > 0:
            await runtime.run(runtime.apply_step, summed, tokens)
        else:
            await runtime.run(runtime.discard_gradients)
        if runtime.anchor is not None:  # cocktail's warm-up: the exact weights are what the replicas agree on
            await runtime.run(runtime.reset_anchor)
        return f"group of {len(group)}, {tokens} tokens"

    async def _delta_sync(self, round: int, group: list[str], attempt: int) -> str:
        """Local AdamW step, then (unless this round skips) average compressed parameter deltas."""
        runtime, train = self.runtime, self.train
        if runtime.stepped_round < round:  # a retried attempt must not step twice
            local = runtime.round_tokens
            runtime.unsynced_tokens += local
            if local > 0:
                await runtime.run(runtime.apply_step, await runtime.run(runtime.flat_gradients), local)
            else:
                await runtime.run(runtime.discard_gradients)
            runtime.stepped_round = round
        if len(group) == 1:
            await runtime.run(runtime.reset_anchor)
            return "alone"
        if skips_sync(train.seed, round, self.stage, train.p_skip) and not resyncs(round, train.resync_every):
            return "skipped"
        params = await runtime.run(runtime.flat_params)
        if self.compressor is None or self.compressor.numel != params.numel():
            self.compressor = ErrorFeedbackCompressor(params.numel(), SyncCompressionConfig(train.sync_random_ratio, train.sync_topk_ratio, train.sync_bits))
        seed = sync_seed(train.seed, round, self.stage, attempt)
        # The residual lives in the weights (params - anchor holds it), so the compressor's own stays zero.
        # Deltas are weighted by the tokens behind them: replicas rarely train equal shares of a round.
        mean = await self.sync.all_gather_compressed(params - runtime.anchor, group, round, self.stage, train.sync_timeout, attempt,
                                                     self.compressor, seed, weight=runtime.unsynced_tokens)
        runtime.anchor = runtime.anchor + mean
        await runtime.run(runtime.load_flat_params, runtime.anchor + self.compressor.error)
        self.compressor.error.zero_()
        runtime.unsynced_tokens = 0
        return f"delta sync with {len(group)}"

    async def _upload(self, round: int) -> None:
        async with self.runtime.state_lock:
            weights = await self.runtime.run(lambda: {k: v.detach().cpu().clone() for k, v in self.runtime.agreed_weights().items()})
        payload = save_safetensors(weights)
        digest = sha256_bytes(payload)

        async def chunks():
            for offset in range(0, max(len(payload), 1), UPLOAD_CHUNK):
                chunk = pb.CheckpointChunk(data=payload[offset : offset + UPLOAD_CHUNK])
                if offset == 0:
                    chunk.peer_id, chunk.round, chunk.stage, chunk.sha256, chunk.total_bytes = self.peer_id, round, self.stage, digest, len(payload)
                yield chunk

        reply = await self.client.upload_checkpoint(chunks(), len(payload))
        if not reply.accepted:
            log.warning("checkpoint upload for round %d refused: %s", round, reply.message)



def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
