"""Ask a running swarm from outside it: logits (a forward-only trip through its pipeline), or a replica's state.

Used to evaluate the live model (and by tests to compare the swarm with a published
checkpoint). The client joins the DHT in client mode, picks a stage-0 peer from the stage
directory and sends an INFER frame; the logits come back along the route. A run with join
tokens serves only its members: give ``coordinator`` and ``join_token``, and the client first
asks the coordinator to admit its node for a while (Observe).
"""

from __future__ import annotations

import asyncio
import random

import hivemind
import torch
from hivemind.p2p import PeerID

import grpc

from proto import PROTOCOL_VERSION
from proto import hometrain_pb2 as pb
from proto import hometrain_pb2_grpc as pb_grpc
from proto.codec import WireKind

from .directory import StageDirectory
from .pipeline import INFER_HANDLER
from .state_transfer import ReceivedState, fetch_state
from .transport import FrameTransport, WireCounters


async def _infer(dht: hivemind.DHT, run_id: str, input_ids: torch.Tensor, prefix_lengths: torch.Tensor, timeout: float) -> torch.Tensor:
    p2p = await dht.replicate_p2p()
    transport = FrameTransport(p2p, WireCounters())
    directory = StageDirectory(dht, run_id)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        entry = sorted((await directory.replicas(0, max_age=0)).keys())
        if entry:
            break
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no stage-0 peer of run {run_id} is announced in the DHT")
        await asyncio.sleep(0.5)
    header = pb.FrameHeader(kind=pb.INFER, run_id=run_id, stage=0)
    tensors = {"input_ids": input_ids.to(torch.int64), "prefix_lengths": prefix_lengths.to(torch.int64)}
    reply_header, reply = await transport.call(PeerID.from_base58(random.choice(entry)), INFER_HANDLER, header, tensors, WireKind.INFERENCE, WireKind.INFERENCE, timeout)
    if reply_header.kind != pb.LOGITS or "logits" not in reply:
        raise RuntimeError(f"the swarm answered {pb.FrameKind.Name(reply_header.kind)} without logits")
    return reply["logits"]


def _client_dht(initial_peers: list[str], coordinator: str, join_token: str) -> hivemind.DHT:
    """A client-mode DHT node, admitted to the run's data plane when ``coordinator`` is given."""
    dht = hivemind.DHT(initial_peers=initial_peers, start=True, client_mode=True, await_ready=True)
    if coordinator:
        try:
            with grpc.insecure_channel(coordinator) as channel:
                pb_grpc.CoordinatorStub(channel).Observe(pb.ObserveRequest(
                    protocol_version=PROTOCOL_VERSION, join_token=join_token, dht_peer_id=dht.peer_id.to_base58()), timeout=30)
        except BaseException:
            dht.shutdown()
            raise
    return dht


def swarm_logits(initial_peers: list[str], run_id: str, input_ids: torch.Tensor, prefix_lengths: torch.Tensor | None = None,
                 timeout: float = 60.0, coordinator: str = "", join_token: str = "") -> torch.Tensor:
    """Logits of the swarm's current weights for ``input_ids`` [B, L] (causal unless prefix lengths are given)."""
    if prefix_lengths is None:
        prefix_lengths = torch.zeros(input_ids.shape[0], dtype=torch.int64)
    dht = _client_dht(initial_peers, coordinator, join_token)
    try:
        return asyncio.run(_infer(dht, run_id, input_ids, prefix_lengths, timeout))
    finally:
        dht.shutdown()


def swarm_stage_state(initial_peers: list[str], run_id: str, peer_id: str, stage: int, timeout: float = 120.0,
                      coordinator: str = "", join_token: str = "") -> tuple[int, dict[str, torch.Tensor], dict]:
    """A replica's whole state, as it hands it to a joiner: (round it is ready for, tensors, extras). For checking
    that replicas agree, weights and optimizer state alike."""

    async def fetch(dht: hivemind.DHT) -> ReceivedState:
        transport = FrameTransport(await dht.replicate_p2p(), WireCounters())
        return await asyncio.wait_for(fetch_state(transport, peer_id, run_id, stage), timeout)

    dht = _client_dht(initial_peers, coordinator, join_token)
    try:
        state = asyncio.run(fetch(dht))
        return state.next_round, state.tensors, state.extras
    finally:
        dht.shutdown()
