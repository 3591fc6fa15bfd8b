"""--eval-on peer: a volunteer running `peer join --role eval` evaluates every checkpoint; the coordinator records it.

The volunteer downloads each checkpoint (without its optimizer state) and the held-out split over
HTTP, checks them against the signed manifest, runs `coordinator eval` and reports back; its
figures must be those `coordinator eval` gives on the coordinator's own copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.evaluation import EVAL_FILE

from .swarm import ENV, ROOT, Swarm

pytestmark = pytest.mark.swarm
FAST = ("--heartbeat-interval", "1", "--heartbeat-timeout", "5", "--round-timeout", "30")
CHECKPOINTS = 2
EVAL = ("--eval-probe-items", "15", "--eval-max-tokens", "2000")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-peer")
    task = root / "arith.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a} + {a} =", "choices": [str(2 * a), str(2 * a + 1)], "answer": 0}) + "\n"
                            for a in range(5)))
    s = Swarm(root / "run", "--stages", "2", "--rounds", str(10 * CHECKPOINTS), "--checkpoint-every", "10", "--linger",
              "--eval-on", "peer", "--eval-tasks", f"arith={task}", *EVAL, *FAST)
    s.add_peer("--stage", "0")
    s.add_peer("--stage", "1")
    s.add_peer("--role", "eval", "--state-dir", str(root / "volunteer"))
    try:
        s.wait_evaluated(CHECKPOINTS, 600, "the volunteer")
        yield s
    finally:
        s.stop()


def test_the_volunteer_evaluated_every_checkpoint(swarm):
    status = swarm.status()
    (worker,) = status["evaluation"]["workers"]
    assert status["evaluation"]["on"] == "peer" and worker["name"] == "peer-2" and worker["evaluated"] == CHECKPOINTS
    assert not any(p["name"] == "peer-2" for p in status["peers"]), "an evaluating volunteer holds no stage"
    for c in status["checkpoints"]:
        assert "error" not in c["eval"], c["eval"]
        assert set(c["eval"]["accuracy"]) == {"parity", "sentiment", "arith"}
        assert json.loads((Path(c["path"]) / EVAL_FILE).read_text()) == c["eval"]  # kept beside the published checkpoint
    assert "Evaluation by volunteers" in swarm.get_text("/") and "peer-2" in swarm.get_text("/")


def test_its_figures_are_those_of_coordinator_eval_here(swarm, tmp_path):
    latest = swarm.status()["checkpoints"][-1]
    copy = tmp_path / "checkpoints" / Path(latest["path"]).name
    shutil.copytree(latest["path"], copy, ignore=shutil.ignore_patterns(EVAL_FILE))
    out = subprocess.run([sys.executable, "-m", "coordinator", "eval", str(copy), "--json", "--heldout", str(swarm.state_dir / "heldout"),
                          "--context", "64", "--probe-items", "15", "--max-tokens", "2000",
                          "--tasks", f"arith={swarm.state_dir / 'heldout' / 'tasks' / 'arith.jsonl'}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert out.returncode == 0, out.stderr
    here = json.loads(out.stdout)
    assert here["perplexity"] == pytest.approx(latest["eval"]["perplexity"], rel=1e-6)
    assert here["accuracy"] == latest["eval"]["accuracy"]
