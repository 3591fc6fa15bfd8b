"""Every published checkpoint is evaluated in a child process while rounds go on; results reach the status, page and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.evaluation import EVAL_FILE
from proto.manifest import verify_directory

from .swarm import Swarm

pytestmark = pytest.mark.swarm
FAST = ("--heartbeat-interval", "1", "--heartbeat-timeout", "5", "--round-timeout", "30")
CHECKPOINTS = 4


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("eval-swarm"), "--eval-on", "coordinator", "--stages", "2", "--rounds", str(10 * CHECKPOINTS), "--checkpoint-every", "10",
              "--linger", "--eval-probe-items", "20", "--eval-max-tokens", "3000", *FAST)
    s.add_peer("--stage", "0")
    s.add_peer("--stage", "1")
    try:
        s.wait_evaluated(CHECKPOINTS, 600, "the coordinator")
        yield s
    finally:
        s.stop()


def test_every_checkpoint_has_its_evaluation(swarm):
    for c in swarm.status()["checkpoints"]:
        result = c["eval"]
        assert "error" not in result, result
        assert set(result["perplexity"]) == {"text", "instructions"} and all(v > 1 for v in result["perplexity"].values())
        assert set(result["accuracy"]) == {"parity", "sentiment"}
        assert all(0 <= v[m] <= 1 for v in result["accuracy"].values() for m in ("acc", "acc_norm"))
        assert result["seconds"] > 0 and result["round"] == c["round"]
        path = Path(c["path"])
        assert (path / EVAL_FILE).is_file()
        verify_directory(path)  # the evaluation left every hashed file as it was


def test_rounds_completed_while_an_evaluation_ran(swarm):
    ended = [r["ended"] for r in swarm.rounds()]
    windows = [(c["eval"]["started"], c["eval"]["started"] + c["eval"]["seconds"]) for c in swarm.status()["checkpoints"]]
    during = [sum(a < t < b for t in ended) for a, b in windows]
    assert max(during) >= 2, f"no rounds completed during any evaluation: {during} rounds per evaluation window"


def test_metrics_and_page_show_the_latest_evaluation(swarm):
    latest = swarm.status()["checkpoints"][-1]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(swarm.get_text("/metrics")) for s in family.samples}
    assert samples[("hometrain_eval_round", ())] == latest["round"]
    for source, value in latest["eval"]["perplexity"].items():
        assert samples[("hometrain_eval_perplexity", (("source", source),))] == pytest.approx(value)
    for task, metrics in latest["eval"]["accuracy"].items():
        for metric, value in metrics.items():
            assert samples[("hometrain_eval_accuracy", (("metric", metric), ("task", task)))] == pytest.approx(value)
    page = swarm.get_text("/")
    plot = page[page.index('id="eval-plot"'):]
    plot = plot[:plot.index("</svg>")]
    assert 'data-series="text"' in plot and 'data-series="instructions"' in plot and plot.count('class="point"') == 2 * CHECKPOINTS


def test_an_evaluating_volunteer_is_told_this_run_does_not_take_one(swarm):
    import subprocess
    import sys

    from .swarm import ENV, ROOT

    out = subprocess.run([sys.executable, "-m", "peer", "join", "--role", "eval", "--coordinator", f"127.0.0.1:{swarm.port}", "--gpu", "cpu"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert out.returncode == 2 and "--eval-on coordinator" in out.stderr and "without --role eval" in out.stderr
