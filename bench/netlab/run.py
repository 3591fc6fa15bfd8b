"""hometrain vs. hivemind on emulated home links: tokens/s, bytes per token and loss per link profile.

    python -m bench.netlab.run [--profiles lan home home-asym oregon-tokyo sydney-frankfurt]
                               [--configs hometrain hometrain-compressed hivemind] [--rounds 30]
                               [--nat] [--kill-one] [--out results.json] [--log-dir DIR]

Each cell (configuration x profile) builds a fresh bench.netlab Lab:

* host ``coord`` on the ``lan`` profile (1 Gbit/s, 1 ms RTT), public: the coordinator is the one
  machine a run's organiser rents, in a data centre, so what the table measures is the peers'
  links. For hivemind the host is built but idle (hivemind has no coordinator; peer 0 is the
  DHT's bootstrap node).
* hosts ``p0``..``p3`` on the cell's profile, each with a link of its own; with ``--nat`` each is
  behind a NAT of its own (inbound connections dropped), only the coordinator is public.
* hometrain: ``coordinator serve --stages 2 --min-replicas 2`` and four ``peer join`` (p0, p1:
  stage 0; p2, p3: stage 1), causal LM from random init (``--ul2-tokens 0 --instruction-share 0``,
  the data hivemind_baseline.py trains on), no checkpoint inside the run. ``hometrain-compressed``
  adds ``--activation-compression direct --activation-bits 4 --gradient-bits 4 --boundary-block 256
  --sync-compression cocktail`` (bench/compression.py's direct4+g4/256+cocktail).
* hivemind: four bench/netlab/hivemind_baseline.py peers, the same model, data, global batch (16
  samples) and AdamW, ``--epochs`` = rounds (one epoch = one optimizer step, as a hometrain round).

Measurements (the same for every cell unless said):

* window: hometrain's rounds are timed by the coordinator's store (each round's ``ended``,
  ``coordinator.sqlite``). Start-up is excluded: the window starts at the end of the first round
  in which every peer received sync frames and by whose end every peer had received pipeline
  frames (activations or gradients), i.e. every peer was reachable and working (with --nat that
  is after the relays came up); it ends at the end of the last round. tokens/s = tokens of the rounds in the window / its length.
* hivemind: tokens/s = sum over peers of hivemind_baseline's tokens_per_second (each peer's
  tokens over its own wall time from its first step to its last epoch, less the wait for the
  other peers); it includes the first epoch.
* kernel bytes: each peer host's eth0 tx bytes (frames incl. TCP/IP/Ethernet headers, ACKs, DHT,
  gRPC, libp2p) from /proc/net/dev sampled every 0.1 s inside the host. project bytes: the
  peers' own ``bytes_sent`` (all kinds) from /api/status. A peer's counters reach the coordinator
  with each heartbeat (2 s) and step report, time-stamped there (``last_seen``); per peer both
  counts are taken over the same interval: from its last report at or before the window's start
  to its first report at or after the window's end (the kernel series interpolated at those
  instants). bytes/token = the sum over peers / tokens in the window. For hivemind, kernel
  bytes are hivemind_baseline's own eth0 count over its training window (p2pd counts no bytes:
  project bytes and the ratio are n/a).
* final loss: mean of the last 3 rounds (hivemind: of the last 3 epochs' mean microbatch loss,
  averaged over the peers).

``--kill-one`` (hometrain configurations only; with ``--min-replicas 1`` so a stage left with one
replica keeps training): once a third of the measured rounds are done, SIGKILL the process group
of p3 (a stage-1 replica) and check that rounds keep completing with tokens > 0.

Logs of every process go under a temporary directory (printed at the start; --log-dir to choose).
A cell that fails prints the host, the process and its log tail, and the table shows FAILED.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_NAMES = ("lan", "home", "home-asym", "oregon-tokyo", "sydney-frankfurt")
CONFIGS = ("hometrain", "hometrain-compressed", "hivemind")
COMPRESSED = ["--activation-compression", "direct", "--activation-bits", "4", "--gradient-bits", "4",
              "--boundary-block", "256", "--sync-compression", "cocktail"]
DATA = ["--ul2-tokens", "0", "--instruction-share", "0"]
COORD_PROFILE = "lan"
NUM_PEERS = 4
STAGES = 2
GRPC_PORT, HTTP_PORT, DHT_PORT, P2P_PORT = 50051, 8080, 4000, 4001
RATIO_TOLERANCE = 0.05
SAMPLE_INTERVAL = 0.1
POLL_INTERVAL = 0.25
PIPELINE_KINDS = ("activations", "gradients")
COUNT_CHAIN = "HTCOUNT"  # per-destination byte counters on a peer host's eth0 (diagnostics: where the kernel's bytes go)
COUNT_BUCKETS = ("coordinator_grpc", "coordinator_other", "elsewhere")  # gRPC control; DHT/relay/dial-back; other peers
FLAT_BYTES = 4096        # a host "idle" around a report: at most this many bytes sent between the two samples around it
FLAT_MAX_GAP = 0.35      # ... which are at most this far apart, s
ETHERNET_HEADER = 14     # iptables counts IP packets; the interface counts frames
ENV_EXTRA = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR",
             "TOKENIZERS_PARALLELISM": "false"}


class RunError(RuntimeError):
    """A cell that cannot go on; the message names the host and process and holds its log tail."""


# ============================================================================ agents (run inside a host)

def agent_sample(interval: float, iface: str, iptables: str = "", every: int = 3) -> int:
    """Print ``time tx_bytes rx_bytes`` of ``iface`` in this namespace every ``interval`` s until stdout closes;
    with ``iptables``, every ``every``-th time also ``IPT time packets bytes ...`` of the rules in chain COUNT_CHAIN."""
    n = 0
    while True:
        n += 1
        if iptables and n % every == 1:
            try:
                listing = subprocess.run([iptables, "-w", "-nvxL", COUNT_CHAIN], capture_output=True, text=True, timeout=10).stdout
                values = [f"{row.split()[0]} {row.split()[1]}" for row in listing.splitlines()[2:] if row.split()]
                print(f"IPT {time.time():.4f} {' '.join(values)}", flush=True)
            except (OSError, subprocess.SubprocessError, IndexError, BrokenPipeError):
                pass
        try:
            with open("/proc/net/dev") as f:
                lines = f.read().splitlines()[2:]
        except OSError as exc:
            print(f"ERROR {exc}", flush=True)
            return 1
        now = time.time()
        for line in lines:
            name, _, rest = line.partition(":")
            if name.strip() == iface:
                fields = rest.split()
                try:
                    print(f"{now:.4f} {fields[8]} {fields[0]}", flush=True)  # tx, rx
                except BrokenPipeError:
                    return 0
                break
        time.sleep(interval)


def agent_http(port: int) -> int:
    """For each path read on stdin, GET http://127.0.0.1:port/path and print one JSON line: {"ok", "body"|"error"}."""
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                out = {"ok": True, "body": json.loads(response.read().decode())}
        except (OSError, ValueError, urllib.error.URLError) as exc:
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            print(json.dumps(out), flush=True)
        except BrokenPipeError:
            return 0
    return 0


# ============================================================================ helpers in the runner

def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text[-lines:]) or "(empty)"


@dataclass
class Proc:
    """A process we started in a lab host, with its log."""

    role: str
    host: Any
    popen: subprocess.Popen
    log: Path
    expected_exit: bool = False   # hivemind peers exit when done; a killed peer is expected gone

    def describe(self) -> str:
        return f"{self.role} on host {self.host.name!r} ({self.host.ip}, pid {self.popen.pid})"

    def failure(self, what: str) -> str:
        return f"{self.describe()} {what}; log {self.log} ends with:\n{log_tail(self.log)}"


class Sampler:
    """Kernel tx/rx counters of one host's eth0, sampled inside the host every SAMPLE_INTERVAL."""

    def __init__(self, lab, host, python: str, coordinator_ip: str = "") -> None:
        self.host = host
        self.times: list[float] = []
        self.tx: list[int] = []
        self.rx: list[int] = []
        self.ipt_times: list[float] = []
        self.ipt: list[list[int]] = []   # per sample: packets, bytes of each COUNT_BUCKETS rule
        self.error = ""
        extra = []
        if coordinator_ip:
            extra = ["--iptables", install_counters(host, coordinator_ip)]
        self.proc = host.popen([python, "-m", "bench.netlab.run", "_sample", "--interval", str(SAMPLE_INTERVAL), *extra],
                               env=lab.python_env(ENV_EXTRA), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True, name=f"sampler-{host.name}")
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts and parts[0] == "IPT":
                try:
                    values = [int(x) for x in parts[2:]]
                    if len(values) == 2 * len(COUNT_BUCKETS):
                        self.ipt.append(values)
                        self.ipt_times.append(float(parts[1]))
                except ValueError:
                    pass
            elif len(parts) == 3 and parts[0] != "ERROR":
                self.times.append(float(parts[0]))
                self.tx.append(int(parts[1]))
                self.rx.append(int(parts[2]))
            else:
                self.error = line.strip()

    def wait_first(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.times:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RunError(f"the counter sampler on host {self.host.name!r} gave no sample ({self.error or 'no output'})")
            time.sleep(0.05)

    def at(self, t: float, series: str = "tx") -> float:
        """Counter value at time ``t`` (linear between samples; clamped at the ends)."""
        values = self.tx if series == "tx" else self.rx
        n = len(self.times)
        times = self.times[:n]
        i = bisect.bisect_left(times, t)
        if i <= 0:
            return float(values[0])
        if i >= n:
            return float(values[n - 1])
        t0, t1 = times[i - 1], times[i]
        v0, v1 = values[i - 1], values[i]
        return v0 + (v1 - v0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)


    def flat_at(self, t: float) -> float | None:
        """The tx counter at ``t`` if the host sent at most FLAT_BYTES between the samples around ``t`` (so the value
        is known to within that, whatever the interpolation); None when it was busy (or no sample follows yet)."""
        n = len(self.times)
        i = bisect.bisect_left(self.times[:n], t)
        if i <= 0 or i >= n:
            return None
        if self.times[i] - self.times[i - 1] > FLAT_MAX_GAP or self.tx[i] - self.tx[i - 1] > FLAT_BYTES:
            return None
        return self.at(t)

    def buckets(self, t0: float, t1: float) -> dict[str, float] | None:
        """Frame bytes sent on eth0 by destination between t0 and t1 (iptables counters, ~1 s samples, interpolated)."""
        n = len(self.ipt_times)
        if n < 2:
            return None
        times, rows = self.ipt_times[:n], self.ipt[:n]

        def at(t: float) -> list[float]:
            i = min(max(bisect.bisect_left(times, t), 1), n - 1)
            ta, tb = times[i - 1], times[i]
            w = min(max((t - ta) / (tb - ta), 0.0), 1.0) if tb > ta else 0.0
            return [a + (b - a) * w for a, b in zip(rows[i - 1], rows[i])]

        a, b = at(t0), at(t1)
        d = [y - x for x, y in zip(a, b)]
        return {name: d[2 * j + 1] + ETHERNET_HEADER * d[2 * j] for j, name in enumerate(COUNT_BUCKETS)}


def install_counters(host, coordinator_ip: str) -> str:
    """Counting rules (no verdicts) on ``host``'s eth0 output, one per COUNT_BUCKETS; returns the iptables path."""
    from bench.netlab.commands import tool

    ipt = tool("iptables")
    rules = [["-N", COUNT_CHAIN], ["-A", "OUTPUT", "-o", "eth0", "-j", COUNT_CHAIN],
             ["-A", COUNT_CHAIN, "-d", f"{coordinator_ip}/32", "-p", "tcp", "--dport", str(GRPC_PORT), "-j", "RETURN"],
             ["-A", COUNT_CHAIN, "-d", f"{coordinator_ip}/32", "-j", "RETURN"],
             ["-A", COUNT_CHAIN, "-j", "RETURN"]]
    for rule in rules:
        host.run([ipt, "-w", *rule], timeout=30)
    return ipt


class Http:
    """GETs the coordinator's HTTP API from inside its host (the runner is outside every lab namespace)."""

    def __init__(self, lab, host, python: str, port: int) -> None:
        self.host = host
        self.lock = threading.Lock()
        self.proc = host.popen([python, "-m", "bench.netlab.run", "_http", "--port", str(port)], env=lab.python_env(ENV_EXTRA),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def get(self, path: str, timeout: float = 15.0) -> Any:
        """The JSON at ``path``, or None when the coordinator does not answer."""
        with self.lock:
            if self.proc.poll() is not None:
                raise RunError(f"the HTTP helper on host {self.host.name!r} exited with {self.proc.returncode}")
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(path + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                raise RunError(f"the HTTP helper on host {self.host.name!r} gave no answer for {path} within {timeout:g} s")
            line = self.proc.stdout.readline()
        if not line:
            raise RunError(f"the HTTP helper on host {self.host.name!r} closed its output")
        reply = json.loads(line)
        return reply["body"] if reply["ok"] else None


@dataclass
class PeerSample:
    t: float                  # coordinator's last_seen: when this report arrived
    sent: dict[str, int]
    received: dict[str, int]
    microbatches: int
    state: str
    reachability: str | None


@dataclass
class PeerTrack:
    name: str
    samples: list[PeerSample] = field(default_factory=list)
    reachability: str | None = None
    stage: int | None = None

    def add(self, entry: dict) -> None:
        t = float(entry["last_seen"])
        self.reachability = entry.get("reachability") or self.reachability
        self.stage = entry.get("stage")
        if self.samples and self.samples[-1].t >= t:
            return
        self.samples.append(PeerSample(t, dict(entry.get("bytes_sent") or {}), dict(entry.get("bytes_received") or {}),
                                       int(entry.get("microbatches") or 0), entry.get("state", ""), entry.get("reachability")))

    def at_or_before(self, t: float) -> PeerSample | None:
        found = None
        for s in self.samples:
            if s.t <= t:
                found = s
            else:
                break
        return found

    def at_or_after(self, t: float) -> PeerSample | None:
        return next((s for s in self.samples if s.t >= t), None)


def total(counts: dict[str, int], kinds: tuple[str, ...] | None = None) -> int:
    return sum(v for k, v in counts.items() if kinds is None or k in kinds)


def read_rounds(db: Path) -> list[dict]:
    """Completed rounds from the coordinator's store, read-only: round, tokens, loss, started, ended, dropped, samples."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT round, tokens, loss, started, ended, dropped, samples, participants FROM rounds ORDER BY round").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []
    return [{"round": r[0], "tokens": r[1], "loss": r[2], "started": r[3], "ended": r[4], "dropped": r[5], "samples": r[6],
             "participants": len(json.loads(r[7]))} for r in rows]


# ============================================================================ one cell

@dataclass
class CellSpec:
    config: str
    profile: str
    rounds: int
    nat: bool
    kill_one: bool
    log_dir: Path
    run_timeout: float
    stall_timeout: float
    startup_timeout: float
    python: str


class Cell:
    """One configuration on one profile in a lab of its own."""

    def __init__(self, spec: CellSpec) -> None:
        self.spec = spec
        self.procs: list[Proc] = []
        base = spec.log_dir / f"{spec.config}-{spec.profile}{'-nat' if spec.nat else ''}{'-kill' if spec.kill_one else ''}"
        self.log_dir, n = base, 1
        while self.log_dir.exists():  # a fresh directory per cell: a coordinator would resume the state it finds there
            n += 1
            self.log_dir = base.with_name(f"{base.name}-{n}")
        self.log_dir.mkdir(parents=True)
        self.started = time.time()
        self.deadline = time.monotonic() + spec.run_timeout

    def say(self, text: str) -> None:
        print(f"  [{time.time() - self.started:7.1f}s] {text}", flush=True)

    def spawn(self, role: str, host, argv: list[str], **extra) -> Proc:
        log = self.log_dir / f"{host.name}-{role}.log"
        handle = open(log, "ab")
        try:
            popen = host.popen(argv, env=host.lab.python_env(ENV_EXTRA), stdout=handle, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, **extra)
        finally:
            handle.close()  # the child holds its own copy
        proc = Proc(role, host, popen, log)
        self.procs.append(proc)
        return proc

    def check_procs(self) -> None:
        for p in self.procs:
            if not p.expected_exit and p.popen.poll() is not None:
                raise RunError(p.failure(f"exited with status {p.popen.returncode}"))

    def check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise RunError(f"{self.spec.config} on {self.spec.profile}: the run took longer than --run-timeout "
                           f"{self.spec.run_timeout:g} s while {what}; logs in {self.log_dir}\n" + self.all_tails())

    def all_tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- {p.describe()}: {p.log}\n{log_tail(p.log, lines)}" for p in self.procs)

    def run(self) -> dict:
        from bench.netlab import Lab, LabConfig

        s = self.spec
        result: dict[str, Any] = {"config": s.config, "profile": s.profile, "nat": s.nat, "kill_one": s.kill_one,
                                  "rounds_target": s.rounds, "coordinator_profile": COORD_PROFILE, "logs": str(self.log_dir)}
        with Lab(LabConfig()) as lab:
            coord = lab.add_host("coord", COORD_PROFILE)
            peers = [lab.add_host(f"p{i}", s.profile, nat=s.nat) for i in range(NUM_PEERS)]
            self.say(f"lab {lab.prefix}: coord {coord.ip} ({COORD_PROFILE}); peers {', '.join(f'{h.name} {h.ip}' for h in peers)} "
                     f"({s.profile}{', each behind its own NAT' if s.nat else ''}); logs {self.log_dir}")
            samplers = {coord.name: Sampler(lab, coord, s.python)}
            samplers |= {h.name: Sampler(lab, h, s.python, coord.ip) for h in peers}
            for sm in samplers.values():
                sm.wait_first()
            try:
                if s.config == "hivemind":
                    result |= self.run_hivemind(lab, peers, samplers)
                else:
                    result |= self.run_hometrain(lab, coord, peers, samplers)
            finally:
                for p in self.procs:
                    if p.popen.poll() is None:
                        try:
                            os.killpg(p.popen.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
        # The Lab killed every process group it started and removed the namespaces; check nothing survived.
        survivors = [p.describe() for p in self.procs if p.popen.poll() is None]
        if survivors:
            raise RunError(f"processes survived the lab's teardown: {survivors}")
        result["cell_seconds"] = time.time() - self.started
        return result

    # ------------------------------------------------------------------------ hometrain

    def run_hometrain(self, lab, coord, peers, samplers: dict[str, Sampler]) -> dict:
        s = self.spec
        state = self.log_dir / "coordinator-state"
        flags = COMPRESSED if s.config == "hometrain-compressed" else []
        min_replicas = 1 if s.kill_one else 2
        coordinator = self.spawn("coordinator", coord, [
            s.python, "-m", "coordinator", "serve", "--host", "0.0.0.0", "--announce-host", coord.ip, "--port", GRPC_PORT,
            "--http-port", HTTP_PORT, "--dht-port", DHT_PORT, "--state-dir", state, "--model", "tiny", "--stages", STAGES,
            "--rounds", s.rounds, "--min-replicas", min_replicas, "--linger", "--checkpoint-every", 100 * s.rounds + 1000,
            *DATA, *flags])
        http = Http(lab, coord, s.python, HTTP_PORT)
        t_launch = time.time()
        while True:
            self.check_procs()
            if http.get("/api/status") is not None:
                break
            if time.time() - t_launch > s.startup_timeout:
                raise RunError(coordinator.failure(f"did not serve /api/status within {s.startup_timeout:g} s"))
            time.sleep(0.5)
        t_coord_ready = time.time()
        self.say(f"coordinator up after {t_coord_ready - t_launch:.1f}s ({' '.join(flags) or 'uncompressed'})")
        peer_procs: dict[str, Proc] = {}

        def join(i: int) -> None:
            h = peers[i]
            argv = [s.python, "-m", "peer", "join", "--coordinator", f"{coord.ip}:{GRPC_PORT}", "--gpu", "cpu", "--threads", "1",
                    "--host", "0.0.0.0", "--p2p-port", P2P_PORT, "--stage", stage_of(i), "--name", h.name,
                    "--serve-after-run"]
            if h.dialable:
                argv += ["--announce-host", h.ip]
            peer_procs[h.name] = self.spawn("peer", h, argv)

        # One replica per stage first, the others once those joined, so that every configuration starts alike: each
        # stage's first replica is the same host (peers that ask for their stage are never moved).
        first = [next(i for i in range(NUM_PEERS) if stage_of(i) == k) for k in range(STAGES)]
        for i in first:
            join(i)
        t_first = time.time()
        while True:
            self.check_procs()
            st = http.get("/api/status") or {}
            if {e.get("name") for e in st.get("peers", [])} >= {peers[i].name for i in first}:
                break
            if time.time() - t_first > s.startup_timeout:
                raise RunError(f"peers {[peers[i].name for i in first]} did not join within {s.startup_timeout:g} s:\n" +
                               "\n".join(peer_procs[peers[i].name].failure("has not joined") for i in first))
            time.sleep(POLL_INTERVAL)
        for i in range(NUM_PEERS):
            if i not in first:
                join(i)
        t_peers_started = t_first

        tracks = {h.name: PeerTrack(h.name) for h in peers}
        t_all_online = None
        last_round, last_progress = 0, time.time()
        kill: dict[str, Any] = {}
        victim = peers[-1].name
        db = state / "coordinator.sqlite"
        final_round_end = None
        status: dict = {}
        while True:
            self.check_procs()
            self.check_deadline(f"waiting for round {s.rounds} (at round {last_round})")
            st = http.get("/api/status")
            now = time.time()
            if st is None:
                if coordinator.popen.poll() is None and now - last_progress < 60:
                    time.sleep(POLL_INTERVAL)
                    continue
                raise RunError(coordinator.failure("stopped answering /api/status"))
            status = st
            named = {}
            for entry in st.get("peers", []):
                if entry.get("name") in tracks:
                    best = named.get(entry["name"])
                    if best is None or entry["last_seen"] > best["last_seen"]:
                        named[entry["name"]] = entry
            for name, entry in named.items():
                tracks[name].add(entry)
            if t_all_online is None and len(named) == NUM_PEERS and all(e["state"] == "online" for e in named.values()):
                t_all_online = now
                reach = {n: e.get("reachability") for n, e in sorted(named.items())}
                self.say(f"all {NUM_PEERS} peers online {now - t_peers_started:.1f}s after they started; reachability {reach}")
            if t_all_online is None and now - t_peers_started > s.startup_timeout:
                missing = [n for n in tracks if named.get(n, {}).get("state") != "online"]
                raise RunError(f"peers {missing} not online within {s.startup_timeout:g} s of starting:\n" +
                               "\n".join(peer_procs[n].failure("is not online") for n in missing))
            rnd = int(st.get("round") or 0)
            if rnd != last_round:
                if rnd // 5 != last_round // 5 or rnd >= s.rounds:
                    self.say(f"round {rnd} done, loss {st.get('loss')}")
                last_round, last_progress = rnd, now
            elif now - last_progress > s.stall_timeout:
                raise RunError(f"no round completed for {s.stall_timeout:g} s (--stall-timeout; at round {rnd}, phase "
                               f"{st.get('phase')}, reason {st.get('reason')!r}, last failure {st.get('last_failure')!r}); "
                               f"logs in {self.log_dir}\n{self.all_tails()}")
            if s.kill_one and not kill and rnd >= 1:
                rounds = read_rounds(db)
                k0 = self.first_working_round(rounds, tracks)
                if k0 is not None and rnd >= k0 + max(2, (s.rounds - k0) // 3):
                    victim_proc = peer_procs[victim]
                    os.killpg(victim_proc.popen.pid, signal.SIGKILL)
                    victim_proc.popen.wait()
                    victim_proc.expected_exit = True
                    kill = {"peer": victim, "stage": tracks[victim].stage, "at": now, "rounds_done_before": rnd,
                            "steady_from_round": k0}
                    self.say(f"SIGKILLed {victim} (stage {tracks[victim].stage}) after round {rnd}")
            if rnd >= s.rounds:
                rounds = read_rounds(db)
                if final_round_end is None and rounds:
                    final_round_end = rounds[-1]["ended"]
                live = [n for n in tracks if not (kill and n == kill["peer"])]
                if final_round_end is not None and all(self.idle_report(tracks[n], samplers[n], final_round_end + 0.05, now)
                                                       for n in live):
                    break  # every live peer reported once more after the last round, while idle: its counters are final
                if final_round_end is not None and now - final_round_end > 30:
                    raise RunError(f"peers {[n for n in live if not tracks[n].at_or_after(final_round_end)]} sent no heartbeat "
                                   f"within 30 s of the last round\n{self.all_tails()}")
            time.sleep(POLL_INTERVAL)

        rounds = read_rounds(db)
        api_rounds = http.get("/api/rounds") or []
        if len(rounds) < s.rounds:
            raise RunError(f"the coordinator's store holds {len(rounds)} rounds, expected {s.rounds}")
        k0 = self.first_working_round(rounds, tracks)
        if k0 is None or k0 >= len(rounds):
            raise RunError(f"no round after which every peer was working (k0={k0}) in {len(rounds)} rounds: nothing to measure. "
                           f"Peers' received bytes: {[(n, t.samples[-1].received if t.samples else None) for n, t in tracks.items()]}")
        t0, t1 = rounds[k0 - 1]["ended"], rounds[-1]["ended"]
        window_rounds = rounds[k0:]
        tokens = sum(r["tokens"] for r in window_rounds)
        out: dict[str, Any] = {
            "status": "ok",
            "startup": {
                "coordinator_ready_s": t_coord_ready - t_launch,
                "peers_online_s": (t_all_online - t_peers_started) if t_all_online else None,
                "first_round_end_s": rounds[0]["ended"] - t_peers_started,
                "steady_from_round": k0,
                "steady_s_after_peers_started": t0 - t_peers_started,
                "steady_s_after_all_online": (t0 - t_all_online) if t_all_online else None,
            },
            "window": {"start": t0, "end": t1, "seconds": t1 - t0, "rounds": len(window_rounds), "first_round": k0 + 1},
            "tokens": tokens,
            "tokens_per_second": tokens / (t1 - t0) if t1 > t0 else None,
            "round_tokens": [r["tokens"] for r in rounds],
            "round_losses": [r["loss"] for r in rounds],
            "round_ended": [r["ended"] - t_peers_started for r in rounds],
            "round_dropped": [r["dropped"] for r in rounds],
            "api_rounds_tokens_per_second": [r.get("tokens_per_second") for r in api_rounds],
            "final_loss": mean([r["loss"] for r in rounds if r["loss"] is not None][-3:]),
            "reachability": {n: t.reachability for n, t in tracks.items()},
            "wire_totals": status.get("wire"),
        }
        # Bytes per token: per peer, the kernel's tx over [t0, its first idle report after t1] (interpolated at t0: a
        # peer may be mid-burst there, an error of at most one round's traffic) and its own count from its last report
        # at or before t0 (its step report of round k0: it is idle from then until the next round opens) to that report.
        # Ratio: both counts over the same interval between two reports at which the host was idle (kernel exact).
        kernel = project = ratio_kernel = ratio_project = 0.0
        per_peer = {}
        for name, track in tracks.items():
            sm = samplers[name]
            killed = bool(kill) and name == kill["peer"]
            a = track.at_or_before(t0) or (track.samples[0] if track.samples else None)
            b = None if killed else (self.idle_report(track, sm, t1 + 0.05) or track.at_or_after(t1))
            b = b or (track.samples[-1] if track.samples else None)
            if a is None or b is None or b.t <= a.t:
                raise RunError(f"no reports of peer {name} around the window ({len(track.samples)} reports)")
            # The first idle report in the window's first quarter; else the last one in the 5 s before it (a little of
            # round k0 or start-up: big state frames, little overhead); else any idle report in the window.
            ra = (self.idle_report(track, sm, t0, t0 + (t1 - t0) / 4) or self.last_idle_report(track, sm, t0 - 5, t0)
                  or self.idle_report(track, sm, t0, b.t - 1e-3))
            exact = ra is not None and sm.flat_at(b.t) is not None
            ra = ra or a
            k = sm.at(b.t) - sm.at(t0)
            proj = total(b.sent) - total(a.sent)
            rk, rp = sm.at(b.t) - sm.at(ra.t), total(b.sent) - total(ra.sent)
            per_kind = {kind: b.sent.get(kind, 0) - a.sent.get(kind, 0) for kind in sorted(set(a.sent) | set(b.sent))}
            per_peer[name] = {"stage": track.stage, "reachability": track.reachability, "killed": killed,
                              "report_before_start_s": a.t - t0, "report_after_end_s": b.t - t1,
                              "kernel_up_bytes": k, "project_sent_bytes": proj, "project_sent_by_kind": per_kind,
                              "kernel_down_bytes": sm.at(b.t, "rx") - sm.at(t0, "rx"),
                              "ratio_interval": [ra.t - t0, b.t - t1], "ratio_exact": exact,
                              "ratio_kernel_bytes": rk, "ratio_project_bytes": rp, "ratio": rk / rp if rp else None,
                              "ratio_project_by_kind": {kind: b.sent.get(kind, 0) - ra.sent.get(kind, 0)
                                                        for kind in sorted(set(ra.sent) | set(b.sent))},
                              "microbatches": b.microbatches - a.microbatches,
                              "kernel_up_by_destination": sm.buckets(ra.t, b.t)}
            kernel += k
            project += proj
            ratio_kernel += rk
            ratio_project += rp
        cs = samplers["coord"]
        out |= {
            "per_peer": per_peer,
            "kernel_up_bytes": kernel, "project_sent_bytes": project,
            "kernel_bytes_per_token": kernel / tokens if tokens else None,
            "project_bytes_per_token": project / tokens if tokens else None,
            "kernel_over_project": ratio_kernel / ratio_project if ratio_project else None,
            # A killed peer's last report is wherever the kill found it: not a reason to call the others' ratio approximate.
            "kernel_over_project_exact": all(p["ratio_exact"] for p in per_peer.values() if not p["killed"]),
            "project_bytes_per_token_by_kind": {kind: sum(p["project_sent_by_kind"].get(kind, 0) for p in per_peer.values()) / tokens
                                                for kind in sorted({k for p in per_peer.values() for k in p["project_sent_by_kind"]})}
            if tokens else None,
            "coordinator_kernel_bytes": {"up": cs.at(t1) - cs.at(t0), "down": cs.at(t1, "rx") - cs.at(t0, "rx")},
        }
        if s.kill_one:
            out["kill"] = self.kill_report(kill, rounds, t_peers_started)
        return out

    @staticmethod
    def idle_report(track: PeerTrack, sampler: Sampler, after: float, before: float = float("inf")) -> PeerSample | None:
        """The peer's first report in [after, before] at which its host was idle (kernel counter known exactly)."""
        return next((x for x in track.samples if after <= x.t <= before and sampler.flat_at(x.t) is not None), None)

    @staticmethod
    def last_idle_report(track: PeerTrack, sampler: Sampler, after: float, before: float) -> PeerSample | None:
        """The peer's last report in [after, before] at which its host was idle."""
        return next((x for x in reversed(track.samples) if after <= x.t <= before and sampler.flat_at(x.t) is not None), None)

    @staticmethod
    def first_working_round(rounds: list[dict], tracks: dict[str, PeerTrack]) -> int | None:
        """The first completed round in which every peer received sync frames (each replica reached its partners)
        and by whose end every peer had received pipeline frames (activations or gradients) at least once: every
        peer reachable and working. Per round, because the router may leave a replica without microbatches in a
        round (after a failed hop it bans and re-routes) while the pipeline works. Counters are a peer's at its last
        report before the round's start and end."""
        for i, r in enumerate(rounds):
            start = rounds[i - 1]["ended"] if i else r["started"]
            ok = True
            for track in tracks.values():
                a, b = track.at_or_before(start), track.at_or_before(r["ended"] + 0.05)
                before_sync = a.received.get("sync", 0) if a else 0
                if b is None or total(b.received, PIPELINE_KINDS) <= 0 or b.received.get("sync", 0) <= before_sync:
                    ok = False
                    break
            if ok:
                return r["round"]
        return None

    def kill_report(self, kill: dict, rounds: list[dict], t_ref: float) -> dict:
        if not kill:
            return {"ok": False, "error": "the peer was never killed (the run ended first)"}
        after = [r for r in rounds if r["ended"] > kill["at"]]
        before = [r for r in rounds if r["ended"] <= kill["at"]]
        steady_before = [r for r in before if r["round"] > kill["steady_from_round"]]
        rate_before = (sum(r["tokens"] for r in steady_before) / (steady_before[-1]["ended"] - before[len(before) - len(steady_before) - 1]["ended"])
                       if len(steady_before) >= 1 and len(before) > len(steady_before) else None)
        rate_after = (sum(r["tokens"] for r in after[1:]) / (after[-1]["ended"] - after[0]["ended"]) if len(after) >= 2 else None)
        ok = len(after) >= 2 and all(r["tokens"] > 0 for r in after)
        return {
            "ok": ok, "peer": kill["peer"], "stage": kill["stage"], "killed_at_s": kill["at"] - t_ref,
            "rounds_before": len(before), "rounds_after": len(after),
            "rounds_after_with_tokens": sum(1 for r in after if r["tokens"] > 0),
            "first_round_after_kill_s": (after[0]["ended"] - kill["at"]) if after else None,
            "tokens_per_second_before": rate_before, "tokens_per_second_after": rate_after,
            "round_tokens_after": [r["tokens"] for r in after],
        }

    # ------------------------------------------------------------------------ hivemind

    def run_hivemind(self, lab, peers, samplers: dict[str, Sampler]) -> dict:
        s = self.spec
        script = str(Path(__file__).with_name("hivemind_baseline.py"))
        outs = [self.log_dir / f"{h.name}-result.json" for h in peers]
        timeout = max(60.0, self.deadline - time.monotonic() - 30)

        def argv(i: int, initial: list[str]) -> list[str]:
            a = [s.python, script, "--host", "0.0.0.0", "--announce-host", peers[i].ip, "--port", P2P_PORT,
                 "--peer-index", i, "--num-peers", NUM_PEERS, "--epochs", s.rounds, "--threads", 1, "--out", outs[i],
                 "--timeout", int(timeout), "--start-timeout", int(s.startup_timeout)]
            return a + (["--initial-peers", *initial] if initial else [])

        first = self.spawn("hivemind", peers[0], argv(0, []))
        first.expected_exit = True
        maddrs = None
        t_launch = time.time()
        while maddrs is None:
            text = first.log.read_text(errors="replace") if first.log.exists() else ""
            for line in text.splitlines():
                if line.startswith("MADDRS "):
                    maddrs = [m for m in json.loads(line[len("MADDRS "):]) if peers[0].ip in m] or json.loads(line[len("MADDRS "):])
            if first.popen.poll() is not None and maddrs is None:
                raise RunError(first.failure(f"exited with {first.popen.returncode} before printing MADDRS"))
            if time.time() - t_launch > s.startup_timeout:
                raise RunError(first.failure(f"printed no MADDRS within {s.startup_timeout:g} s"))
            time.sleep(0.3)
        self.say(f"hivemind peer 0 listens at {maddrs[0]}")
        procs = [first] + [self.spawn("hivemind", peers[i], argv(i, maddrs[:1])) for i in range(1, NUM_PEERS)]
        for p in procs:
            p.expected_exit = True
        while any(p.popen.poll() is None for p in procs):
            self.check_deadline("waiting for the hivemind peers to finish")
            bad = [p for p in procs if p.popen.poll() not in (None, 0)]
            if bad:
                time.sleep(2)  # let the others write their reports
                raise RunError(bad[0].failure(f"exited with status {bad[0].popen.returncode}"))
            time.sleep(1)
        reports = []
        for p, path in zip(procs, outs):
            if p.popen.returncode != 0 or not path.exists():
                raise RunError(p.failure(f"exited with {p.popen.returncode} (report {path} {'exists' if path.exists() else 'missing'})"))
            reports.append(json.loads(path.read_text()))
        self.say(f"hivemind done: epochs {[r['epochs'] for r in reports]}, tok/s per peer "
                 f"{[round(r['tokens_per_second'] or 0, 1) for r in reports]}")
        tokens = sum(r["tokens"] for r in reports)
        kernel = sum((r["interface_bytes"].get("eth0") or {}).get("tx", 0) for r in reports)
        losses = []
        for r in reports:
            vals = [x for x in r["epoch_losses"] if x is not None][-3:]
            if vals:
                losses.append(mean(vals))
        return {
            "status": "ok",
            "startup": {"peer_startup_s": [r["startup_seconds"] for r in reports],
                        "discovery_s": [r["discovery_seconds"] for r in reports]},
            "window": {"seconds": max(r["wall_seconds"] or 0 for r in reports), "rounds": min(r["epochs"] for r in reports)},
            "tokens": tokens,
            "tokens_per_second": sum(r["tokens_per_second"] or 0 for r in reports),
            "tokens_per_second_total_over_longest_wall": tokens / max(r["wall_seconds"] for r in reports),
            "tokens_per_second_nominal": mean([r["collaboration_tokens_per_second_nominal"] for r in reports]),
            "samples_per_epoch_over_target": tokens / (mean([r["epochs"] for r in reports]) * round_tokens()),
            "kernel_up_bytes": kernel, "project_sent_bytes": None,
            "kernel_bytes_per_token": kernel / tokens if tokens else None,
            "project_bytes_per_token": None, "kernel_over_project": None,
            "final_loss": mean(losses),
            "per_peer": {h.name: {k: r.get(k) for k in ("epochs", "tokens", "wall_seconds", "tokens_per_second", "final_loss",
                                                          "state_loads_from_peers", "interface_bytes", "epoch_samples")}
                         for h, r in zip(peers, reports)},
            "epoch_losses": [r["epoch_losses"] for r in reports],
        }


def stage_of(i: int) -> int:
    """Peer i's stage: p0, p1 -> 0; p2, p3 -> 1."""
    return i * STAGES // NUM_PEERS


def round_tokens() -> int:
    """Tokens of one optimizer step's global batch (TrainConfig's defaults, which both hometrain and the baseline use)."""
    from proto.run_config import TrainConfig

    t = TrainConfig()
    return t.global_batch_size * t.seq_len


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ============================================================================ table

def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def cell_line(r: dict) -> str:
    head = f"{r['config']:22s} {r['profile'] + (' NAT' if r.get('nat') else ''):17s}"
    if r.get("status") != "ok":
        return f"{head} FAILED: {r.get('error', '').splitlines()[0][:100]}"
    ratio = r.get("kernel_over_project")
    flag = ""
    if ratio is not None and abs(ratio - 1) > RATIO_TOLERANCE:
        flag = f"  <-- kernel/project outside {RATIO_TOLERANCE:.0%}"
    if ratio is not None and not r.get("kernel_over_project_exact", True):
        flag += "  (ratio approximate: a peer was never idle at a report)"
    if r.get("kill"):
        k = r["kill"]
        flag += f"  kill {k.get('peer')}: {'OK' if k.get('ok') else 'FAILED'}"
    return (f"{head} {fmt(r['tokens_per_second'], '9.1f')} {fmt(r['kernel_bytes_per_token'], '12.1f')} "
            f"{fmt(r['project_bytes_per_token'], '12.1f')} {fmt(ratio, '9.3f')} {fmt(r['final_loss'], '8.4f')} "
            f"{r['window']['rounds']:>7d} {r['window']['seconds']:8.1f}{flag}")


def print_table(results: list[dict]) -> None:
    print()
    print(f"tok/s: training tokens of the measured rounds / their wall time (from the end of the first round every peer "
          f"worked in); B/tok: bytes the peers sent per token over that window, counted by the kernel (eth0 frames) and "
          f"by hometrain (bytes_sent, all kinds); kern/proj flagged outside {RATIO_TOLERANCE:.0%}; loss: mean of the last "
          f"3 rounds; coordinator on '{COORD_PROFILE}'")
    print(f"{'config':22s} {'profile':17s} {'tok/s':>9s} {'kernel B/tok':>12s} {'project B/tok':>12s} {'kern/proj':>9s} "
          f"{'loss':>8s} {'rounds':>7s} {'window_s':>8s}")
    for r in results:
        print(cell_line(r))


def find(results: list[dict], config: str, profile: str) -> dict | None:
    return next((r for r in results if r["config"] == config and r["profile"] == profile and r.get("status") == "ok"), None)


def ratios(results: list[dict], profiles: list[str]) -> dict:
    out: dict[str, Any] = {}
    lines = []
    comp_home, plain_lan = find(results, "hometrain-compressed", "home"), find(results, "hometrain", "lan")
    if comp_home and plain_lan:
        v = comp_home["tokens_per_second"] / plain_lan["tokens_per_second"]
        out["compressed_home_over_uncompressed_lan"] = v
        lines.append(f"hometrain-compressed tok/s on home / hometrain tok/s on lan = {v:.3f} (target >= 0.9: "
                     f"{'met' if v >= 0.9 else 'MISSED'})")
    else:
        lines.append("hometrain-compressed on home / hometrain on lan: n/a (a cell is missing or failed)")
    for p in profiles:
        c, h = find(results, "hometrain-compressed", p), find(results, "hivemind", p)
        if c and h and h["tokens_per_second"]:
            v = c["tokens_per_second"] / h["tokens_per_second"]
            out[f"compressed_over_hivemind_{p}"] = v
            target = f" (target >= 2x: {'met' if v >= 2 else 'MISSED'})" if p == "home" else ""
            nominal = c["tokens_per_second"] / h["tokens_per_second_nominal"] if h.get("tokens_per_second_nominal") else None
            out[f"compressed_over_hivemind_nominal_{p}"] = nominal
            lines.append(f"hometrain-compressed / hivemind tok/s on {p:17s} = {v:.2f}x{target}; against hivemind's nominal "
                         f"tok/s (epochs x global batch, its overshoot not counted): {fmt(nominal, '.2f')}x")
        else:
            lines.append(f"hometrain-compressed / hivemind tok/s on {p:17s} = n/a (a cell is missing or failed)"
                         + (" (target >= 2x: MISSED, not measured)" if p == "home" else ""))
    for p in profiles:
        c, u = find(results, "hometrain-compressed", p), find(results, "hometrain", p)
        if c and u and u["final_loss"]:
            gap = (c["final_loss"] - u["final_loss"]) / u["final_loss"]
            out[f"compressed_loss_gap_{p}"] = gap
            lines.append(f"final loss gap, compressed vs uncompressed, on {p:17s} = {gap:+.2%}")
    print()
    for line in lines:
        print(line)
    out["lines"] = lines
    return out


def breakdown(r: dict) -> dict | None:
    """Kernel bytes sent by destination beside the project's kinds that go there (sums over peers, over the ratio's
    per-peer intervals)."""
    if any(p.get("kernel_up_by_destination") is None for p in r["per_peer"].values()):
        return None
    kernel = {b: sum(p["kernel_up_by_destination"][b] for p in r["per_peer"].values()) for b in COUNT_BUCKETS}
    kinds: dict[str, float] = {}
    for p in r["per_peer"].values():
        for kind, n in p["ratio_project_by_kind"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    control = kinds.get("control", 0.0)
    data = sum(v for k, v in kinds.items() if k != "control")
    p2p = kernel["coordinator_other"] + kernel["elsewhere"]
    return {
        "coordinator gRPC": {"kernel": kernel["coordinator_grpc"], "project": control,
                             "ratio": kernel["coordinator_grpc"] / control if control else None,
                             "what": "control plane; project: the 'control' kind, gRPC messages' ByteSize"},
        "P2P": {"kernel": p2p, "project": data, "ratio": p2p / data if data else None,
                "what": "peers and the coordinator's DHT/relay; project: activations + gradients + sync + state"},
        "P2P to the coordinator": {"kernel": kernel["coordinator_other"], "project": None, "ratio": None,
                                   "what": "DHT, dial-back, and relayed frames behind NAT"},
    }


def split_check(r: dict) -> float:
    """Sum over destinations (iptables, ~0.3 s samples) over the interface's own count (0.1 s samples): the breakdown's accuracy."""
    parts = sum(sum(p["kernel_up_by_destination"].values()) for p in r["per_peer"].values())
    whole = sum(p["ratio_kernel_bytes"] for p in r["per_peer"].values())
    return parts / whole if whole else float("nan")


def print_details(results: list[dict]) -> None:
    print()
    for r in results:
        if r.get("status") != "ok":
            continue
        st = r.get("startup", {})
        if r["config"] == "hivemind":
            print(f"{r['config']} on {r['profile']}: peers' start-up {fmt(max(st['peer_startup_s']), '.1f')}s, "
                  f"discovery {fmt(max(st['discovery_s']), '.1f')}s; cell {r['cell_seconds']:.0f}s; tok/s: sum of peers' "
                  f"{r['tokens_per_second']:.1f} (table), all tokens / longest peer wall "
                  f"{r['tokens_per_second_total_over_longest_wall']:.1f}, nominal (epochs x 1024 tokens / wall, mean over "
                  f"peers) {fmt(r['tokens_per_second_nominal'], '.1f')}; trained {r['samples_per_epoch_over_target']:.2f}x the "
                  f"global batch per epoch (peers see each other's progress late); walls "
                  f"{[round(p['wall_seconds'], 1) for p in r['per_peer'].values()]}")
            continue
        print(f"{r['config']} on {r['profile']}{' (NAT)' if r['nat'] else ''}: coordinator up {st['coordinator_ready_s']:.1f}s; "
              f"peers online {fmt(st['peers_online_s'], '.1f')}s after start; first round done {st['first_round_end_s']:.1f}s; "
              f"every peer working from round {st['steady_from_round']} ({st['steady_s_after_peers_started']:.1f}s after the "
              f"peers started, {fmt(st['steady_s_after_all_online'], '.1f')}s after all were online); cell {r['cell_seconds']:.0f}s; "
              f"reachability {r['reachability']}")
        split = breakdown(r)
        if split:
            print("    kernel vs project bytes sent by destination (all peers, ratio intervals): " + "; ".join(
                (f"{k} {v['kernel'] / 1e3:.0f} kB / {v['project'] / 1e3:.0f} kB = {fmt(v['ratio'], '.3f')}" if v["project"] is not None
                 else f"{k} {v['kernel'] / 1e3:.0f} kB") for k, v in split.items())
                + f" (sum of destinations / interface count: {split_check(r):.3f})")
            r["by_destination"] = split
        by_kind = r.get("project_bytes_per_token_by_kind") or {}
        print("    project bytes per token by kind: " + ", ".join(f"{k} {v:.1f}" for k, v in by_kind.items()))
        worst = max(r["per_peer"].items(), key=lambda kv: abs((kv[1]["ratio"] or 1) - 1))
        print(f"    per-peer kernel/project: " + ", ".join(f"{n} {fmt(p['ratio'], '.3f')}" for n, p in r["per_peer"].items())
              + f"; worst {worst[0]} by kind sent: {worst[1]['project_sent_by_kind']}")
        if r.get("kill"):
            k = r["kill"]
            if "rounds_before" in k:
                print(f"    kill-one: SIGKILLed {k['peer']} (stage {k['stage']}) at {k['killed_at_s']:.1f}s after "
                      f"{k['rounds_before']} rounds; {k['rounds_after']} rounds completed after it, "
                      f"{k['rounds_after_with_tokens']} with tokens > 0 (first {fmt(k['first_round_after_kill_s'], '.1f')}s after "
                      f"the kill); tok/s before {fmt(k['tokens_per_second_before'], '.1f')}, after "
                      f"{fmt(k['tokens_per_second_after'], '.1f')}: {'training continued' if k['ok'] else 'FAILED'}")
            else:
                print(f"    kill-one: {k.get('error')}")


# ============================================================================ main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.netlab.run", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--profiles", nargs="+", default=list(PROFILE_NAMES), choices=PROFILE_NAMES)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--rounds", type=int, default=30, help="rounds (hivemind: epochs) each cell trains")
    p.add_argument("--nat", action="store_true", help="every peer behind a NAT of its own (hivemind cells are skipped)")
    p.add_argument("--kill-one", action="store_true", help="SIGKILL one stage-1 peer a third into the measured rounds "
                                                           "(hometrain configurations; hivemind cells are skipped)")
    p.add_argument("--out", default="", help="write every result as JSON here")
    p.add_argument("--log-dir", default="", help="directory for the processes' logs (default: a new temporary one)")
    p.add_argument("--run-timeout", type=float, default=0, help="longest one cell may take, s (0: 900 + 20 per round; NAT +300)")
    p.add_argument("--stall-timeout", type=float, default=0, help="fail a cell when no round completes for this long, s "
                                                                   "(0: 240; with --nat 420: relayed start-up takes minutes)")
    p.add_argument("--startup-timeout", type=float, default=300, help="coordinator up / all peers online within this long, s")
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be >= 3 (the window starts after the first round and the loss is a mean of 3)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_sample":
        ap = argparse.ArgumentParser()
        ap.add_argument("_cmd")
        ap.add_argument("--interval", type=float, default=SAMPLE_INTERVAL)
        ap.add_argument("--iface", default="eth0")
        ap.add_argument("--iptables", default="")
        ns = ap.parse_args(argv)
        return agent_sample(ns.interval, ns.iface, ns.iptables)
    if argv and argv[0] == "_http":
        ap = argparse.ArgumentParser()
        ap.add_argument("_cmd")
        ap.add_argument("--port", type=int, default=HTTP_PORT)
        return agent_http(ap.parse_args(argv).port)

    args = parse_args(argv)
    from bench.netlab import can_make_namespaces

    ok, reason = can_make_namespaces()
    if not ok:
        print(f"cannot build network labs here: {reason}", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="netlab-run-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs: {log_dir}", flush=True)
    run_timeout = args.run_timeout or (900 + 20 * args.rounds + (300 if args.nat else 0))
    stall_timeout = args.stall_timeout or (420 if args.nat else 240)
    results: list[dict] = []
    started = time.time()
    for config in args.configs:
        for profile in args.profiles:
            if config == "hivemind" and (args.nat or args.kill_one):
                why = ("hivemind_baseline.py has no NAT traversal (no relay flags): its peers must be dialable"
                       if args.nat else "--kill-one applies to hometrain configurations")
                print(f"== {config} on {profile}: skipped ({why})", flush=True)
                results.append({"config": config, "profile": profile, "status": "skipped", "error": why})
                continue
            print(f"== {config} on {profile}{' (every peer behind NAT)' if args.nat else ''}"
                  f"{' (kill one peer)' if args.kill_one else ''}, {args.rounds} rounds", flush=True)
            spec = CellSpec(config, profile, args.rounds, args.nat, args.kill_one, log_dir, run_timeout, stall_timeout,
                            args.startup_timeout, sys.executable)
            t = time.time()
            try:
                result = Cell(spec).run()
            except Exception as exc:  # a failed cell is reported; the others still run
                message = str(exc) if isinstance(exc, RunError) else f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                print(f"!! {config} on {profile} FAILED after {time.time() - t:.0f}s:\n{message}", file=sys.stderr, flush=True)
                result = {"config": config, "profile": profile, "nat": args.nat, "status": "error", "error": message,
                          "cell_seconds": time.time() - t}
            results.append(result)
            print(cell_line(result) if result.get("status") == "ok" else f"   FAILED ({result['cell_seconds']:.0f}s)", flush=True)
            if args.out:
                write_out(args, results, None, started)

    print_table([r for r in results if r.get("status") != "skipped"])
    summary = ratios(results, args.profiles)
    print_details(results)
    print(f"\ntotal {time.time() - started:.0f}s; logs in {log_dir}")
    if args.out:
        write_out(args, results, summary, started)
        print(f"results: {args.out}")
    failed = [r for r in results if r.get("status") == "error"]
    kills = [r for r in results if r.get("kill") and not r["kill"].get("ok")]
    return 1 if failed or kills else 0


def write_out(args: argparse.Namespace, results: list[dict], summary: dict | None, started: float) -> None:
    data = {"args": vars(args), "coordinator_profile": COORD_PROFILE, "ratio_tolerance": RATIO_TOLERANCE,
            "started": started, "seconds": time.time() - started, "results": results, "summary": summary}
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    sys.exit(main())
