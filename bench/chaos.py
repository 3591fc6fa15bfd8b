"""Churn: train the demo-sized swarm while peers and the coordinator are killed with SIGKILL.

The chaos run (tiny model, 2 stages, 4 CPU peers, fast failure detection) trains for
--minutes; every --every seconds a random peer is SIGKILLed and a new peer joins in its place
--restart-after seconds later, or, with probability --coordinator-p, the coordinator is
SIGKILLed and restarted on the same ports and state directory. Faults over, it waits up to
--settle seconds for one more round, to show that training goes on. A churn-free run (fresh
state directory, same flags) then trains the same number of rounds, and the two are compared.

Prints rounds completed, rounds lost (numbers missing from /api/rounds; must be 0), rounds
recorded without a loss (recovered after a coordinator restart, or every sample dropped),
samples dropped, checkpoints verified (every round-* directory: files and signature), faults
injected, peers that exited without being killed, the longest time without a newly trained
round, and the final loss (mean of the last 5 rounds with a loss) of both runs over the same
rounds. Exits 1 if a round was lost or a checkpoint does not verify.

    python bench/chaos.py [--minutes 3] [--every 20] [--restart-after 5] [--coordinator-p 0.2]
                          [--settle 120] [--seed 0] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from coordinator.checkpoint import load_signing_key, public_key_hex
from coordinator.local_swarm import LocalSwarm
from proto.manifest import ManifestError, verify_directory

PEERS = 4
FLAGS = ("--eval-on", "off", "--model", "tiny", "--stages", "2", "--heartbeat-interval", "1", "--heartbeat-timeout", "4", "--sync-timeout", "5",
         "--deadline-floor", "5", "--round-timeout", "30", "--checkpoint-every", "5")


def start(state_dir: Path, *extra: str) -> LocalSwarm:
    swarm = LocalSwarm(state_dir, *FLAGS, *extra, log_dir=state_dir / "logs")
    for _ in range(PEERS):
        swarm.add_peer()
    return swarm


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below ``pid``, read from /proc (Linux)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def kill_orphans(orphans: list[tuple[int, str]]) -> int:
    """SIGKILL the processes a killed process left behind (if the pid still is that process); return how many ran."""
    alive = 0
    for pid, started in orphans:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == started:
                os.kill(pid, signal.SIGKILL)
                alive += 1
        except (OSError, IndexError):
            pass
    return alive


def round_now(swarm: LocalSwarm) -> int | None:
    status = swarm.status()
    return status["round"] if status else None


def trained_round(swarm: LocalSwarm) -> int | None:
    """The last round, if it was trained (not recorded as recovered after a coordinator restart)."""
    status = swarm.status()
    return status["round"] if status and status["loss"] is not None else None


def first_round(swarm: LocalSwarm) -> bool:
    if all(p.poll() is not None for p in swarm.peers):
        raise RuntimeError(f"every peer exited before the first round\n{swarm.log_tail()}")
    return (round_now(swarm) or 0) >= 1


def chaos_run(swarm: LocalSwarm, args: argparse.Namespace, orphans: list[tuple[int, str]]) -> dict:
    """Inject faults for --minutes, then wait up to --settle s (no faults) for one more trained round.

    Only the process itself is SIGKILLed; its children (which outlive it) are added to ``orphans``.
    Returns the fault counts, peers that exited without being killed, the longest time without
    a newly trained round (polled every 0.5 s), and whether training went on after the last fault.
    """
    rng = random.Random(args.seed)
    swarm.wait_for(lambda: first_round(swarm), 600, "the first round")
    faults = {"peer": 0, "coordinator": 0}
    killed: set[int] = set()
    began = last_progress = time.monotonic()
    end = began + args.minutes * 60
    last_round, end_round, stall = trained_round(swarm) or 0, None, 0.0
    next_fault = began + args.every
    restart_at: float | None = None  # when the killed process is replaced
    restart = ""
    while True:
        now = time.monotonic()
        if (current := trained_round(swarm)) is not None and current > last_round:
            last_round, last_progress = current, now
        stall = max(stall, now - last_progress)
        if restart_at is not None and now >= restart_at:
            if restart == "coordinator":
                swarm.start_coordinator()
            else:
                swarm.add_peer()
            restart_at = None
        elif restart_at is None and next_fault <= now < end:
            next_fault += args.every
            live = [p for p in swarm.peers if p.poll() is None]
            restart = "coordinator" if rng.random() < args.coordinator_p or not live else "peer"
            victim = swarm.coordinator if restart == "coordinator" else rng.choice(live)
            orphans.extend(descendants(victim.pid))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed.add(victim.pid)
            faults[restart] += 1
            restart_at = now + args.restart_after
            name = "coordinator" if restart == "coordinator" else f"peer-{swarm.peers.index(victim)}"
            print(f"  t={now - began:4.0f}s after round {last_round}: SIGKILL {name}", flush=True)
        if now >= end and restart_at is None:
            end_round = last_round if end_round is None else end_round
            if last_round > end_round or now >= end + args.settle:
                break
        time.sleep(0.5)
    crashed = [p.pid for p in swarm.peers if p.poll() is not None and p.pid not in killed]
    return {**faults, "crashed": crashed, "stall": stall, "resumed": last_round > end_round}


def verify_checkpoints(state_dir: Path) -> tuple[int, list[str]]:
    key = public_key_hex(load_signing_key(state_dir / "signing_key.pem"))
    dirs = sorted((state_dir / "checkpoints").glob("round-*"))
    failures = []
    for d in dirs:
        try:
            verify_directory(d, key)
        except (ManifestError, OSError, ValueError) as exc:
            failures.append(f"{d.name}: {exc}")
    return len(dirs), failures


def final_loss(rounds: list[dict], numbers: list[int]) -> float:
    losses = {r["round"]: r["loss"] for r in rounds}
    return sum(losses[n] for n in numbers) / len(numbers)


def listed(numbers: list[int]) -> str:
    return f"{len(numbers)} {numbers}" if numbers else "0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3, help="length of the chaos run")
    parser.add_argument("--every", type=float, default=20, help="seconds between faults")
    parser.add_argument("--restart-after", type=float, default=5, help="seconds before the killed process is replaced")
    parser.add_argument("--coordinator-p", type=float, default=0.2, help="probability a fault kills the coordinator")
    parser.add_argument("--settle", type=float, default=120, help="seconds to wait, faults over, for one more round")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (logs, checkpoints) and print where")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM as on Ctrl-C

    tmp = Path(tempfile.mkdtemp(prefix="hometrain-chaos-"))
    try:
        print(f"chaos run: {PEERS} peers, {args.minutes:g} min, a fault every {args.every:g}s "
              f"(coordinator p={args.coordinator_p:g}, restart after {args.restart_after:g}s, seed {args.seed})", flush=True)
        swarm, orphans = start(tmp / "chaos", "--rounds", "0"), []
        try:
            faults = chaos_run(swarm, args, orphans)
            chaos = swarm.rounds()
        finally:
            swarm.stop()
            orphans_alive = kill_orphans(orphans)
        checked, failures = verify_checkpoints(tmp / "chaos")

        last = max(r["round"] for r in chaos)
        print(f"churn-free run: {last} rounds", flush=True)
        swarm = start(tmp / "clean", "--rounds", str(last), "--linger")
        try:
            swarm.wait_for(lambda: (round_now(swarm) or 0) >= last, 600 + 240 * args.minutes, f"{last} rounds without churn")
            clean = swarm.rounds()
        finally:
            swarm.stop()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"run directories kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    numbers = {r["round"] for r in chaos}
    lost = sorted(set(range(1, last + 1)) - numbers)
    recovered = [r["round"] for r in chaos if r["loss"] is None and not r["dropped"]]
    emptied = [r["round"] for r in chaos if r["loss"] is None and r["dropped"]]
    tail = [r["round"] for r in chaos if r["loss"] is not None][-5:]
    chaos_loss, clean_loss = final_loss(chaos, tail), final_loss(clean, tail)
    print(f"rounds completed     : {last}")
    print(f"rounds lost          : {listed(lost)}")
    print(f"rounds recovered     : {listed(recovered)} (no loss: stepped while the coordinator was down)")
    print(f"rounds all dropped   : {listed(emptied)} (no loss: every sample dropped)")
    print(f"samples dropped      : {sum(r['dropped'] for r in chaos)} (churn-free: {sum(r['dropped'] for r in clean)})")
    print(f"checkpoints verified : {checked - len(failures)}/{checked}")
    for failure in failures:
        print(f"  {failure}")
    print(f"faults injected      : {faults['peer']} peer kills, {faults['coordinator']} coordinator kills")
    print(f"peers that crashed   : {len(faults['crashed'])} (exited without being killed)")
    print(f"orphaned processes   : {orphans_alive} (children of killed processes still running at the end; now killed)")
    print(f"longest stall        : {faults['stall']:.0f}s without a newly trained round")
    print(f"after the last fault : {'training went on' if faults['resumed'] else f'no newly trained round within {args.settle:g}s'}")
    print(f"final loss           : {chaos_loss:.4f} with churn, {clean_loss:.4f} without (rounds {', '.join(map(str, tail))}), "
          f"gap {(chaos_loss - clean_loss) / clean_loss:+.2%}")
    return 1 if lost or failures else 0


if __name__ == "__main__":
    sys.exit(main())
