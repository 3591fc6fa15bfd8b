"""How often a fresh p2pd relay cuts off a frame larger than 128 KiB.

hivemind's p2pd starts two circuit-relay services: one with its flags' limits (4 GiB, 30 min) and one
with libp2p's defaults (128 KiB each way, 2 minutes a relayed connection). Which one answers depends on
start-up order. Each trial starts a relay (as the coordinator does), a relayed peer (as a peer behind
NAT does, without dialling back) and a direct one, and asks the relayed peer for one answer of
``--answer-kb`` over the relay. Prints how many trials had it cut off.

    PYTHONPATH=. python bench/relay_limit.py --trials 8
"""

from __future__ import annotations

import argparse
import asyncio

import torch
from hivemind.p2p import P2P

from coordinator.app import RELAY
from peer.reachability import Reachability, StaticRelayP2P, circuit_maddrs, p2p_options
from peer.transport import FrameTransport, WireCounters
from proto import hometrain_pb2 as pb


async def trial(answer_kb: int) -> bool:
    """True if the answer came through the relay whole."""
    relay = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], **RELAY)
    relays = [str(m) for m in await relay.get_visible_maddrs()]
    natted = await StaticRelayP2P.create(**p2p_options(Reachability("relayed", 0, ""), "127.0.0.1", "", relays))
    public = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], force_reachability="public")
    answer = {"values": torch.zeros(answer_kb * 256)}

    async def give(_header, _tensors, _caller):
        return pb.FrameHeader(), answer

    server, client = FrameTransport(natted, WireCounters()), FrameTransport(public, WireCounters())
    await server.serve("answer", give, "control", "state")
    client.addresses[natted.peer_id.to_base58()] = circuit_maddrs(relays, natted.peer_id.to_base58())
    try:
        await client.call(natted.peer_id, "answer", pb.FrameHeader(), {}, "control", "state", timeout=20)
        return True
    except Exception:  # noqa: BLE001 - cut off by the relay ("empty stream")
        return False
    finally:
        for daemon in (public, natted, relay):
            await daemon.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--answer-kb", type=int, default=800)
    args = parser.parse_args()
    whole = [asyncio.run(trial(args.answer_kb)) for _ in range(args.trials)]
    print(f"{args.answer_kb} KB answers over a fresh relay: {sum(whole)} of {args.trials} whole, "
          f"{args.trials - sum(whole)} cut off (by the relay service with libp2p's default 128 KiB limit)")


if __name__ == "__main__":
    main()
