"""Frames between two libp2p nodes that have never met: dialled at the addresses the other announced."""

from __future__ import annotations

import asyncio

import pytest
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


def test_a_private_run_serves_members_only_and_counts_the_rest():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from peer.members import Members
    from proto.auth import sign_member_set

    key, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()

    async def main():
        a = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        b = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            served, caller = FrameTransport(a, WireCounters()), FrameTransport(b, WireCounters())
            published = {"epoch": 1, "ids": [a.peer_id.to_base58()], "key": key}

            async def fetch() -> pb.MemberSet:
                ids, epoch = published["ids"], published["epoch"]
                return pb.MemberSet(run_id="run", epoch=epoch, dht_peer_ids=ids, signature=sign_member_set(published["key"], "run", epoch, ids))

            members = Members(fetch, public, "run")
            served.admits = members.admits
            await members.update(1)
            handled = []

            async def echo(header, tensors, sender):
                handled.append(sender)
                return pb.FrameHeader(kind=pb.ACK, run_id=header.run_id), {}

            await served.serve("test.echo", echo, receive_kind="control", send_kind="control")
            caller.addresses[a.peer_id.to_base58()] = [str(m) for m in await a.get_visible_maddrs()]
            call = lambda: caller.call(a.peer_id, "test.echo", pb.FrameHeader(kind=pb.FORWARD, run_id="run"), {"x": torch.ones(2)},  # noqa: E731
                                       "control", "control", timeout=20)
            with pytest.raises(Exception, match="not a member"):
                await call()
            assert members.refused == 1 and not handled
            published.update(epoch=2, ids=[a.peer_id.to_base58(), b.peer_id.to_base58()], key=forger)  # a set the run's key did not sign
            await members.update(2)
            assert members.epoch == 1 and b.peer_id.to_base58() not in members.ids
            published["key"] = key
            await asyncio.sleep(1.1)  # a stranger makes the peer fetch the set again, at most once a second
            await call()  # admitted: the set fetched on its arrival names it
            assert handled == [b.peer_id] and members.epoch == 2
        finally:
            await a.shutdown()
            await b.shutdown()

    asyncio.run(main())


def test_a_handler_takes_frames_up_to_its_limit_and_a_bounded_number_at_once():
    async def main():
        a = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        b = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            served, caller = FrameTransport(a, WireCounters(), max_streams_per_peer=1), FrameTransport(b, WireCounters())
            served.limits["test.slow"] = lambda: 1 << 10
            release = asyncio.Event()

            async def slow(header, tensors, sender):
                await release.wait()
                return pb.FrameHeader(kind=pb.ACK, run_id=header.run_id), {}

            await served.serve("test.slow", slow, receive_kind="control", send_kind="control")
            caller.addresses[a.peer_id.to_base58()] = [str(m) for m in await a.get_visible_maddrs()]
            call = lambda n: caller.call(a.peer_id, "test.slow", pb.FrameHeader(kind=pb.FORWARD, run_id="run"), {"x": torch.ones(n)},  # noqa: E731
                                         "control", "control", timeout=20)
            with pytest.raises(Exception, match="exceeds|larger|limit|bytes"):
                await call(1024)  # 4 KiB of floats: over the handler's 1 KiB
            first = asyncio.ensure_future(call(16))
            await asyncio.sleep(1.0)
            with pytest.raises(Exception):
                await call(16)  # a second stream from the same caller while the first is open
            assert served.frames_rejected == 2 and served.open_streams == {b.peer_id.to_base58(): 1}
            release.set()
            await first
            assert served.frames_rejected == 2 and not served.open_streams
        finally:
            await a.shutdown()
            await b.shutdown()

    asyncio.run(main())
