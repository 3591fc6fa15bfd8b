"""LoRA on one stage: peft adapters on a frozen base (fp32, int8 or NF4 through bitsandbytes, here on the CPU)."""

from __future__ import annotations

import pytest
import torch

from coordinator.model_presets import preset_config
from proto.manifest import checkpoint_name, stage_name
from peer.stage_runtime import StageRuntime
from proto.run_config import TrainConfig


def _runtime(bits: int, rank: int = 4) -> tuple[StageRuntime, dict[str, torch.Tensor]]:
    config = preset_config("tiny", 512, 0, 64)
    full = StageRuntime(config, TrainConfig(seq_len=16), 0, config.n_layer, torch.device("cpu"))
    full.initialise(7)
    base = {k: v.clone() for k, v in full.model.named_parameters()}
    runtime = StageRuntime(config, TrainConfig(seq_len=16, lora_rank=rank, lora_base_bits=bits), 0, config.n_layer, torch.device("cpu"))
    runtime.load_base(base, seed=7)
    runtime.next_round = 1
    return runtime, base


def _loss(runtime: StageRuntime, ids: torch.Tensor) -> float:
    ctx = runtime.forward(1, ids, torch.zeros(2, dtype=torch.int64), torch.ones(2, 16))
    loss, tokens, _ = runtime.loss_backward(ctx, ids.roll(-1, 1), torch.ones(2, 16))
    return loss / tokens


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_only_adapters_train_and_they_start_as_the_base(bits):
    runtime, _ = _runtime(bits)
    names = [n for n, _ in runtime.trainable()]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert all(("q_proj" in n or "v_proj" in n) for n in names)  # the default targets
    assert sum(p.numel() for _, p in runtime.trainable()) == 4 * 2 * 2 * (4 * 128)  # layers x (q, v) x (A, B) x rank x d
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _loss(runtime, ids)
    grads = runtime.flat_gradients()
    assert grads.abs().sum() > 0 and torch.isfinite(grads).all()
    frozen = [p for n, p in runtime.model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    runtime.load_gradients(grads, 32)
    runtime.apply_step(1)
    runtime.next_round = 1
    assert _loss(runtime, ids) != before  # the step moved the adapters, and with them the output
    if bits != 32:
        import bitsandbytes as bnb

        kind = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
        assert any(isinstance(m, kind) for m in runtime.model.modules())


def test_quantised_bases_stay_close_to_fp32():
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = {bits: _loss(_runtime(bits)[0], ids) for bits in (32, 8, 4)}
    assert abs(losses[8] - losses[32]) < 0.02 * losses[32] and abs(losses[4] - losses[32]) < 0.05 * losses[32], losses


def test_adapter_names_round_trip_through_peft_naming():
    name = "transformer.h.3.attn.q_proj.lora_A.default.weight"
    assert checkpoint_name(name) == "base_model.model.transformer.h.3.attn.q_proj.lora_A.weight"
    assert stage_name(checkpoint_name(name)) == name
