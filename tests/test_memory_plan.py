"""The memory planner on GPT-J-6B's numbers, checked against hand arithmetic written out here."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTJConfig, GPTJForCausalLM

from proto.memory_plan import GIB, PlanSettings, StageShape, fit_advice, plan_layer_ranges, plan_stage

D, H, F, R, V, S = 4096, 16, 16384, 64, 50400, 2048
BLOCK = 4 * D * D + 2 * D * F + F + D + 2 * D  # q, k, v, out; fc_in, fc_out; their biases; ln_1 = 201,355,264


def gptj_6b() -> GPTJConfig:
    return GPTJConfig(vocab_size=V, n_positions=S, n_embd=D, n_layer=28, n_head=H, rotary_dim=R)


def test_parameter_counts_are_gptjs():
    assert BLOCK == 201_355_264
    shape = StageShape.of(gptj_6b(), 0, 28)
    with torch.device("meta"):
        model = GPTJForCausalLM(gptj_6b())
    assert shape.parameters == sum(p.numel() for p in model.parameters()) == 28 * BLOCK + V * D + 2 * D + D * V + V


def test_one_fp32_block_by_hand():
    plan = plan_stage(StageShape.of(gptj_6b(), 5, 6), PlanSettings(seq_len=S, micro_batch=1))
    tokens = S
    saved = 4 * (6 * tokens * D + 2 * tokens + 4 * tokens * R + H * S * S + 5 * tokens * F)  # one block's autograd tensors
    ends = 4 * S * S + 4 * tokens * D                                                          # the mask, the stage's output
    backward = max(4 * (2 * tokens * F + 2 * tokens * D), 4 * (2 * H * S * S - 5 * tokens * F))  # the MLP's gradients first
    assert plan.parts["weights"] == plan.parts["gradients"] == 4 * BLOCK == 805_421_056
    assert plan.parts["optimizer"] == 8 * BLOCK
    assert plan.parts["activations"] == saved + ends == 1_142_964_224 + 50_331_648
    assert plan.parts["backward"] == backward == 335_544_320
    assert plan.parts["sync"] == 8 * BLOCK and plan.parts["step"] == 4 * D * F
    assert plan.peak == 16 * BLOCK + max(saved + ends + backward, 8 * BLOCK + 4 * D * F)


def test_bf16_8bit_checkpointing_by_hand():
    settings = PlanSettings(seq_len=S, micro_batch=1, precision="bfloat16", optimizer="adamw8bit", activation_checkpointing=True, in_flight=2)
    plan = plan_stage(StageShape.of(gptj_6b(), 5, 9), settings)
    matrices = 4 * (4 * D * D + 2 * D * F)
    small = 4 * (F + 3 * D)  # biases and LayerNorms keep 32-bit state
    assert plan.parts["weights"] == 4 * 4 * BLOCK  # fp32 master weights: autocast only computes in bf16
    assert plan.parts["optimizer"] == 2 * matrices + 8 * (matrices // 2048) + 8 * small
    kept = 4 * S * D * 4 + 4 * S * S + 4 * S * D  # each block's input, the mask, the output
    assert plan.parts["activations"] == 2 * kept
    assert plan.parts["step"] == 3 * 4 * D * F   # 8-bit AdamW dequantizes the largest tensor's two moments


def test_lora_trains_only_the_adapters():
    settings = PlanSettings(seq_len=S, micro_batch=1, lora_rank=8, lora_targets=("q_proj", "v_proj"), lora_base_bits=4)
    plan = plan_stage(StageShape.of(gptj_6b(), 5, 6), settings)
    adapters = 2 * 8 * (D + D)
    assert plan.parts["gradients"] == 4 * adapters and plan.parts["optimizer"] == 8 * adapters
    matrices = 4 * D * D + 2 * D * F
    assert plan.parts["weights"] == matrices // 2 + 4 * matrices // 64 + 4 * (BLOCK - matrices) + 4 * adapters


def test_layer_ranges_fit_the_budget_and_the_ends_hold_fewer_blocks():
    config = gptj_6b()
    settings = PlanSettings(seq_len=S, micro_batch=1, precision="bfloat16", optimizer="adamw8bit", activation_checkpointing=True)
    for budget in (11, 24):
        ranges = plan_layer_ranges(config, settings, budget * GIB)
        assert ranges[0][0] == 0 and ranges[-1][1] == 28 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(plan_stage(StageShape.of(config, a, b), settings).peak <= budget * GIB for a, b in ranges)
        widest = max(b - a for a, b in ranges)
        assert ranges[-1][1] - ranges[-1][0] <= widest  # the head's 206M parameters take a block's place
    assert len(plan_layer_ranges(config, settings, 11 * GIB)) > len(plan_layer_ranges(config, settings, 24 * GIB))
    seven = plan_layer_ranges(config, settings, 24 * GIB, stages=7)
    assert len(seven) == 7
    with pytest.raises(ValueError, match="not even one block fits 1.0 GiB"):
        plan_layer_ranges(config, settings, 1 * GIB)
    fewest = len(plan_layer_ranges(config, settings, 11 * GIB))
    with pytest.raises(ValueError, match=f"2 stages cannot each fit 11.0 GiB; it takes at least {fewest}"):
        plan_layer_ranges(config, settings, 11 * GIB, stages=2)


def test_a_stage_that_does_not_fit_says_what_would():
    settings = PlanSettings(seq_len=S, micro_batch=1)
    text = fit_advice(gptj_6b(), 4, 8, settings, 11 * GIB)
    assert "needs 18.25 GiB" in text and "11.0 GiB free" in text and "fits 2 of its blocks" in text  # 2 x 16 B x 201M + activations
    assert "--stage-memory-gb" in text and "--compute-dtype bfloat16" in text and "--optimizer adamw8bit" in text


@pytest.mark.swarm
def test_a_gptj_6b_coordinator_starts_in_little_memory_and_reports_the_shape(tmp_path):
    """It knows the shape and never builds the model (fp32 GPT-J-6B alone is 24 GB): its peak stays under 2 GiB."""
    from coordinator.local_swarm import LocalSwarm

    swarm = LocalSwarm(tmp_path / "run", "--model", "gptj-6b", "--stages", "7", "--seq-len", "2048", log_dir=tmp_path / "logs")
    try:
        status = swarm.status()
        peak = next(int(line.split()[1]) * 1024 for line in open(f"/proc/{swarm.coordinator.pid}/status") if line.startswith("VmHWM:"))
    finally:
        swarm.stop()
    model = status["model"]
    assert (model["n_layer"], model["n_embd"], model["n_head"], model["rotary_dim"], model["vocab_size"]) == (28, 4096, 16, 64, 50400)
    assert model["parameters"] == 28 * BLOCK + 2 * V * D + 2 * D + V  # 6,050,882,784
    assert [s["layers"] for s in status["stages"]] == [[4 * k, 4 * k + 4] for k in range(7)]
    assert status["checkpoints"] == []  # a run from the seed publishes nothing until it has trained
    print(f"coordinator peak memory with GPT-J-6B's shape: {peak / GIB:.2f} GiB")
    assert peak < 2 * GIB, peak
