"""2 stages x 1 replica on loopback: the swarm trains exactly like one process, and its checkpoint is the model.

The swarm trains causal LM on the built-in text only (no UL2 phase, no instructions), so every
row is a plain causal window and HF's own causal forward is the right reference. It trains with
the whole recipe: a learning-rate warm-up then cosine decay, clipping by the global gradient
norm (low enough that it clips), and weight decay on matrices only; the reference does the same
with torch's own clip_grad_norm_ and AdamW parameter groups.
"""

from __future__ import annotations

import json
import math

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPTJConfig, GPTJForCausalLM

from coordinator.data.build import build_mixer
from peer.swarm_client import swarm_logits, swarm_stage_state
from proto import PROTOCOL_VERSION
from proto import hometrain_pb2 as pb
from proto import hometrain_pb2_grpc as pb_grpc
from proto.manifest import optimizer_shard_name, verify_directory
from proto.run_config import CoordinatorConfig

from .swarm import Swarm, seeded_model

pytestmark = pytest.mark.swarm
ROUNDS = 10
DATA_ARGS = ("--ul2-tokens", "0", "--instruction-share", "0")
WARMUP, MIN_RATIO, CLIP, DECAY = 3, 0.2, 0.8, 0.1
RECIPE_ARGS = ("--lr-warmup-rounds", str(WARMUP), "--lr-schedule", "cosine", "--lr-min-ratio", str(MIN_RATIO),
               "--clip-grad-norm", str(CLIP), "--weight-decay", str(DECAY))  # the decay ends at --rounds


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    state = tmp_path_factory.mktemp("exact")
    token = state / "join-token"  # secrets come from a file or the environment, never from a command line
    token.write_text("secret\n")
    s = Swarm(state, "--stages", "2", "--rounds", str(ROUNDS), "--checkpoint-every", str(ROUNDS), "--linger", "--join-token-file", str(token), *DATA_ARGS, *RECIPE_ARGS)
    s.add_peer("--stage", "0", "--serve-after-run", env={"HOMETRAIN_JOIN_TOKEN": "secret"})
    s.add_peer("--stage", "1", "--join-token-file", str(token), "--serve-after-run")
    s.observer = {"coordinator": f"127.0.0.1:{s.port}", "join_token": "secret"}
    try:
        s.wait_for(lambda: any(c["round"] == ROUNDS for c in s.status()["checkpoints"]), 300, f"the checkpoint of round {ROUNDS}")
        yield s
    finally:
        s.stop()


def expected_lr(peak: float, round: int) -> float:
    """Linear warm-up over WARMUP rounds, then cosine from the peak to MIN_RATIO of it at round ROUNDS."""
    if round <= WARMUP:
        return peak * round / WARMUP
    floor = peak * MIN_RATIO
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (round - WARMUP) / (ROUNDS - WARMUP)))


def reference_run(state_dir, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """Plain single-process training on the same batches, seed and recipe: (losses, gradient norms, learning rates)."""
    t = CoordinatorConfig(ul2_tokens=0, instruction_share=0)  # the swarm's data settings: defaults plus DATA_ARGS
    model = seeded_model(GPTJConfig.from_pretrained(str(state_dir / "checkpoints" / f"round-{ROUNDS:06d}")), t.seed)  # what peers built
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(str(state_dir / "tokenizer"))
    data = build_mixer(t, tokenizer)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": DECAY}, {"params": vectors, "weight_decay": 0.0}],
                                  lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    losses, norms, lrs, tokens_seen = [], [], [], 0
    for r in range(1, rounds + 1):
        loss_sum, tokens = 0.0, 0
        for i in range(t.microbatches_per_round):
            mb = data.microbatch(r, i, t.micro_batch_size, tokens_seen)
            assert mb.prefix_lengths.eq(0).all() and mb.loss_mask.eq(1).all(), "not a plain causal row: the reference would be wrong"
            logits = model(mb.input_ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb.target_ids.flatten(), reduction="sum")
            loss.backward()
            loss_sum += loss.item()
            tokens += mb.loss_tokens
        for p in model.parameters():
            p.grad /= tokens
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        lrs.append(expected_lr(t.lr, r))
        for group in optimizer.param_groups:
            group["lr"] = lrs[-1]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss_sum / tokens)
        tokens_seen += tokens
    return losses, norms, lrs


def test_swarm_losses_match_single_process_reference(swarm):
    rounds = swarm.rounds()
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["dropped"] == 0 for r in rounds)
    losses, norms, lrs = reference_run(swarm.state_dir, ROUNDS)
    assert sum(n > CLIP for n in norms) >= ROUNDS // 2, f"the clip threshold must bite: reference norms {norms}"
    for record, loss, norm, lr in zip(rounds, losses, norms, lrs):
        assert record["loss"] == pytest.approx(loss, rel=1e-4), f"round {record['round']}"
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-4), f"round {record['round']}: the global norm both stages clipped by"
        assert record["lr"] == pytest.approx(lr, rel=1e-9), f"round {record['round']}"
    assert losses[-1] < losses[0]
    gauges = {s.name: s.value for family in text_string_to_metric_families(swarm.get_text("/metrics")) for s in family.samples}
    assert gauges["hometrain_learning_rate"] == pytest.approx(lrs[-1], rel=1e-9)
    assert gauges["hometrain_grad_norm"] == pytest.approx(norms[-1], rel=1e-4)


def test_checkpoint_loads_with_transformers_and_equals_swarm_output(swarm):
    status = swarm.status()
    checkpoint = next(c for c in status["checkpoints"] if c["round"] == ROUNDS)
    directory = swarm.state_dir / "checkpoints" / "round-000010"
    manifest = verify_directory(directory)
    assert manifest["round"] == ROUNDS and manifest["tokens"] == sum(r["tokens"] for r in swarm.rounds())
    assert checkpoint["url"].endswith("/checkpoints/round-000010/")
    model = GPTJForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Return the sum of a list of numbers, or zero."],
                      return_tensors="pt", padding="max_length", max_length=24, truncation=True)["input_ids"]
    with torch.no_grad():
        expected = model(batch).logits
    with pytest.raises(Exception, match="not a member"):  # a run with join tokens serves its members only
        swarm_logits(status["dht_maddrs"], status["run"], batch, timeout=20)
    actual = swarm_logits(status["dht_maddrs"], status["run"], batch, **swarm.observer)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # Beside each shard, its stage's optimizer state: what the live replica holds after the last round.
    for stage in (0, 1):
        name = optimizer_shard_name(stage, 2)
        assert name in manifest["files"], sorted(manifest["files"])
        saved = load_file(str(directory / name))
        peer = next(p for p in status["peers"] if p["stage"] == stage)
        _, live, _ = swarm_stage_state(status["dht_maddrs"], status["run"], peer["p2p_id"], stage, **swarm.observer)
        moments = {k: v for k, v in live.items() if k.startswith("optim.")}
        assert moments and set(saved) == set(moments) and all(torch.equal(saved[k], moments[k]) for k in moments)


def test_join_refuses_wrong_protocol_and_missing_token(swarm):
    with grpc.insecure_channel(f"127.0.0.1:{swarm.port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as old:
            stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION + 1, join_token="secret"), timeout=10)
        assert old.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "install hometrain==" in old.value.details()
        with pytest.raises(grpc.RpcError) as no_token:
            stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), timeout=10)
        assert no_token.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--join-token" in no_token.value.details()


def test_status_api_shape(swarm):
    status = swarm.status()
    assert status["round"] == ROUNDS and status["loss"] is not None and status["tokens"] > 0
    assert {"id", "stage", "device", "state", "last_seen"} <= set(status["peers"][0])
    assert [s["index"] for s in status["stages"]] == [0, 1]
    assert status["stages"][0]["layers"] == [0, 2] and status["stages"][1]["layers"] == [2, 4]
    assert all({"round", "path", "url"} <= set(c) for c in status["checkpoints"])
    assert json.loads(json.dumps(status)) == status
