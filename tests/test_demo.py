"""The README's main job: `coordinator demo` trains a tiny GPT-J with 3 peers and exits after --rounds."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
import torch

from proto.run_config import CoordinatorConfig

from .swarm import ENV, ROOT

pytestmark = pytest.mark.swarm


def test_demo_trains_30_rounds_and_loss_goes_down(tmp_path):
    state = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "demo", "--rounds", "30", "--http-port", "0", "--state-dir", str(state), "--checkpoint-every", "15"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "status page http://127.0.0.1:" in proc.stdout
    db = sqlite3.connect(state / "coordinator.sqlite")
    rows = db.execute("SELECT loss, tokens FROM rounds ORDER BY round").fetchall()
    losses = [loss for loss, _ in rows]
    checkpoints = [row[0] for row in db.execute("SELECT round FROM checkpoints ORDER BY round")]
    evaluations = {row[0]: json.loads(row[1]) for row in db.execute("SELECT round, result FROM evaluations")}
    db.close()
    assert len(losses) == 30 and None not in losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, f"loss did not go down: first rounds {losses[:5]}, last rounds {losses[-5:]}"
    # The first rounds train UL2 (until --ul2-tokens, about 10 rounds by default), the last ones
    # causal LM, so the check above spans two objectives (it holds because both start near
    # ln(vocab) from random weights). Like with like: the causal phase's own losses go down too.
    ul2_tokens, seen, causal = CoordinatorConfig().ul2_tokens, 0, []
    for loss, tokens in rows:
        if seen >= ul2_tokens:
            causal.append(loss)
        seen += tokens
    assert 5 <= len(causal) <= 25, f"the UL2 -> causal switch moved: {30 - len(causal)} UL2 rounds"
    assert sum(causal[-5:]) / 5 < sum(causal[:5]) / 5 - 0.15, f"causal-phase loss did not go down: {causal}"
    assert checkpoints == [15, 30]  # round 0 is the seed: each peer builds its own stage, nothing is published
    assert sorted(evaluations) == [15, 30], "the demo exits once every checkpoint is evaluated"
    assert all("error" not in e and set(e["perplexity"]) == {"text", "instructions"} for e in evaluations.values()), evaluations


def test_peer_refuses_a_gpu_that_is_not_there():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "peer", "join", "--gpu", "0", "--coordinator", "127.0.0.1:1"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--gpu cpu" in proc.stderr


def test_peer_explains_an_unreachable_coordinator():
    proc = subprocess.run([sys.executable, "-m", "peer", "join", "--gpu", "cpu", "--coordinator", "127.0.0.1:1", "--connect-timeout", "2"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "could not join the run at 127.0.0.1:1" in proc.stderr
