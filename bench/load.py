"""One coordinator under load: 1,000 simulated peers join and heartbeat, and a flood of calls without valid credentials
arrives, while a real small swarm trains.

A private run (``coordinator serve --join-token-file``) with 2 real peers (2 stages x 1 replica, the tiny GPT-J on
CPU) trains throughout. Its tokens/s is measured in windows of equal length that alternate: without load (A) and with
it (B), ``A B A B ... A`` for ``--cycles`` load windows, so that each load window is compared with the no-load windows
on either side of it and the drift of this machine over minutes shows as a spread rather than passing for the load's
effect. A window's tokens/s counts whole rounds (those that ended in it, from /api/rounds). Before each B this process
starts, as asyncio coroutines speaking the real gRPC protocol (``proto/hometrain.proto``) over a few channels:

- ``--fake-peers`` peers that Join with the run's token and then Heartbeat with their own credential, every
  ``--heartbeat-interval`` seconds or as often as the coordinator's replies ask (it paces a large swarm to
  ``--heartbeat-rate`` beats a second; ``--heartbeat-rate 0`` turns that off), as a peer that is still loading its
  weights does (they stay JOINING: no DHT id);
- ``--bad-rate`` calls per second without valid credentials, in turn: a Join with a wrong token, a Heartbeat naming a
  fake peer's id with a wrong credential, a Heartbeat naming a real peer's id with no credential.

After each B the fake peers Leave, so the next A has the real swarm alone. Then, unless ``--no-control``, a control
window C: busy loops take as much CPU as the load took in that B (the simulator's, plus what the coordinator used
beyond its no-load share) and nothing calls the coordinator, so ``A B C A B C ... A``. On this one machine the
simulator stands for 1,000 other machines and the coordinator would have its own: a B that trains as fast as its C
lost to the load only the CPU it borrowed here, not the coordinator's attention.

It prints a table of the windows, then: each B's (and C's) tokens/s over the mean of the two A windows around it
(median, min and max; target >= 0.9 for B), B over C by cycle, the fake peers' heartbeat latency p50/p99 over all B (measured by the caller, so this process's own
scheduling is in it: an upper bound on the coordinator's; target p99 < 50 ms), the coordinator's resident memory
before and under the load, the invalid calls refused and accepted (target 0), and the real peers' longest heartbeat
gap (as /api/status reports it).

    PYTHONPATH=. python bench/load.py [--fake-peers 1000] [--window 30] [--cycles 3] [--bad-rate 100]

On 2 cores the bench's own coroutines and the 2 peers share the CPUs with the coordinator; the CPU line says who
used what. ``--nice 10`` runs the simulated peers (which stand for other machines) behind the swarm.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import subprocess
import sys
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
    credentials: list[tuple[str, str]] = field(default_factory=list)  # (peer id, credential), to leave with
    join_seconds: float = 0.0
    rss: float = float("nan")  # coordinator MiB with these peers joined
    status: dict = field(default_factory=dict)  # /api/status at the end of the window


async def fake_peer(stub: pb_grpc.CoordinatorStub, token: str, name: str, index: int, interval: float, stop: asyncio.Event,
                    load: Load) -> None:
    """Join with the run's token, then heartbeat with this peer's credential until ``stop``."""
    reply = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, join_token=token, name=name, device="cpu",
                                           free_memory_bytes=64 << 30, throughput=1.0, requested_stage=-1), timeout=60)
    load.joined += 1
    load.credentials.append((reply.peer_id, reply.credential))
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
            elif kind == 1 and load.credentials:
                await stub.Heartbeat(pb.HeartbeatRequest(peer_id=load.credentials[len(load.credentials) // 2][0]), timeout=30,
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


async def run_load(stubs: list[pb_grpc.CoordinatorStub], token: str, args: argparse.Namespace, real_ids: list[str],
                   ready: asyncio.Event, stop: asyncio.Event, load: Load, cycle: int) -> None:
    peers = []
    for i in range(args.fake_peers):  # joins arrive in a burst, a few at a time
        peers.append(asyncio.ensure_future(fake_peer(stubs[i % len(stubs)], token, f"fake-{cycle}-{i}", i, args.heartbeat_interval, stop, load)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    while load.joined < args.fake_peers and not all(p.done() for p in peers):
        await asyncio.sleep(0.2)
    ready.set()
    bad = asyncio.ensure_future(flood(stubs[0], args.bad_rate, real_ids, stop, load)) if args.bad_rate > 0 else None
    await stop.wait()
    await asyncio.gather(*peers, *([bad] if bad else []), return_exceptions=False)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Window:
    """One measured window: wall-clock bounds and the CPU seconds each watched process used in it."""

    kind: str  # "A" (no load) or "B" (load)
    start: float
    end: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # cores busy, by process
    latencies: list[float] = field(default_factory=list)
    tokens_per_second: float = float("nan")
    rounds: int = 0
    burnt: float = 0.0  # C: cores the busy loops took


def window_throughput(rounds: list[dict], window: Window) -> None:
    """Tokens/s of the rounds that ended inside ``window``, timed from the end of the round before the first of them
    to the end of the last: whole rounds, so a window's edges do not cut a round's tokens in two."""
    ends = sorted((r["ended"], r["tokens"]) for r in rounds if r.get("ended"))
    inside = [(t, n) for t, n in ends if window.start < t <= window.end]
    before = [t for t, _ in ends if t <= window.start]
    if len(inside) < 2 or not before:
        return
    window.rounds = len(inside)
    window.tokens_per_second = sum(n for _, n in inside) / (inside[-1][0] - before[-1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def measure(kind: str, seconds: float, pids: dict[str, int], latencies: list[float]) -> Window:
    """Wait ``seconds`` and record the window; ``latencies`` (the live list the fake peers append to) is emptied at
    its start and copied at its end."""
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    latencies.clear()
    window = Window(kind, time.time())
    await asyncio.sleep(seconds)
    window.end = time.time()
    window.latencies = list(latencies)
    window.cpu = {name: (cpu_seconds(pid) - cpu[name]) / seconds for name, pid in pids.items()}
    return window


async def leave_all(stubs: list[pb_grpc.CoordinatorStub], load: Load) -> None:
    """Every fake peer leaves, with its own credential, so the next no-load window starts with the real swarm alone."""
    async def one(i: int, peer_id: str, credential: str) -> None:
        await stubs[i % len(stubs)].Leave(pb.LeaveRequest(peer_id=peer_id), timeout=60, metadata=((CREDENTIAL_METADATA, credential),))

    await asyncio.gather(*(one(i, pid, cred) for i, (pid, cred) in enumerate(load.credentials)))


async def load_window(swarm: LocalSwarm, token: str, args: argparse.Namespace, real_ids: list[str], pids: dict[str, int],
                      cycle: int) -> tuple[Window, Load]:
    """Fake peers join, beat once at the pace asked, then one window is measured under their beats and the flood;
    then they leave."""
    load, ready, stop = Load(), asyncio.Event(), asyncio.Event()
    options = [("grpc.max_concurrent_streams", 2000)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{swarm.port}", options=options) for _ in range(CHANNELS)]
    stubs = [pb_grpc.CoordinatorStub(c) for c in channels]
    try:
        task = asyncio.ensure_future(run_load(stubs, token, args, real_ids, ready, stop, load, cycle))
        started = time.monotonic()
        await asyncio.wait({task, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        load.join_seconds = time.monotonic() - started
        interval = (await asyncio.to_thread(swarm.status))["heartbeat"]["interval"]
        await asyncio.sleep(interval)  # one full (paced) beat of every fake before measuring
        window = await measure("B", args.window, pids, load.latencies)
        load.status = await asyncio.to_thread(swarm.status)
        load.rss = rss_mib(swarm.coordinator.pid)
        stop.set()
        await task
        await leave_all(stubs, load)
    finally:
        for c in channels:
            await c.close()
    return window, load


BURNER = """import sys, time
duty, end = float(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    started = time.monotonic()
    while time.monotonic() - started < 0.01 * duty:
        pass
    time.sleep(0.01 * (1 - duty))
"""


async def burn_window(cores: float, seconds: float, pids: dict[str, int]) -> Window:
    """The control: a window in which busy loops take ``cores`` of CPU (what the load's coordinator work and simulator
    took in the B window before it) and nothing calls the coordinator. A B that trains as fast as its C lost to the
    load only the CPU this one machine lent it; on separate hosts that share is not the swarm's."""
    n = max(1, math.ceil(cores))
    burners = [subprocess.Popen([sys.executable, "-c", BURNER, str(min(1.0, cores / n)), str(seconds + 1)]) for _ in range(n)]
    try:
        await asyncio.sleep(0.5)
        window = await measure("C", seconds, pids, [])
        window.burnt = cores
        return window
    finally:
        for b in burners:
            b.kill()
            b.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake-peers", type=int, default=1000)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of each tokens/s window")
    parser.add_argument("--cycles", type=int, default=3, help="load windows, each between two no-load windows (A B A B ... A)")
    parser.add_argument("--bad-rate", type=float, default=100.0, help="invalid calls per second during B")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="after each B, a window C in which busy loops take the CPU the load took, and nothing else happens")
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
            pids = {"coordinator": swarm.coordinator.pid, "simulator": os.getpid()}
            rss_before = rss_mib(swarm.coordinator.pid)
            if args.nice:
                os.nice(args.nice)  # this process only: the swarm's processes are already running

            async def alternate() -> tuple[list[Window], list[Load]]:
                windows, loads, idle = [], [], []
                for cycle in range(args.cycles + 1):
                    windows.append(await measure("A", args.window, pids, idle))
                    print(f"A{cycle} done", flush=True)
                    if cycle == args.cycles:
                        break
                    window, load = await load_window(swarm, token, args, real_ids, pids, cycle)
                    windows.append(window)
                    loads.append(load)
                    print(f"B{cycle + 1} done: {load.joined} fake peers joined in {load.join_seconds:.1f}s", flush=True)
                    if args.control:
                        cores = window.cpu["simulator"] + max(0.0, window.cpu["coordinator"] - windows[-2].cpu["coordinator"])
                        windows.append(await burn_window(cores, args.window, pids))
                        print(f"C{cycle + 1} done: {cores:.2f} cores burnt", flush=True)
                return windows, loads

            windows, loads = asyncio.run(alternate())
            rounds = swarm.rounds()
            for window in windows:
                window_throughput(rounds, window)
            real = [p for p in swarm.status()["peers"] if p["id"] in real_ids]
        finally:
            swarm.stop()
    report(args, windows, loads, real, rss_before)


def report(args: argparse.Namespace, windows: list[Window], loads: list[Load], real: list[dict], rss_before: float) -> None:
    """The table: per load window, its ratio to the mean of the no-load windows on either side, then the spread."""
    paced = loads[0].status["heartbeat"]
    print(f"\n{args.fake_peers} simulated peers + {args.bad_rate:g} invalid calls/s against one coordinator; a real swarm of "
          f"2 stages x 1 replica trains; {args.cycles} load windows of {args.window:g}s, each between two without load; "
          f"simulated peers at nice {args.nice}")
    print(f"heartbeat interval in B: {paced['interval']:.1f}s (run's {args.heartbeat_interval:g}s, paced to at most "
          f"{paced['rate']:g} beats/s; timeout {paced['timeout']:.0f}s)\n")
    print("| window | tokens/s | rounds | / mean(A before, A after) | heartbeats/s | p50 ms | p99 ms | coordinator cores | simulator cores | burnt cores |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios: dict[str, list[float]] = {"B": [], "C": []}
    a_windows = [w for w in windows if w.kind == "A"]
    cycle = -1  # the A windows seen so far, less one: B and C of a cycle lie between a_windows[cycle] and [cycle + 1]
    for w in windows:
        ratio = ""
        if w.kind == "A":
            cycle += 1
        else:
            ratios[w.kind].append(w.tokens_per_second / ((a_windows[cycle].tokens_per_second + a_windows[cycle + 1].tokens_per_second) / 2))
            ratio = f"{ratios[w.kind][-1]:.3f}"
        lat = (f"{len(w.latencies) / args.window:.0f} | {1000 * percentile(w.latencies, 0.5):.1f} | {1000 * percentile(w.latencies, 0.99):.1f}"
               if w.kind == "B" else " | | ")
        label = f"{w.kind}{cycle if w.kind == 'A' else cycle + 1}"
        print(f"| {label} | {w.tokens_per_second:.0f} | {w.rounds} | {ratio} | {lat} | {w.cpu['coordinator']:.2f} | "
              f"{w.cpu['simulator']:.2f} | {f'{w.burnt:.2f}' if w.kind == 'C' else ''} |")
    no_load = [w.tokens_per_second for w in a_windows]
    lat = [x for w in windows if w.kind == "B" for x in w.latencies]
    refused, accepted = sum(l.refused for l in loads), sum(l.accepted for l in loads)
    print()
    for kind, what in (("B", "the load"), ("C", "the control (the load's CPU burnt, no calls)")):
        if ratios[kind]:
            r = sorted(ratios[kind])
            print(f"tokens/s, {kind} / its neighbours ({what}): median {r[len(r) // 2]:.3f}, min {r[0]:.3f}, max {r[-1]:.3f}"
                  f"{' (target >= 0.9)' if kind == 'B' else ''}")
    if ratios["C"]:
        print(f"B / C, by cycle (the load beside its CPU alone): {', '.join(f'{b / c:.3f}' for b, c in zip(ratios['B'], ratios['C']))}")
    print(f"no-load windows alone spread {min(no_load):.0f}-{max(no_load):.0f} tokens/s ({max(no_load) / min(no_load) - 1:.0%})")
    print(f"heartbeat latency, all B: p50 {1000 * percentile(lat, 0.5):.1f} ms, p99 {1000 * percentile(lat, 0.99):.1f} ms, "
          f"max {1000 * max(lat, default=float('nan')):.1f} ms over {len(lat)} beats, "
          f"{sum(l.heartbeat_errors for l in loads)} errors (target p99 < 50 ms)")
    print(f"coordinator RSS: {rss_before:.0f} MiB before, {', '.join(f'{l.rss:.0f}' for l in loads)} MiB with {args.fake_peers} more peers, by cycle")
    print(f"invalid calls: {refused} refused, {accepted} accepted (target 0)")
    print(f"joins: {args.fake_peers} in {', '.join(f'{l.join_seconds:.1f}' for l in loads)} s, by cycle")
    print(f"real peers' heartbeat gap: max {max(p['heartbeat_gap_max'] for p in real):.2f}s")
    if accepted:
        raise SystemExit("some invalid calls were accepted")


if __name__ == "__main__":
    main()
