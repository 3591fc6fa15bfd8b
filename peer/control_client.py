"""The peer's side of the gRPC control plane: one channel to the coordinator, bytes counted."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import grpc

from proto import hometrain_pb2 as pb
from proto import hometrain_pb2_grpc as pb_grpc

from .transport import WireCounters

log = logging.getLogger(__name__)

GRPC_MAX_MESSAGE = 64 << 20
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ControlClient:
    """Async wrapper over the Coordinator stub; retries transport failures with backoff."""

    def __init__(self, address: str, counters: WireCounters) -> None:
        self.address = address
        self.counters = counters
        options = [("grpc.max_receive_message_length", GRPC_MAX_MESSAGE), ("grpc.max_send_message_length", GRPC_MAX_MESSAGE)]
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def call(self, method: str, request, timeout: float = 30.0, retry_for: float = 60.0):
        """Call ``method``; while the coordinator is unreachable, retry with backoff (1, 2, 4, 5, 5 ... s) for ``retry_for`` seconds.

        The backoff stays short: a restarted coordinator should see its peers back within seconds."""
        delay = 1.0
        give_up = time.monotonic() + retry_for
        while True:
            try:
                reply = await getattr(self.stub, method)(request, timeout=timeout)
                self.counters.count_sent("control", request.ByteSize(), request.ByteSize())
                self.counters.count_received("control", reply.ByteSize(), reply.ByteSize())
                return reply
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() + delay > give_up:
                    raise
                log.warning("coordinator %s unreachable (%s); retrying in %.0fs", self.address, exc.code().name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def upload_checkpoint(self, chunks: AsyncIterator[pb.CheckpointChunk], nbytes: int) -> pb.UploadReply:
        reply = await self.stub.UploadCheckpoint(chunks, timeout=600)
        self.counters.count_sent("state", nbytes, nbytes)
        return reply
