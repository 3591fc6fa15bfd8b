"""One coordinator under load: 1,000 simulated peers join and heartbeat, and a flood of calls without valid credentials
arrives, while a real small swarm trains.

A private run (``coordinator serve --join-token-file``) with 2 real peers (2 stages x 1 replica, the tiny GPT-J on
CPU) trains throughout. Its tokens/s is measured in three windows of equal length: without load (A), with the load
(B), and without it again (A'), so that drift over the run does not pass for the load's effect. During B this
process runs, as asyncio coroutines speaking the real gRPC protocol (``proto/hometrain.proto``) over a few channels:

- ``--fake-peers`` peers that Join with the run's token and then Heartbeat with their own credential, every
  ``--heartbeat-interval`` seconds or as often as the coordinator's replies ask (it paces a large swarm to
  ``--heartbeat-rate`` beats a second; ``--heartbeat-rate 0`` turns that off), as a peer that is still loading its weights does (they stay JOINING: no DHT id);
- ``--bad-rate`` calls per second without valid credentials, in turn: a Join with a wrong token, a Heartbeat naming a
  fake peer's id with a wrong credential, a Heartbeat naming a real peer's id with no credential.

It prints the fake peers' heartbeat latency p50/p99 (measured by the caller, so this process's own scheduling is in
it: an upper bound on the coordinator's), the swarm's tokens/s with the load over without it (target >= 0.9), the
coordinator's resident memory before and under the load, the invalid calls refused and accepted (target 0), and the
real peers' longest heartbeat gap (as /api/status reports it).

    PYTHONPATH=. python bench/load.py [--fake-peers 1000] [--window 60] [--bad-rate 100]

On 2 cores the bench's own coroutines and the 2 peers share the CPUs with the coordinator; the CPU line says who
used what. ``--nice 10`` runs the simulated peers (which stand for other machines) behind the swarm.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from coordinator.local_swarm import LocalSwarm
from proto import hometrain_pb2 as pb
from proto import hometrain_pb2_grpc as pb_grpc
from proto.auth import CREDENTIAL_METADATA, new_secret
from proto.codec import PROTOCOL_VERSION

CHANNELS = 8  # fake peers share a few HTTP/2 connections (1,000 sockets would measure this process, not the coordinator)


@dataclass
class Load:
    """What the simulated peers and the flood saw."""

    latencies: list[float] = field(default_factory=list)  # seconds per heartbeat RPC
    joined: int = 0
    heartbeat_errors: int = 0
    refused: int = 0   # invalid calls the coordinator refused
    accepted: int = 0  # invalid calls it answered as if they were valid (target 0)
    fake_ids: list[str] = field(default_factory=list)


async def fake_peer(stub: pb_grpc.CoordinatorStub, token: str, index: int, interval: float, stop: asyncio.Event, load: Load) -> None:
    """Join with the run's token, then heartbeat with this peer's credential until ``stop``."""
    reply = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, join_token=token, name=f"fake-{index}", device="cpu",
                                           free_memory_bytes=64 << 30, throughput=1.0, requested_stage=-1), timeout=60)
    load.joined += 1
    load.fake_ids.append(reply.peer_id)
    interval = reply.heartbeat_interval or interval
    metadata = ((CREDENTIAL_METADATA, reply.credential),)
    request = pb.HeartbeatRequest(peer_id=reply.peer_id, stats=pb.PeerStats())
    await asyncio.sleep(interval * (index % 97) / 97)  # spread the beats over the interval, as independent peers are
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reply = await stub.Heartbeat(request, timeout=30, metadata=metadata)
            load.latencies.append(time.perf_counter() - started)
            interval = reply.heartbeat_interval or interval  # paced by the coordinator, as a real peer is
        except grpc.aio.AioRpcError:
            load.heartbeat_errors += 1
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.perf_counter() - started)))
        except asyncio.TimeoutError:
            pass


async def flood(stub: pb_grpc.CoordinatorStub, rate: float, real_ids: list[str], stop: asyncio.Event, load: Load) -> None:
    """``rate`` calls a second that must all be refused: a wrong join token, a fake's id with a wrong credential, a real
    peer's id with none."""

    async def one(kind: int) -> None:
        try:
            if kind == 0:
                await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, join_token=new_secret(), name="intruder"), timeout=30)
            elif kind == 1 and load.fake_ids:
                await stub.Heartbeat(pb.HeartbeatRequest(peer_id=load.fake_ids[len(load.fake_ids) // 2]), timeout=30,
                                     metadata=((CREDENTIAL_METADATA, new_secret()),))
            else:
                await stub.Heartbeat(pb.HeartbeatRequest(peer_id=real_ids[kind % len(real_ids)]), timeout=30)
            load.accepted += 1
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                load.refused += 1
            else:
                load.accepted += 1  # anything but a refusal counts against the coordinator

    tasks = set()
    for kind in itertools.cycle(range(3)):
        if stop.is_set():
            break
        task = asyncio.ensure_future(one(kind))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await asyncio.sleep(1.0 / rate)
    await asyncio.gather(*tasks, return_exceptions=True)


async def run_load(port: int, token: str, args: argparse.Namespace, real_ids: list[str], ready: asyncio.Event,
                   stop: asyncio.Event, load: Load) -> None:
    options = [("grpc.max_concurrent_streams", 2000)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(CHANNELS)]
    stubs = [pb_grpc.CoordinatorStub(c) for c in channels]
    try:
        peers = []
        for i in range(args.fake_peers):  # joins arrive in a burst, a few at a time
            peers.append(asyncio.ensure_future(fake_peer(stubs[i % CHANNELS], token, i, args.heartbeat_interval, stop, load)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        while load.joined < args.fake_peers and not all(p.done() for p in peers):
            await asyncio.sleep(0.2)
        ready.set()
        bad = asyncio.ensure_future(flood(stubs[0], args.bad_rate, real_ids, stop, load)) if args.bad_rate > 0 else None
        await stop.wait()
        await asyncio.gather(*peers, *([bad] if bad else []), return_exceptions=False)
    finally:
        for c in channels:
            await c.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tokens_per_second(swarm: LocalSwarm, seconds: float) -> tuple[float, int]:
    """Loss tokens the swarm trained per second over the next ``seconds`` (from /api/status totals), and rounds done."""
    first = swarm.status()
    time.sleep(seconds)
    last = swarm.status()
    return (last["tokens"] - first["tokens"]) / seconds, last["round"] - first["round"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake-peers", type=int, default=1000)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of each tokens/s window (A, B, A')")
    parser.add_argument("--bad-rate", type=float, default=100.0, help="invalid calls per second during B")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0, help="the fake peers' (the run's --heartbeat-interval)")
    parser.add_argument("--heartbeat-rate", type=float, default=None,
                        help="the coordinator's --heartbeat-rate (default: the run's; 0: unpaced, every peer beats every interval)")
    parser.add_argument("--nice", type=int, default=0, help="run the simulated peers at this niceness (they stand for other "
                        "machines: with 10, the swarm and coordinator get the cores first, and the latencies include this process's wait)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hometrain-load-") as tmp:
        token = new_secret()
        token_file = Path(tmp) / "token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        swarm = LocalSwarm(Path(tmp) / "run", "--eval-on", "off", "--model", "tiny", "--stages", "2", "--min-replicas", "1",
                           "--rounds", "0", "--join-token-file", str(token_file), "--heartbeat-interval", str(args.heartbeat_interval),
                           *(["--heartbeat-rate", str(args.heartbeat_rate)] if args.heartbeat_rate is not None else []),
                           log_dir=Path(tmp) / "logs")
        try:
            for stage in range(2):
                swarm.add_peer("--stage", str(stage), "--join-token-file", str(token_file))
            swarm.wait_for(lambda: swarm.status()["round"] >= 5, 600, "5 rounds of the real swarm")
            real_ids = [p["id"] for p in swarm.status()["peers"]]
            rss_before = rss_mib(swarm.coordinator.pid)
            cpu_a = cpu_seconds(swarm.coordinator.pid)
            tps_a, rounds_a = tokens_per_second(swarm, args.window)
            cpu_a = (cpu_seconds(swarm.coordinator.pid) - cpu_a) / args.window
            print(f"A  (no load): {tps_a:.0f} tokens/s over {args.window:.0f}s ({rounds_a} rounds)", flush=True)

            load, box = Load(), {}
            if args.nice:
                os.nice(args.nice)  # this process only: the swarm's processes are already running

            async def phase_b() -> None:
                ready, stop = asyncio.Event(), asyncio.Event()
                task = asyncio.ensure_future(run_load(swarm.port, token, args, real_ids, ready, stop, load))
                started = time.monotonic()
                await asyncio.wait({task, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    task.result()
                box["join_seconds"] = time.monotonic() - started
                print(f"{load.joined} fake peers joined in {box['join_seconds']:.1f}s", flush=True)
                await asyncio.sleep(swarm.status()["heartbeat"]["interval"])  # one full (paced) beat of every fake before measuring
                load.latencies.clear()
                cpu = cpu_seconds(swarm.coordinator.pid), cpu_seconds(os.getpid())
                box["b"] = await asyncio.to_thread(tokens_per_second, swarm, args.window)
                box["cpu"] = [(cpu_seconds(pid) - was) / args.window for pid, was in zip((swarm.coordinator.pid, os.getpid()), cpu)]
                box["rss"] = rss_mib(swarm.coordinator.pid)
                box["status"] = swarm.status()
                stop.set()
                await task

            asyncio.run(phase_b())
            tps_b, rounds_b = box["b"]
            print(f"B  (load):    {tps_b:.0f} tokens/s over {args.window:.0f}s ({rounds_b} rounds)", flush=True)
            swarm.wait_for(lambda: sum(p["state"] != "gone" for p in swarm.status()["peers"]) <= 2, 120, "the fake peers to expire")
            tps_a2, rounds_a2 = tokens_per_second(swarm, args.window)
            print(f"A' (no load): {tps_a2:.0f} tokens/s over {args.window:.0f}s ({rounds_a2} rounds)", flush=True)
            real = [p for p in swarm.status()["peers"] if p["id"] in real_ids]
        finally:
            swarm.stop()
    base = (tps_a + tps_a2) / 2
    lat = load.latencies
    paced = box["status"]["heartbeat"]
    print(f"\n{args.fake_peers} simulated peers + {args.bad_rate:g} invalid calls/s "
          f"against one coordinator; a real swarm of 2 stages x 1 replica trains; simulated peers at nice {args.nice}")
    print(f"heartbeat interval in B:   {paced['interval']:.1f}s (run's {args.heartbeat_interval:g}s, paced to at most "
          f"{paced['rate']:g} beats/s; timeout {paced['timeout']:.0f}s)")
    print(f"heartbeats during B:       {len(lat)} ({len(lat) / args.window:.0f}/s), errors {load.heartbeat_errors}")
    print(f"heartbeat latency:         p50 {1000 * percentile(lat, 0.5):.1f} ms, p99 {1000 * percentile(lat, 0.99):.1f} ms, "
          f"max {1000 * max(lat, default=float('nan')):.1f} ms (target p99 < 50 ms)")
    print(f"swarm tokens/s, B / A:     {tps_b / base:.3f} (A {tps_a:.0f}, A' {tps_a2:.0f}, B {tps_b:.0f}; target >= 0.9)")
    print(f"CPU (cores busy):          coordinator {cpu_a:.2f} in A, {box['cpu'][0]:.2f} in B; the simulated peers {box['cpu'][1]:.2f} in B")
    print(f"coordinator RSS:           {rss_before:.0f} MiB before, {box['rss']:.0f} MiB with {load.joined} more peers")
    print(f"invalid calls:             {load.refused} refused, {load.accepted} accepted (target 0)")
    print(f"real peers' heartbeat gap: max {max(p['heartbeat_gap_max'] for p in real):.2f}s (interval {paced['interval']:.1f}s in B)")
    print(f"fake peers' joins:         {load.joined} in {box['join_seconds']:.1f}s")
    if load.accepted:
        raise SystemExit("some invalid calls were accepted")


if __name__ == "__main__":
    main()
