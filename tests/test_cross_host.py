"""Two hosts: the coordinator alone in one network namespace, peers in another, joined by a veth pair.

The coordinator listens on every address and is given no --announce-host, so it names itself
127.0.0.1 in checkpoint URLs and lists its loopback address among its DHT addresses: peers on
the other host must reach it at the address they dialled. Nothing here is shared through
loopback; the only test traffic is between the two namespaces.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest

from coordinator.local_swarm import LocalSwarm

from .swarm import ENV, free_port

pytestmark = pytest.mark.swarm
COORDINATOR_IP, PEERS_IP = "10.231.0.1", "10.231.0.2"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Namespaces (coordinator host, peers host), or skip saying why they cannot be made."""
    tag = uuid.uuid4().hex[:6]
    coord, peers = f"htc-{tag}", f"htp-{tag}"
    try:
        sh("ip", "netns", "add", coord)
        sh("ip", "netns", "add", peers)
    except (OSError, subprocess.CalledProcessError) as exc:
        for ns in (coord, peers):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make network namespaces here (needs root and iproute2): {exc}")
    try:
        sh("ip", "link", "add", f"vc-{tag}", "netns", coord, "type", "veth", "peer", "name", f"vp-{tag}", "netns", peers)
        for ns, dev, ip in ((coord, f"vc-{tag}", COORDINATOR_IP), (peers, f"vp-{tag}", PEERS_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield coord, peers
    finally:
        for ns in (coord, peers):  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_peers_on_another_host_train_without_announce_host(two_hosts, tmp_path):
    """Peers join and train; then a stage loses its only replica and a newcomer on the peers' host refills it from
    the latest checkpoint, downloaded from the address it dialled (the coordinator names 127.0.0.1)."""
    coord_ns, peers_ns = two_hosts
    port, http_port = free_port(), free_port()
    state, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    env = {**ENV, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = []

    def start(ns: str, name: str, *cmd: str) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "wb")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", *cmd], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    def peer(name: str, stage: int) -> subprocess.Popen:
        return start(peers_ns, name, "peer", "join", "--coordinator", f"{COORDINATOR_IP}:{port}", "--gpu", "cpu", "--threads", "1",
                     "--name", name, "--stage", str(stage), "--connect-timeout", "120")

    def rounds() -> list[tuple[int, int]]:
        try:
            with sqlite3.connect(state / "coordinator.sqlite") as db:
                return db.execute("SELECT round, tokens FROM rounds ORDER BY round").fetchall()
        except sqlite3.Error:
            return []

    def wait(condition, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or coordinator.poll() is not None:
                pytest.fail(f"gave up waiting for {what}\n" + tails())
            time.sleep(0.5)

    def tails() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.iterdir()))

    coordinator = start(coord_ns, "coordinator", "coordinator", "serve", "--host", "0.0.0.0", "--port", str(port),
                        "--http-port", str(http_port), "--state-dir", str(state), "--model", "tiny", "--stages", "2",
                        "--checkpoint-every", "2", "--heartbeat-interval", "1", "--heartbeat-timeout", "4", "--stall-limit", "3")
    try:
        peer("peer-0", 0)
        stage1 = peer("peer-1", 1)
        wait(lambda: (state / "checkpoints" / "round-000002" / "manifest.json").is_file(), "the checkpoint of round 2")
        LocalSwarm.kill(stage1)  # stage 1 has no replica now: a newcomer must take its weights from the checkpoint
        killed_at = len(rounds())
        peer("peer-2", 1)
        wait(lambda: len(rounds()) >= killed_at + 2, "two rounds after stage 1 was refilled")
        coordinator.send_signal(signal.SIGINT)
        code = coordinator.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                LocalSwarm.kill(proc)
    assert code == 0, tails()
    assert all(tokens > 0 for _, tokens in rounds()) and [r for r, _ in rounds()] == list(range(1, len(rounds()) + 1)), tails()
    newcomer = (logs / "peer-2.log").read_text()
    # It downloaded from the address it dialled, not the loopback one the coordinator names.
    assert f"from the checkpoint of round" in newcomer and f"(http://{COORDINATOR_IP}:{http_port}/checkpoints/round-" in newcomer, tails()
    assert "Traceback" not in "".join((logs / f"peer-{i}.log").read_text() for i in range(3)), tails()
