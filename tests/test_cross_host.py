"""Two hosts: the coordinator alone in one network namespace, peers in another, joined by a veth pair.

The coordinator listens on every address and is given no --announce-host, so it names itself
127.0.0.1 in checkpoint URLs and lists its loopback address among its DHT addresses: peers on
the other host must reach it at the address they dialled. Nothing here is shared through
loopback; the only test traffic is between the two namespaces.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
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

    coordinator = start(coord_ns, "coordinator", "coordinator", "serve", "--host", "0.0.0.0", "--port", str(port),
                        "--http-port", str(http_port), "--state-dir", str(state), "--model", "tiny", "--stages", "2",
                        "--rounds", "3", "--checkpoint-every", "3", "--stall-limit", "3")
    for i in range(2):
        start(peers_ns, f"peer-{i}", "peer", "join", "--coordinator", f"{COORDINATOR_IP}:{port}", "--gpu", "cpu", "--threads", "1",
              "--name", f"peer-{i}", "--connect-timeout", "120")
    try:
        code = coordinator.wait(timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                LocalSwarm.kill(proc)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))
    assert code == 0, tails
    with sqlite3.connect(state / "coordinator.sqlite") as db:
        rounds = db.execute("SELECT round, tokens FROM rounds ORDER BY round").fetchall()
    assert [r for r, _ in rounds] == [1, 2, 3] and all(tokens > 0 for _, tokens in rounds), tails
    peer_logs = "".join((logs / f"peer-{i}.log").read_text() for i in range(2))
    # Whoever had no replica to copy from downloaded the checkpoint from the address it dialled, not 127.0.0.1.
    assert f"http://{COORDINATOR_IP}:{http_port}/checkpoints/round-000000/" in peer_logs, tails
    assert "Traceback" not in peer_logs, tails
