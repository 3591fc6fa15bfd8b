"""The volunteer's process, its lifecycle only: join, start, announce, heartbeat, dispatch rounds, leave.

What a round asks of the peer lives elsewhere: feeding and running microbatches in
``peer.pipeline``, syncing with the stage's replicas and stepping in ``peer.replica_sync``,
loading, handing off and uploading weights in ``peer.weights``. Everything runs on one asyncio
loop (gRPC client, hivemind P2P handlers, heartbeats); torch work runs on the stage's compute
thread, so the loop stays responsive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import grpc
import hivemind
from transformers import GPTJConfig

from proto import PROTOCOL_VERSION, codec
from proto import hometrain_pb2 as pb
from proto.addresses import reachable_maddrs, reachable_url, resolve_ipv4
from proto.manifest import ManifestError
from proto.memory_plan import StageShape, fit_advice, plan_settings, plan_stage
from proto.run_config import PeerConfig, TrainConfig

from .compression.boundary import BoundaryCodec
from .control_client import ControlClient, Stopped, unless_stopped
from .coordinator_key import UntrustedCoordinator, trust_coordinator_key
from .device import DeviceInfo
from .directory import StageDirectory, StageRecord
from .failures import FailureLog, StageFailed, describe
from .audit import Auditor
from .inflight import InflightSizer
from .members import Members
from .metrics import PeerMetrics, PeerSnapshot, status_line
from .pipeline import FORWARD_HANDLER, FRAME_SLACK, INFER_HANDLER, Pipeline, boundary_frame_limit
from .reachability import Reachability, StaticRelayP2P, circuit_maddrs, free_port, p2p_options, probe
from .replica_sync import SYNC_HANDLER, Clip, StageSync, SyncError, SyncExchange
from .routing import Router
from .stage_runtime import StageRuntime
from .transport import FrameTransport, WireCounters
from .state_transfer import STATE_HANDLER
from .weights import CannotStart, StageWeights, state_sources

log = logging.getLogger(__name__)

ANNOUNCE_EVERY = 10.0
SYNC_BYTES_PER_PARAMETER = 12  # the most a sync frame spends on one of the stage's parameters (int64 index + fp32 value)
STATUS_EVERY = 10.0
DROP_LOG_EVERY = 10.0       # seconds between warnings about dropped microbatches (the first is said at once)


class PeerNode:
    """One peer of a run. ``await run()`` returns an exit code."""

    def __init__(self, config: PeerConfig, device: DeviceInfo) -> None:
        self.config = config
        self.device = device
        self.counters = WireCounters()
        self.stopping = asyncio.Event()
        self.client = ControlClient(config.coordinator, self.counters, self.stopping, tls_ca=config.tls_ca, tls=config.tls)
        self.coordinator_host = config.coordinator_host  # where announced loopback addresses really are
        self.tasks: set[asyncio.Task] = set()
        self.rounds_seen: dict[str, set] = {"feed": set(), "sync": set(), "upload": set()}
        self._rejoin_lock = asyncio.Lock()
        # The run, as the coordinator describes it (set at Join, updated by round states).
        self.peer_id = ""
        self.run_id = ""
        self.stage = 0
        self.train: TrainConfig | None = None
        self.heartbeat_interval = 2.0
        self.checkpoint: tuple[str, int] = ("", 0)         # latest published (url, round)
        self.current_round = 0
        self.stage_peers: list[pb.StagePeer] = []          # other online replicas of this stage, from the last round state
        self.throughput = 0.0                              # samples per compute-second of this peer's stage (kept across moves)
        self.drops = 0                                     # microbatches this stage-0 peer fed that were dropped
        self._drops_logged = (0.0, 0)                      # (when, drops) of the last warning about them
        # Started by _start() as it gets to them; _leave() stops those that exist.
        self.p2p: StaticRelayP2P | None = None
        self.dht: hivemind.DHT | None = None
        self.dht_id = ""
        self.maddrs: list[str] = []
        self.reach: Reachability | None = None
        self.transport: FrameTransport | None = None
        self.members: Members | None = None
        self.directory: StageDirectory | None = None
        self.failures = FailureLog("")
        self.runtime: StageRuntime | None = None
        self.sync: StageSync | None = None
        self.exchange: SyncExchange | None = None
        self.boundary: BoundaryCodec | None = None
        self.pipeline: Pipeline | None = None
        self.auditor: Auditor | None = None
        self.weights: StageWeights | None = None
        self.metrics: PeerMetrics | None = None
        self._temporary_cache: str | None = None

    # ------------------------------------------------------------ start and stop

    async def _join(self, requested_stage: int) -> pb.JoinReply:
        request = pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION, join_token=self.config.join_token, name=self.config.name,
            device=self.device.description, free_memory_bytes=self.device.free_memory_bytes,
            throughput=self.throughput, requested_stage=requested_stage,
        )
        reply = await self.client.join(request, retry_for=self.config.connect_timeout)
        trust_coordinator_key(reply.checkpoint_public_key, self.config.coordinator, self.config.coordinator_key, self.config.state_dir)
        return reply

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
        except UntrustedCoordinator as exc:
            log.error("%s", exc)
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
        """Everything a joined peer runs: DHT node, data-plane handlers, the stage, metrics, its weights."""
        self.peer_id, self.stage, self.run_id = join.peer_id, join.stage, join.run_id
        self.checkpoint = (reachable_url(join.checkpoint_url, self.coordinator_host), join.checkpoint_round)
        self.heartbeat_interval = join.heartbeat_interval or 2.0
        self.train = TrainConfig.from_json(join.train_config_json)
        self.inflight = InflightSizer(cap=self.train.max_inflight, fixed=self.config.inflight)
        model_config = GPTJConfig.from_dict(json.loads(join.model_config_json))
        how = "you asked for it with --stage" if self.config.stage >= 0 else "chosen by the coordinator; --stage N asks for another"
        log.info("joined run %s as %s: stage %d of %d, blocks [%d, %d) (%s)", self.run_id, self.peer_id, self.stage, join.num_stages,
                 join.layer_start, join.layer_end, how)
        self._check_memory(model_config, join.layer_start, join.layer_end)

        state_dir = Path(self.config.state_dir) if self.config.state_dir else None
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
        bootstrap = list(self.config.initial_peers) or reachable_maddrs(list(join.initial_peers), self.coordinator_host)
        self.reach = await self._reachability()
        # The peer starts its own p2pd (the DHT's process shares it) so that a relayed one gets static relays.
        self.p2p = await StaticRelayP2P.create(
            initial_peers=bootstrap, identity_path=str(state_dir / "p2p_identity.key") if state_dir is not None else None,
            **p2p_options(self.reach, self.config.host, self._announce_ip(), bootstrap),
        )
        self.dht = hivemind.DHT(initial_peers=bootstrap, p2p=self.p2p, client_mode=self.reach.relayed, start=True, await_ready=True)
        self.dht_id = self.dht.peer_id.to_base58()
        self.maddrs = circuit_maddrs(bootstrap, self.dht_id) if self.reach.relayed else [str(m) for m in self.dht.get_visible_maddrs()]
        self.failures = FailureLog(self.dht_id)
        self.transport = FrameTransport(self.p2p, self.counters)
        self.transport.dial_back = self.reach.relayed
        self.members = Members(lambda: self.client.members(self.peer_id), join.checkpoint_public_key, self.run_id)
        self.transport.admits = self.members.admits
        self.directory = StageDirectory(self.dht, self.run_id, self.transport.addresses)
        self.directory.is_member = self.members.knows
        if not self.config.cache_dir and state_dir is None:
            self._temporary_cache = tempfile.mkdtemp(prefix="hometrain-aqsgd-")  # removed when the peer leaves
        cache_dir = self.config.cache_dir or (str(state_dir / "activation-cache") if state_dir is not None else self._temporary_cache)
        self.boundary = BoundaryCodec(self.train, self.config.activation_cache_mb << 20, cache_dir, self.device.device,
                                      disk_bytes=self.config.activation_disk_mb << 20)
        self.exchange = SyncExchange(self.transport, self.run_id, self.dht_id, lambda: self.current_round)
        self.runtime = StageRuntime(model_config, self.train, join.layer_start, join.layer_end, self.device.device)
        self.sync = StageSync(self.runtime, self.exchange, self.train, self.stage, self._clip)
        self.pipeline = Pipeline(self.runtime, self.transport, self.directory, Router(rng=random.Random(self.dht_id)), self.boundary,
                                 self.run_id, self.stage, self.train.round_timeout, self.failures)
        self.auditor = Auditor(self.pipeline, self.train, self.dht_id, random.Random(f"audit:{self.dht_id}"))
        self.weights = StageWeights(self.transport, self.run_id, join.checkpoint_public_key, self.stopping, self.config.connect_timeout,
                                    show_progress=not self.config.quiet, num_stages=join.num_stages, seed=self.train.seed,
                                    base_url=reachable_url(join.base_checkpoint_url, self.coordinator_host))
        self.transport.limits = self._frame_limits()
        await self.pipeline.start()
        await self.exchange.start()
        await self.weights.serve(lambda: (self.stage, self.runtime, self.sync))
        if self.config.metrics_port:
            self.metrics = PeerMetrics(self.snapshot)
            try:
                self.metrics.start(self.config.metrics_port)
            except OSError as exc:
                self.metrics = None
                raise CannotStart(f"cannot serve metrics on port {self.config.metrics_port} (--metrics-port): {exc.strerror or exc}; "
                                  "pick a free port, or 0 to turn metrics off") from None
        # The coordinator learns this node's libp2p id (the replicas it loads from must admit it), and heartbeats go on
        # while a long state transfer runs, so the peer is not timed out for loading.
        await self._heartbeat()
        self._spawn(self._heartbeat_loop())
        await self._load_weights()

    def _frame_limits(self) -> dict[str, Callable[[], int]]:
        """The largest frame each handler takes, from the run's shapes (not the 2 GiB any frame may be): a microbatch's
        activations, a sync part of this stage's gradient (its size follows the stage the peer holds now), a state request."""
        boundary = boundary_frame_limit(self.train, self.runtime.model.config)
        return {
            FORWARD_HANDLER: lambda: boundary,
            INFER_HANDLER: lambda: boundary,
            SYNC_HANDLER: lambda: SYNC_BYTES_PER_PARAMETER * sum(p.numel() for p in self.runtime.model.parameters()) + FRAME_SLACK,
            STATE_HANDLER: lambda: FRAME_SLACK,
        }

    def _check_memory(self, model_config: GPTJConfig, layer_start: int, layer_end: int) -> None:
        """Refuse a stage this device cannot hold (before allocating it), saying what would fit."""
        settings = plan_settings(self.train, aqsgd_cache_bytes=self.config.activation_cache_mb << 20)
        plan = plan_stage(StageShape.of(model_config, layer_start, layer_end), settings)
        free = self.device.free_memory_bytes
        if free and plan.peak > free:
            raise CannotStart(fit_advice(model_config, layer_start, layer_end, settings, free))
        log.info("stage %d needs %s; %s", self.stage, plan.describe(), f"{free / 2**30:.1f} GiB free here" if free else "free memory unknown")

    def _announce_ip(self) -> str:
        """--announce-host as the IPv4 address a multiaddr needs (it may be a name)."""
        host = self.config.announce_host
        if not host:
            return ""
        ip = resolve_ipv4(host)
        if ip is None:
            raise CannotStart(f"--announce-host {host!r} has no IPv4 address here; give this machine's public IPv4 address or a name that resolves to it")
        return ip

    async def _reachability(self) -> Reachability:
        """Direct or relayed: the coordinator's dial-back unless --reachability says; logged either way."""
        mode, port = self.config.reachability, self.config.p2p_port
        if mode != "auto":
            reach = Reachability(mode, port or free_port(self.config.host), "as --reachability says")
        else:
            reach = await probe(self.client, self.peer_id, self.config.host, port, self.config.announce_host)
        if reach.relayed:
            log.info("reachability: relayed. Other machines cannot connect to this one (%s); it dials out and is reached "
                     "through the coordinator's relay. Forward a TCP port to it (--p2p-port, --announce-host) for direct "
                     "links, which are faster", reach.detail)
        else:
            log.info("reachability: direct, on P2P port %d (%s)", reach.port, reach.detail)
        return reach

    async def _train(self) -> int:
        """Heartbeats, DHT records and the round loop, until the run ends or the peer is told to stop."""
        await self._heartbeat()
        await self._announce()
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
        if self.p2p is not None:
            await self.p2p.shutdown()
        if self.runtime is not None:
            self.runtime.executor.shutdown(wait=False, cancel_futures=True)
        if self.boundary is not None:
            self.boundary.close()
        if self._temporary_cache is not None:
            shutil.rmtree(self._temporary_cache, ignore_errors=True)
        log.info("left the run")

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception(), exc_info=task.exception())

    # ------------------------------------------------------------ the stage's weights

    async def _load_weights(self) -> None:
        """Current weights from a live replica of the stage, else from the latest checkpoint (``peer.weights``)."""

        async def sources() -> list[str]:
            try:
                found = await self.directory.replicas(self.stage, max_age=0)
            except Exception as exc:
                log.debug("stage directory lookup failed: %s", exc)
                found = {}
            return state_sources(self.stage_peers, self.dht_id, self.current_round, self.checkpoint[1], found)

        await self.weights.load(self.stage, self.runtime, self.sync, sources, lambda: self.checkpoint)

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
            self.sync = StageSync(self.runtime, self.exchange, self.train, stage, self._clip)
            self.pipeline.runtime, self.pipeline.stage = self.runtime, stage
        old.executor.shutdown(wait=False, cancel_futures=True)
        await self._load_weights()
        await self._heartbeat()
        await self._announce()

    # ------------------------------------------------------------ liveness

    def snapshot(self) -> PeerSnapshot:
        """This peer's figures now (metrics, the status line)."""
        if self.runtime is not None:
            self.throughput = self.runtime.throughput or self.throughput
        return PeerSnapshot(
            stage=self.stage, round=self.current_round, microbatches_done=self.runtime.microbatches_done if self.runtime else 0,
            microbatches_failed=self.failures.count, throughput=self.throughput, counters=self.counters,
            frames_rejected=self.transport.frames_rejected if self.transport else 0,
            records_rejected=self.directory.records_rejected if self.directory else 0,
            non_members_refused=self.members.refused if self.members else 0,
        )

    def stats(self) -> pb.PeerStats:
        """What the coordinator learns of this peer with each heartbeat and step report."""
        s, c = self.snapshot(), self.counters
        return pb.PeerStats(
            microbatches_done=s.microbatches_done, bytes_sent=dict(c.sent), bytes_received=dict(c.received),
            uncompressed_bytes_sent=dict(c.uncompressed_sent), uncompressed_bytes_received=dict(c.uncompressed_received),
            next_round=self.runtime.next_round, throughput=s.throughput, loads=self.runtime.loads,
            link_bytes_per_second=self.transport.link.bytes_per_second, microbatches_failed=s.microbatches_failed,
            audits_dropped=self.auditor.dropped if self.auditor else 0,
        )

    async def _send_heartbeat(self) -> pb.HeartbeatReply:
        request = pb.HeartbeatRequest(peer_id=self.peer_id, dht_peer_id=self.dht_id, stats=self.stats(), maddrs=self.maddrs,
                                      reachability=self.reach.mode if self.reach else "")
        return await self.client.heartbeat(request)

    async def _heartbeat(self) -> None:
        asked_as = self.peer_id
        reply = await self._send_heartbeat()
        if reply.known:
            self._follow_pace(reply.heartbeat_interval)
            if self.members is not None:
                await self.members.update(reply.members_epoch)
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

    def _follow_pace(self, interval: float) -> None:
        """The coordinator paces a large swarm's heartbeats: beat as often as it asks (and say so when that changes)."""
        if interval > 0 and abs(interval - self.heartbeat_interval) > 0.05 * self.heartbeat_interval:
            log.info("the coordinator asks for a heartbeat every %.1fs (was %.1fs): it paces a large swarm", interval, self.heartbeat_interval)
            self.heartbeat_interval = interval

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
        record = StageRecord(throughput=self.throughput, next_round=self.runtime.next_round, name=self.config.name[:64], maddrs=tuple(self.maddrs[:8]))
        await self.directory.announce(self.stage, self.dht_id, record)

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(ANNOUNCE_EVERY)
            try:
                await self._announce()
            except Exception as exc:
                log.warning("could not refresh the DHT record: %s", exc)

    async def _status_loop(self) -> None:
        """The volunteer's live line, every few seconds."""
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
            log.info("%s", status_line(dataclasses.replace(self.snapshot(), peers_in_stage=in_stage), rate))

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
            self._learn(state)
            if state.phase == pb.STOPPED:
                log.info("the coordinator ended the run (%s)", state.message or "stopped")
                if self.config.serve_after_run:
                    log.info("serving forward-only requests until Ctrl-C (--serve-after-run)")
                    await self.stopping.wait()
                return
            await self._follow_directives(state)
            self._dispatch(state)

    def _learn(self, state: pb.RoundState) -> None:
        """What a round state says about the swarm: the round, the stage's replicas, the next stage, the checkpoint."""
        self.current_round = state.round
        self.stage_peers = list(state.stage_peers)
        for other in self.stage_peers:  # dialable even before (or without) the DHT showing their records
            self.directory.remember(other.dht_peer_id, list(other.maddrs))
        self.directory.learn(state.stage + 1, {p.dht_peer_id: StageRecord(throughput=p.throughput, maddrs=tuple(p.maddrs[:8]))
                                               for p in state.next_stage_peers})
        if state.checkpoint_url:
            self.checkpoint = (reachable_url(state.checkpoint_url, self.coordinator_host), state.checkpoint_round)

    async def _follow_directives(self, state: pb.RoundState) -> None:
        """Move to another stage, reload stale weights, or continue as of a round, as the coordinator says."""
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

    def _dispatch(self, state: pb.RoundState) -> None:
        """Start what the round's phase asks of this peer, once per (round, attempt)."""
        r = state.round
        if state.phase == pb.OPEN and self.stage == 0 and self.runtime.next_round == r and self._first("feed", (r, state.open_attempt)):
            self._spawn(self._feed_round(r, state.open_attempt))
        elif state.phase == pb.SYNC and state.in_sync_group and self.runtime.next_round == r and self._first("sync", (r, state.sync_attempt)):
            self._spawn(self._step_round(r, list(state.sync_group), state.tokens_in_round, state.sync_attempt, state.open_attempt,
                                         state.loss_scale or 1.0))
        elif state.phase == pb.PUBLISH and state.upload_checkpoint and self._first("upload", r):
            self._spawn(self.weights.upload(self.client, self.peer_id, r, self.stage, self.runtime, self.sync))

    def _first(self, kind: str, key) -> bool:
        seen = self.rounds_seen[kind]
        if key in seen:
            return False
        seen.add(key)
        return True

    async def _feed_round(self, round: int, attempt: int) -> None:
        """Stage 0: pull microbatches for opening ``attempt`` of ``round`` and push them through the pipeline, a few at once."""

        async def worker() -> None:
            while self.runtime.accepts(round, attempt) and not self.stopping.is_set():
                mb = await self.client.microbatch(pb.BatchRequest(peer_id=self.peer_id, round=round, open_attempt=attempt))
                if not mb.available:
                    return
                await self._train_microbatch(mb)

        compute = self.train.micro_batch_size / self.runtime.throughput if self.runtime.throughput > 0 else 0.0
        n = self.inflight.choose(compute)
        if n != self.inflight.chosen:
            log.info("round %d: %s", round, self.inflight.describe(n, compute))
            self.inflight.chosen = n
        await asyncio.gather(*(worker() for _ in range(n)))

    async def _train_microbatch(self, mb: pb.Microbatch) -> None:
        report = pb.ProgressReport(peer_id=self.peer_id, round=mb.round, microbatch_index=mb.index, open_attempt=mb.open_attempt)
        try:
            batch = {
                "input_ids": codec.from_message(mb.input_ids), "target_ids": codec.from_message(mb.target_ids),
                "loss_mask": codec.from_message(mb.loss_mask), "prefix_lengths": codec.from_message(mb.prefix_lengths),
            }
            header = pb.FrameHeader(kind=pb.FORWARD, run_id=self.run_id, round=mb.round, microbatch=mb.index, stage=0,
                                    sample_ids=mb.sample_ids, open_attempt=mb.open_attempt, loss_scale=mb.loss_scale)
            started = time.monotonic()
            loss_sum, tokens, _, route = await self.pipeline.run_stage(header, batch["input_ids"], batch)
            self.inflight.observe_trip(time.monotonic() - started)
            report.ok, report.loss_sum, report.tokens = True, loss_sum, tokens
            if self.auditor.wanted():  # before the report: the round cannot close (and its peers step) while the audit runs
                await self.auditor.rerun(header, batch, loss_sum, tokens, route)
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

    @property
    def _clip(self) -> Clip | None:
        return self._clip_factor if self.train.clip_grad_norm > 0 else None

    async def _clip_factor(self, round: int, attempt: int, squared_norm: float) -> float | None:
        """The factor every stage clips this round's gradient by, from the coordinator (None: a stage's gradient
        was not finite, so nobody steps)."""
        request = pb.ClipRequest(peer_id=self.peer_id, round=round, sync_attempt=attempt, squared_norm=squared_norm)
        try:
            reply = await self.client.clip_factor(request, timeout=self.train.sync_timeout + 15)
        except grpc.aio.AioRpcError as exc:
            raise SyncError(f"the coordinator gave no clip factor for round {round}: {exc.details() or exc.code().name}") from None
        if reply.factor < 1.0:
            log.debug("round %d: global gradient norm %.4g > --clip-grad-norm %g: gradients scaled by %.4g",
                     round, reply.norm, self.train.clip_grad_norm, reply.factor)
        return None if reply.skip else reply.factor

    async def _step_round(self, round: int, group: list[str], tokens: int, attempt: int, open_attempt: int, loss_scale: float) -> None:
        """SYNC: close the round, sync with the replica group and step (``peer.replica_sync``), report the checksum."""
        try:  # learn the group's addresses, in case libp2p does not know where a member is
            await self.directory.replicas(self.stage, max_age=5.0)
        except Exception as exc:
            log.debug("stage directory lookup failed: %s", exc)
        outcome = await self.sync.step_round(round, group, tokens, attempt, open_attempt, loss_scale)
        report = pb.StepReport(peer_id=self.peer_id, round=round, synced=outcome.synced, diverged=outcome.diverged,
                               error=outcome.error, checksum=outcome.checksum, overflow=outcome.overflow, suspects=list(outcome.suspects),
                               audits=self.auditor.take(round) if self.stage == 0 else [])
        report.stats.CopyFrom(self.stats())
        await self.client.report_step(report)
        if not self.config.quiet:
            log.info("round %d stepped (%s) checksum %s", round, outcome.how, outcome.checksum[:12])
