"""The peer's side of the gRPC control plane: one typed method per RPC, bytes counted.

While the coordinator is unreachable a call retries with a short backoff, says where it is
trying and for how long, and gives up at once when the peer is told to stop (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from proto import GRPC_MAX_MESSAGE_BYTES
from proto import hometrain_pb2 as pb
from proto.auth import CREDENTIAL_METADATA
from proto.codec import WireKind
from proto import hometrain_pb2_grpc as pb_grpc

from .transport import WireCounters

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
MAX_BACKOFF = 5.0
R = TypeVar("R")


class Stopped(Exception):
    """The peer was told to stop (Ctrl-C) while waiting for something."""


async def unless_stopped(work: Awaitable[R], stop: asyncio.Event) -> R:
    """Await ``work``; as soon as ``stop`` is set, cancel it and raise Stopped."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except BaseException:  # whatever the cancelled work raised on its way out: the peer is stopping
            pass
        raise Stopped()
    return task.result()


def _short(exc: grpc.aio.AioRpcError) -> str:
    details = (exc.details() or "").split("; last error: ")[-1]
    return f"{exc.code().name}: {details}" if details else exc.code().name


class ControlClient:
    """Async client of the Coordinator service; retries transport failures with backoff."""

    def __init__(self, address: str, counters: WireCounters, stop: asyncio.Event, tls_ca: str = "", tls: bool = False) -> None:
        self.address = address
        self.counters = counters
        self.stop = stop
        options = [("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES)]
        if tls or tls_ca:  # the coordinator's certificate must chain to --tls-ca (or the system's roots)
            roots = Path(tls_ca).read_bytes() if tls_ca else None
            self.channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots), options=options)
        else:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.credential = ""  # from JoinReply: every call after Join carries it

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((CREDENTIAL_METADATA, self.credential),) if self.credential else ()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Callable[..., Awaitable[R]], request, timeout: float = 30.0, retry_for: float = 60.0) -> R:
        """Call ``method``; while the coordinator is unreachable, retry with backoff (1, 2, 4, 5, 5 ... s) for
        ``retry_for`` seconds. The backoff stays short: a restarted coordinator should see its peers back within seconds."""
        delay = 1.0
        give_up = time.monotonic() + retry_for
        while True:
            try:
                reply = await unless_stopped(method(request, timeout=timeout, metadata=self.metadata), self.stop)
                self.counters.count_sent(WireKind.CONTROL, request.ByteSize(), request.ByteSize())
                self.counters.count_received(WireKind.CONTROL, reply.ByteSize(), reply.ByteSize())
                return reply
            except grpc.aio.AioRpcError as exc:
                left = give_up - time.monotonic()
                if exc.code() not in RETRYABLE or left < delay:
                    raise
                log.warning("cannot reach the coordinator at %s (%s): check the address (--coordinator HOST:PORT) and that its "
                            "port is open in the firewalls between; retrying for another %.0fs (--connect-timeout), Ctrl-C stops",
                            self.address, _short(exc), left)
                try:
                    await asyncio.wait_for(self.stop.wait(), delay)
                    raise Stopped()
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, MAX_BACKOFF)

    async def join(self, request: pb.JoinRequest, retry_for: float) -> pb.JoinReply:
        """Join, and carry the credential the coordinator hands back on every later call."""
        reply = await self._call(self.stub.Join, request, retry_for=retry_for)
        self.credential = reply.credential
        return reply

    async def members(self, peer_id: str) -> pb.MemberSet:
        return await self._call(self.stub.Members, pb.MembersRequest(peer_id=peer_id), timeout=10, retry_for=0)

    async def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        return await self._call(self.stub.Heartbeat, request, timeout=10)

    async def check_reachability(self, request: pb.ReachabilityRequest) -> pb.ReachabilityReply:
        return await self._call(self.stub.CheckReachability, request, timeout=15, retry_for=0)

    async def round_state(self, request: pb.RoundStateRequest, retry_for: float) -> pb.RoundState:
        return await self._call(self.stub.GetRoundState, request, timeout=request.wait_seconds + 10, retry_for=retry_for)

    async def microbatch(self, request: pb.BatchRequest) -> pb.Microbatch:
        return await self._call(self.stub.GetMicrobatch, request)

    async def report_progress(self, request: pb.ProgressReport) -> pb.ProgressAck:
        return await self._call(self.stub.ReportProgress, request)

    async def report_step(self, request: pb.StepReport) -> pb.StepAck:
        return await self._call(self.stub.ReportStep, request)

    async def clip_factor(self, request: pb.ClipRequest, timeout: float) -> pb.ClipReply:
        """Waits while the other stages report their norms: ``timeout`` covers the slowest stage's sync."""
        return await self._call(self.stub.ClipFactor, request, timeout=timeout, retry_for=10)

    async def next_evaluation(self, request: pb.EvalJobRequest, retry_for: float) -> pb.EvalJob:
        return await self._call(self.stub.NextEvaluation, request, retry_for=retry_for)

    async def report_evaluation(self, request: pb.EvalReport, retry_for: float) -> pb.EvalAck:
        return await self._call(self.stub.ReportEvaluation, request, retry_for=retry_for)

    async def leave(self, request: pb.LeaveRequest, timeout: float) -> None:
        """One try, bounded: a peer that is leaving does not wait for a coordinator that is gone."""
        await self.stub.Leave(request, timeout=timeout, metadata=self.metadata)

    async def upload_checkpoint(self, chunks: AsyncIterator[pb.CheckpointChunk], nbytes: int) -> pb.UploadReply:
        reply = await self.stub.UploadCheckpoint(chunks, timeout=600, metadata=self.metadata)
        self.counters.count_sent(WireKind.STATE, nbytes, nbytes)
        return reply
