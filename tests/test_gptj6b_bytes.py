"""bench/gptj6b_bytes.py: the GPT-J-6B byte table comes from the codecs and adds up."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from coordinator.assignment import stage_layer_ranges
from coordinator.model_presets import preset_config, stage_parameter_counts

from .swarm import ROOT

spec = importlib.util.spec_from_file_location("gptj6b_bytes", ROOT / "bench" / "gptj6b_bytes.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up there
spec.loader.exec_module(bench)


def test_table_adds_up_and_codecs_shrink_what_they_should():
    result = bench.table(stages=4, seq_len=256, global_batch_tokens=1 << 20, slice_values=1 << 21, replicas=2)
    rows = {r["setting"]: r for r in result["rows"]}
    config = preset_config("gptj-6b", 50400, 0, 256)
    params = sum(stage_parameter_counts(config, stage_layer_ranges(28, 4)))
    base = rows["uncompressed"]
    assert base["sync"] == pytest.approx(8 * params / (1 << 20))     # one fp32 reduce-scatter + all-gather share each
    assert base["activations"] == base["gradients"] == 3 * 4 * 4096  # three boundaries of 4096 fp32 values per token
    four = rows["direct4+g4/256+cocktail"]
    assert 6 < base["activations"] / four["activations"] < 8.5       # 4 bits plus a fp32 scale per 256 values
    for row in rows.values():
        assert row["total"] == pytest.approx(row["activations"] + row["gradients"] + row["sync"])
    for full, quarter in result["linearity"].values():
        assert abs(full - quarter) / full < 0.01, result["linearity"]
    # At these shapes the boundaries, not the sync, dominate once the sync is compressed.
    assert four["activations"] + four["gradients"] > 10 * four["sync"]
