"""A swarm whose stage 1 raises on every forward: it says so, backs off instead of burning rounds, and recovers.

The broken peer is a real `peer join` process whose GPT-J blocks raise the TypeError that
transformers 5.24 caused (tests/breakage/sitecustomize.py), so the failure starts where it
would for a user: in the stage's own forward, two hops from the coordinator.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .swarm import ENV, ROOT, Swarm, broken_blocks_env

pytestmark = pytest.mark.swarm
FAST = ("--heartbeat-interval", "1", "--heartbeat-timeout", "5", "--round-timeout", "30")


def metric(swarm: Swarm, name: str, **labels: str) -> float:
    text = swarm.get_text("/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name}{labels} not exported")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("stalled"), "--stages", "2", *FAST)
    s.add_peer("--stage", "0")
    s.add_peer("--stage", "1", env=broken_blocks_env(2))  # the tiny model's stage 1 holds blocks 2 and 3
    try:
        s.wait_for(lambda: ((s.status() or {}).get("stalled") or {}).get("attempts", 0) >= 3, 180, "three openings that trained nothing")
        yield s
    finally:
        s.stop()


def test_status_names_the_error_its_stage_and_peer(swarm):
    status = swarm.status()
    stalled = status["stalled"]
    broken = next(p for p in status["peers"] if p["name"] == "peer-1")
    assert stalled["round"] == 1 and "TypeError: cannot unpack non-iterable NoneType object" in stalled["error"]
    assert stalled["stage"] == 1 and stalled["peer"] == broken["id"] and stalled["peer_name"] == "peer-1"
    assert status["reason"].startswith("stalled: round 1 trained nothing")
    assert broken["microbatches_failed"] > 0
    page = swarm.get_text("/")
    assert "Training is stalled" in page and "cannot unpack non-iterable NoneType object" in page and "peer-1" in page


def test_round_counter_stays_put_and_openings_back_off(swarm):
    before = swarm.status()["stalled"]["attempts"]
    time.sleep(12)
    status = swarm.status()
    assert status["current_round"] == 1 and status["round"] == 0 and swarm.rounds() == [], "a round that trained nothing was counted"
    # Openings 4 and 5 wait 8 and 16 s: in 12 s at most two more happen, never one per tick.
    assert status["stalled"]["attempts"] - before <= 2


def test_metrics_count_the_failures(swarm):
    assert metric(swarm, "hometrain_training_stalled") == 1
    assert metric(swarm, "hometrain_microbatch_failures_total", stage="1") >= 3 * 4  # three openings of 4 microbatches


def test_the_failing_peer_says_so_in_its_own_output(swarm):
    log = (swarm.log_dir / "peer-1.log").read_text()
    assert "stage 1 failed on the forward of microbatch" in log and "TypeError: cannot unpack" in log
    assert "Traceback" in log  # the first failure comes with its traceback, for whoever debugs it
    assert log.count("Traceback") == 1, "every failure printed its traceback: the console floods"


def test_training_resumes_once_the_stage_is_fixed(swarm):
    """Replace the broken peer with a working one: the same round 1 opens again and trains."""
    swarm.peers[1].send_signal(2)
    swarm.peers[1].wait(timeout=30)
    swarm.add_peer("--stage", "1")
    swarm.wait_for(lambda: swarm.status()["round"] >= 2, 180, "two rounds trained after the fix")
    rounds = swarm.rounds()
    assert [r["round"] for r in rounds[:2]] == [1, 2] and all(r["tokens"] > 0 for r in rounds)
    assert swarm.status()["stalled"] is None and metric(swarm, "hometrain_training_stalled") == 0


def test_demo_exits_nonzero_when_rounds_train_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "demo", "--rounds", "3", "--http-port", "0", "--state-dir", str(tmp_path / "demo")],
        cwd=ROOT, env={**ENV, **broken_blocks_env(0)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training stalled" in proc.stderr and "finished: 3 rounds trained" not in proc.stdout + proc.stderr
