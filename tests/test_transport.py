"""Frames between two libp2p nodes that have never met: dialled at the addresses the other announced."""

from __future__ import annotations

import asyncio

import torch
from hivemind.p2p import P2P

from peer.transport import FrameTransport, WireCounters
from proto import hometrain_pb2 as pb


def test_call_reaches_a_peer_known_only_by_its_announced_addresses():
    async def main():
        a = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        b = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            served, caller = FrameTransport(a, WireCounters()), FrameTransport(b, WireCounters())

            async def echo(header, tensors, sender):
                return pb.FrameHeader(kind=pb.BACKWARD, run_id=header.run_id), {"x": tensors["x"] * 2}

            await served.serve("test.echo", echo, receive_kind="control", send_kind="control")
            announced = [str(m) for m in await a.get_visible_maddrs()]
            assert all("/p2p/" in m for m in announced)  # as peers announce them
            caller.addresses[a.peer_id.to_base58()] = announced
            header = pb.FrameHeader(kind=pb.FORWARD, run_id="run")
            _, reply = await caller.call(a.peer_id, "test.echo", header, {"x": torch.ones(3)}, "control", "control", timeout=20)
            return reply["x"]
        finally:
            await a.shutdown()
            await b.shutdown()

    assert torch.equal(asyncio.run(main()), torch.full((3,), 2.0))
