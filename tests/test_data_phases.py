"""A run crosses the UL2 -> causal boundary: both phases train, the status page and /metrics show the mix,
and a restarted coordinator keeps the per-source and per-objective token counts."""

from __future__ import annotations

import math
import signal
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .swarm import Swarm

pytestmark = pytest.mark.swarm
ROUNDS = 5
UL2_TOKENS = 800  # about 2 rounds of 16 UL2 rows of 64 tokens (~420 loss tokens a round)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("phases"), "--stages", "2", "--rounds", str(ROUNDS), "--checkpoint-every", "100", "--linger",
              "--ul2-tokens", str(UL2_TOKENS))
    s.add_peer()
    s.add_peer()
    try:
        s.wait_for(lambda: s.status()["round"] >= ROUNDS, 120, f"{ROUNDS} rounds")
        yield s
    finally:
        s.stop()


def test_both_phases_train_and_the_status_shows_the_mix(swarm):
    data = swarm.status()["data"]
    assert [p["objective"] for p in data["phases"]] == ["ul2", "causal"]
    assert data["phases"][0]["until_tokens"] == UL2_TOKENS
    assert data["phase"] == {"index": 1, "objective": "causal"}
    ul2_tokens, causal_tokens = data["tokens_per_phase"]
    assert ul2_tokens >= UL2_TOKENS and causal_tokens > 0
    assert [p["tokens"] for p in data["phases"]] == data["tokens_per_phase"]

    shares = data["objective_shares"]
    assert {o[0] for o in shares if o[0] in "RXS"} == {"R", "X", "S"}
    assert shares["causal"] > 0 and shares["instruction"] > 0
    assert sum(shares.values()) == pytest.approx(1.0)
    assert set(data["tokens_per_source"]) == {"text", "instructions"}
    assert sum(data["tokens_per_source"].values()) == sum(data["tokens_per_objective"].values()) == ul2_tokens + causal_tokens
    assert {s["name"]: s["weight"] for s in data["sources"]} == {"text": 0.55, "instructions": 0.45}

    rounds = swarm.rounds()
    assert sum(r["tokens"] for r in rounds) == ul2_tokens + causal_tokens  # the mix counts exactly what was trained
    seen, phases = 0, {"ul2": [], "causal": []}
    for r in rounds:
        phases["ul2" if seen < UL2_TOKENS else "causal"].append(r["loss"])
        seen += r["tokens"]
    assert phases["ul2"] and phases["causal"]
    assert all(loss is not None and math.isfinite(loss) for loss in phases["ul2"] + phases["causal"])

    page = urllib.request.urlopen(swarm.url, timeout=10).read().decode()
    assert "<h2>Data</h2>" in page and 'id="data-phases"' in page and 'id="data-mix"' in page


def test_metrics_and_a_restart_keep_the_token_counts(swarm):
    metrics = urllib.request.urlopen(f"{swarm.url}metrics", timeout=10).read().decode()
    found = {f.name: f for f in text_string_to_metric_families(metrics)}
    assert found["hometrain_data_phase"].samples[0].value == 1
    by_objective: dict[str, float] = {}
    for sample in found["hometrain_data_tokens"].samples:
        by_objective[sample.labels["objective"]] = by_objective.get(sample.labels["objective"], 0) + sample.value
    before = swarm.status()["data"]
    assert by_objective == pytest.approx(before["tokens_per_objective"])

    swarm.coordinator.send_signal(signal.SIGINT)
    swarm.coordinator.wait(timeout=30)
    swarm.start_coordinator()
    after = swarm.status()["data"]
    for key in ("tokens_per_phase", "tokens_per_source", "tokens_per_objective", "phase"):
        assert after[key] == before[key], key
