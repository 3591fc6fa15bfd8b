"""The gRPC control plane: validates each request, then hands it to the round engine."""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import grpc
from hivemind.p2p import PeerID

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proto import NO_GRADIENT, PACKAGE_VERSION, PROTOCOL_VERSION, REACHABILITY_NONCE_BYTES
from proto.auth import credential_of, digest, matches, new_secret, sign_member_set
from proto import hometrain_pb2 as pb
from proto import hometrain_pb2_grpc as pb_grpc

from .eval_runner import LEASE_SECONDS, RESULT_MAX_BYTES, STDERR_TAIL, Evaluator
from .join_tokens import JoinTokens
from .membership import Membership, PeerRecord
from .metrics import CoordinatorMetrics
from .reachability import PROBE_INTERVAL, ProbeLimiter, dial_back, observed_host
from .rounds import RoundEngine
from .uploads import WEIGHTS, UploadError, spool

log = logging.getLogger(__name__)
EVAL_POLL_SECONDS = 10.0  # an evaluating volunteer with nothing to do asks again after this
REFUSAL_LOG_EVERY = 10.0  # seconds between two log lines of one kind of refusal (a flood must not fill the log)


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """Join / Heartbeat / Leave, round state, batch hand-out, progress, steps, checkpoint upload."""

    def __init__(
        self,
        engine: RoundEngine,
        membership: Membership,
        metrics: CoordinatorMetrics,
        join_reply: pb.JoinReply,
        tokens: JoinTokens,
        layer_ranges: list[tuple[int, int]],
        signing_key: Ed25519PrivateKey,
    ) -> None:
        self.engine = engine
        self.layer_ranges = layer_ranges
        self.membership = membership
        self.metrics = metrics
        self.join_template = join_reply
        self.tokens = tokens
        self._refusals_logged: dict[str, tuple[float, int]] = {}  # kind -> (when last logged, refusals then)
        self._refusals: dict[str, int] = {}
        self.signing_key = signing_key
        membership.token_revoked = tokens.revoked
        self.probes = ProbeLimiter()
        self.evaluator: Evaluator | None = None  # set by serve_evaluations (--eval-on peer)

    def serve_evaluations(self, evaluator: Evaluator, checkpoint_url: Callable[[int], str], job: pb.EvalJob) -> None:
        """Hand checkpoints to evaluating volunteers (NextEvaluation, ReportEvaluation); ``job`` holds what every job shares."""
        self.evaluator, self.checkpoint_url, self.eval_job = evaluator, checkpoint_url, job

    async def _admit(self, request: pb.JoinRequest | pb.EvalJobRequest | pb.ObserveRequest, context: grpc.aio.ServicerContext) -> str:
        """A newcomer (to train or to evaluate) speaks this protocol and holds a live join token; returns the token's id."""
        if request.protocol_version != PROTOCOL_VERSION:
            await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, "protocol_version",
                               f"this coordinator speaks protocol {PROTOCOL_VERSION} (hometrain {PACKAGE_VERSION}); "
                               f"your peer speaks {request.protocol_version}: install hometrain=={PACKAGE_VERSION}")
        return await self._check_token(request.join_token, context)

    async def _check_token(self, token: str, context: grpc.aio.ServicerContext) -> str:
        token_id = self.tokens.admit(token)
        if token_id is None:
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "join_token",
                               "this run requires a join token and the one given is not one of its live tokens "
                               f"({'none was given' if not token else 'it does not match, or the organiser revoked it'}): put the "
                               "organiser's token in a file and pass --join-token-file FILE, or set HOMETRAIN_JOIN_TOKEN")
        assert token_id is not None
        return token_id

    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, kind: str, message: str) -> None:
        self.metrics.rpc_errors.labels(kind).inc()
        count = self._refusals[kind] = self._refusals.get(kind, 0) + 1
        logged_at, logged_count = self._refusals_logged.get(kind, (0.0, 0))
        now = time.monotonic()
        if logged_count == 0 or now - logged_at >= REFUSAL_LOG_EVERY:  # the first at once, then a summary every 10 s
            more = f" ({count - logged_count - 1} more refused since the last line)" if count - logged_count > 1 else ""
            log.warning("refused %s%s: %s", kind, more, message)
            self._refusals_logged[kind] = (now, count)
        await context.abort(code, message)

    async def _peer(self, peer_id: str, context: grpc.aio.ServicerContext) -> PeerRecord:
        """The live member ``peer_id`` names, if the call carries that member's credential (else the call is refused)."""
        record = self.membership.get(peer_id)
        if record is None:
            await self._refuse(context, grpc.StatusCode.NOT_FOUND, "unknown_peer",
                               f"peer id {peer_id!r} is not (or no longer) a member of this run; join again")
        assert record is not None
        await self._authenticate(record, context)
        return record

    async def _authenticate(self, record: PeerRecord, context: grpc.aio.ServicerContext) -> None:
        if not matches(credential_of(context.invocation_metadata()), record.credential_digest):
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "credential",
                               f"this call names peer {record.peer_id} but does not carry that peer's credential (the one its Join "
                               "returned, in metadata x-hometrain-credential): a peer id alone grants nothing; join to get your own")
        if record.token_id and self.tokens.revoked(record.token_id):
            record.state = pb.GONE
            self.engine.drop_in_flight_of(record.peer_id)
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "revoked",
                               f"the join token peer {record.peer_id} joined with was revoked by the organiser: it is no longer "
                               "a member of this run; ask the organiser for a new token")

    def _count(self, request, reply) -> None:
        self.metrics.control_bytes.labels("received").inc(request.ByteSize())
        self.metrics.control_bytes.labels("sent").inc(reply.ByteSize())

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        token_id = await self._admit(request, context)
        if request.requested_stage >= self.membership.num_stages:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_request",
                               f"--stage {request.requested_stage} does not exist: this run has stages 0..{self.membership.num_stages - 1}")
        credential = new_secret()
        try:
            record = self.membership.add(request.name, request.device, request.throughput, request.requested_stage, request.free_memory_bytes,
                                         credential_digest=digest(credential), token_id=token_id)
        except ValueError as exc:
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "memory", str(exc))
            raise  # unreachable: abort raises
        reply = pb.JoinReply()
        reply.CopyFrom(self.join_template)
        reply.peer_id = record.peer_id
        reply.credential = credential
        reply.stage = record.stage
        reply.layer_start, reply.layer_end = self.layer_ranges[record.stage]
        reply.heartbeat_interval = self.membership.pace(record)
        log.info("peer %s joined (%s, %s): stage %d", record.peer_id, request.name or "unnamed", request.device, record.stage)
        self._count(request, reply)
        return reply

    async def NextEvaluation(self, request: pb.EvalJobRequest, context: grpc.aio.ServicerContext) -> pb.EvalJob:
        await self._admit(request, context)
        if self.evaluator is None:
            await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, "no_eval_role",
                               "this run does not hand evaluations to volunteers (the organiser runs it with --eval-on coordinator or "
                               "off): join without --role eval to train instead")
        assert self.evaluator is not None
        now = time.time()
        if request.worker_id in self.evaluator.workers:
            await self._evaluator_credential(request.worker_id, context)
        worker = self.evaluator.register(request.worker_id, request.name, request.device, now)
        reply = pb.EvalJob()
        reply.CopyFrom(self.eval_job)
        reply.worker_id = worker.worker_id
        if not worker.credential_digest:  # a new worker: its own credential, so knowing its (public) id grants nothing
            credential = new_secret()
            worker.credential_digest = digest(credential)
            reply.credential = credential
        job = self.evaluator.take(worker.worker_id, now)
        if job is None:
            reply.retry_after = EVAL_POLL_SECONDS
        else:
            reply.has_job = True
            reply.round = job[0]
            reply.checkpoint_url = self.checkpoint_url(job[0])
            reply.lease_seconds = LEASE_SECONDS
            log.info("checkpoint of round %d goes to evaluating volunteer %s (%s)", job[0], worker.worker_id, worker.name or worker.device)
        self._count(request, reply)
        return reply

    async def _evaluator_credential(self, worker_id: str, context: grpc.aio.ServicerContext) -> None:
        """Refuse the call unless it carries the credential ``worker_id`` was given."""
        assert self.evaluator is not None
        if not matches(credential_of(context.invocation_metadata()), self.evaluator.workers[worker_id].credential_digest):
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "credential",
                               f"this call names evaluating worker {worker_id} but does not carry its credential (the one its first "
                               "job reply returned, in metadata x-hometrain-credential); ask for a job without a worker id to get your own")

    async def ReportEvaluation(self, request: pb.EvalReport, context: grpc.aio.ServicerContext) -> pb.EvalAck:
        await self._check_token(request.join_token, context)
        if self.evaluator is None or request.worker_id not in self.evaluator.workers:
            await self._refuse(context, grpc.StatusCode.NOT_FOUND, "unknown_worker",
                               f"evaluating worker {request.worker_id!r} is unknown here (the coordinator restarted?); ask for a job again")
        assert self.evaluator is not None
        await self._evaluator_credential(request.worker_id, context)
        self.evaluator.workers[request.worker_id].last_seen = time.time()
        if request.renew:
            if self.evaluator.renew(request.worker_id, request.round, time.time()):
                return pb.EvalAck(accepted=True, message="renewed")
            return pb.EvalAck(accepted=False, message=f"round {request.round} is no longer leased to you; stop and ask for a job again")
        if not request.error and not request.result_json:
            self.evaluator.give_back(request.worker_id, request.round)
            return pb.EvalAck(accepted=True, message="given back")
        if request.error:
            result: dict = {"error": request.error[:STDERR_TAIL]}
        elif len(request.result_json) > RESULT_MAX_BYTES:
            return pb.EvalAck(accepted=False, message=f"the result is {len(request.result_json)} bytes; at most {RESULT_MAX_BYTES} are kept")
        else:
            try:
                result = json.loads(request.result_json)
            except ValueError as exc:
                return pb.EvalAck(accepted=False, message=f"the result is not JSON ({exc})")
        why = self.evaluator.finish(request.worker_id, request.round, result)
        if why:
            self.metrics.rpc_errors.labels("eval_result").inc()
            log.warning("refused the evaluation of round %d from %s: %s", request.round, request.worker_id, why)
        return pb.EvalAck(accepted=why is None, message=why or "recorded")

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        record = self.membership.get(request.peer_id)
        if record is None:
            return pb.HeartbeatReply(known=False)
        await self._authenticate(record, context)
        self.membership.heard(record, time.monotonic())
        before = (record.state, record.next_round, record.loads, record.dht_peer_id)
        self.membership.update_stats(record, request.stats, request.dht_peer_id, request.maddrs, request.reachability)
        reply = pb.HeartbeatReply(known=True, members_epoch=self._members_epoch(), heartbeat_interval=self.membership.pace(record))
        self._count(request, reply)
        if (record.state, record.next_round, record.loads, record.dht_peer_id) != before:
            await self.engine.tick()  # it came online or moved on: act now (otherwise the engine's own tick, 4 a second, will)
        return reply

    async def CheckReachability(self, request: pb.ReachabilityRequest, context: grpc.aio.ServicerContext) -> pb.ReachabilityReply:
        await self._peer(request.peer_id, context)
        seen = observed_host(context.peer())
        if not 0 < request.port < 65536 or len(request.nonce) != REACHABILITY_NONCE_BYTES:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_request",
                               f"a reachability probe needs a port 1..65535 and a {REACHABILITY_NONCE_BYTES}-byte nonce; got port {request.port}, "
                               f"{len(request.nonce)} bytes")
        if not self.probes.allow(request.peer_id):
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "probe_rate",
                               f"one reachability probe per peer every {PROBE_INTERVAL:.0f}s; ask again later")
        host = request.host or seen
        result = await dial_back(host, request.port, request.nonce)
        log.info("peer %s is %s: %s", request.peer_id, "reachable" if result.reachable else "not reachable", result.detail)
        reply = pb.ReachabilityReply(reachable=result.reachable, observed_host=seen, detail=result.detail)
        self._count(request, reply)
        return reply

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveReply:
        record = self.membership.get(request.peer_id)
        if record is not None:
            await self._authenticate(record, context)
            record.state = pb.LEFT
            log.info("peer %s (stage %d) left", record.peer_id, record.stage)
            self.engine.drop_in_flight_of(record.peer_id)
            await self.engine.tick()
        return pb.LeaveReply()

    async def GetRoundState(self, request: pb.RoundStateRequest, context: grpc.aio.ServicerContext) -> pb.RoundState:
        await self._peer(request.peer_id, context)
        await self.engine.wait_for_change(request.known_round, request.known_phase, request.known_sync_attempt,
                                          min(max(request.wait_seconds, 0.0), 30.0), request.known_open_attempt)
        record = await self._peer(request.peer_id, context)
        reply = self.engine.round_state_for(record)
        self._count(request, reply)
        return reply

    async def GetMicrobatch(self, request: pb.BatchRequest, context: grpc.aio.ServicerContext) -> pb.Microbatch:
        record = await self._peer(request.peer_id, context)
        reply = self.engine.next_microbatch(record, request.round, request.open_attempt)
        self._count(request, reply)
        return reply

    async def ReportProgress(self, request: pb.ProgressReport, context: grpc.aio.ServicerContext) -> pb.ProgressAck:
        record = await self._peer(request.peer_id, context)
        if request.ok and not (request.loss_sum == request.loss_sum and abs(request.loss_sum) != float("inf")):
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_request", f"loss_sum {request.loss_sum} is not finite")
        accepted = await self.engine.report_progress(record, request)
        return pb.ProgressAck(accepted=accepted)

    async def ReportStep(self, request: pb.StepReport, context: grpc.aio.ServicerContext) -> pb.StepAck:
        record = await self._peer(request.peer_id, context)
        if request.HasField("stats"):
            self.membership.update_stats(record, request.stats, "")
        await self.engine.report_step(record, request)
        return pb.StepAck()

    async def ClipFactor(self, request: pb.ClipRequest, context: grpc.aio.ServicerContext) -> pb.ClipReply:
        record = await self._peer(request.peer_id, context)
        if request.squared_norm < 0 and request.squared_norm != NO_GRADIENT:  # NaN passes: a gradient that is not finite
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_request",
                               f"squared_norm {request.squared_norm} is negative (only {NO_GRADIENT}: no gradient this round)")
        reply = await self.engine.clip_factor(record, request)
        if isinstance(reply, str):
            await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, "stale", reply)
        return reply

    def _members_epoch(self) -> int:
        """The member set's epoch, or 0 where the data plane is open: a run without join tokens admits anyone anyway."""
        return self.membership.member_ids(time.monotonic())[0] if self.tokens.required else 0

    async def Members(self, request: pb.MembersRequest, context: grpc.aio.ServicerContext) -> pb.MemberSet:
        """The libp2p ids the data plane serves, signed; computed afresh (a peer asks when a stranger calls it)."""
        await self._peer(request.peer_id, context)
        epoch, ids = self.membership.member_ids(time.monotonic(), fresh=True)
        run_id = self.join_template.run_id
        reply = pb.MemberSet(run_id=run_id, epoch=epoch, dht_peer_ids=ids, signature=sign_member_set(self.signing_key, run_id, epoch, ids))
        self._count(request, reply)
        return reply

    async def Observe(self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext) -> pb.ObserveReply:
        token_id = await self._admit(request, context)
        try:
            PeerID.from_base58(request.dht_peer_id)
        except Exception:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_request",
                               f"dht_peer_id {request.dht_peer_id[:80]!r} is not a base58 libp2p peer id")
        seconds = self.membership.observe(request.dht_peer_id, token_id, time.monotonic())
        log.info("observer %s may use the data plane for %.0fs", request.dht_peer_id, seconds)
        return pb.ObserveReply(seconds=seconds)

    async def UploadCheckpoint(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.UploadReply:
        """A stage's shard, streamed to disk: the sender, stage, part and size are checked before anything is read."""
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return pb.UploadReply(accepted=False, message="empty upload")
        record = await self._peer(first.peer_id, context)
        part = first.part or WEIGHTS
        problem = self.engine.upload_wanted(record, first.round, first.stage, part, first.total_bytes)
        if not problem:
            path = self.engine.spool_path(first.round, first.stage, part)
            try:
                digest = await spool(first, aiter(request_iterator), path)
                problem = "upload corrupted: sha256 does not match" if digest != first.sha256 else ""
            except UploadError as exc:
                problem = str(exc)
            except BaseException:  # the sender went away, the disk is full: no partial file stays behind
                path.unlink(missing_ok=True)
                raise
            self.metrics.control_bytes.labels("received").inc(path.stat().st_size if path.exists() else 0)
            problem = problem or await self.engine.accept_upload(record, first.round, first.stage, part, path)
            if problem:
                path.unlink(missing_ok=True)
        if problem:
            self.metrics.rpc_errors.labels("upload").inc()
            log.warning("checkpoint upload from %s refused: %s", record.peer_id, problem)
        return pb.UploadReply(accepted=not problem, message=problem)
