"""Swarm overhead: tokens/s of a 1-stage, 1-peer swarm / tokens/s of a plain training loop.

Both train the same model from the same initial weights on the same batches (the coordinator's
own ``build_mixer``: UL2 rows with their prefix-LM mask first, then causal + instructions) with
the same optimizer, one CPU thread each, measured in one invocation. The swarm's figure covers whole
rounds as the coordinator records them (batch hand-out over gRPC, forward, backward,
progress reports, the step and its checksum), not peer start-up. Round 1 is warm-up for both.

    python bench/overhead.py [--model tiny|small] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPTJConfig, GPTJForCausalLM

from coordinator.data.build import build_mixer
from coordinator.local_swarm import LocalSwarm
from coordinator.store import Store
from peer.stage_model import seeded_init
from proto.run_config import CoordinatorConfig, TrainConfig


def swarm_tokens_per_second(state_dir: Path, model: str, rounds: int) -> float:
    swarm = LocalSwarm(state_dir, "--eval-on", "off", "--model", model, "--stages", "1", "--rounds", str(rounds), "--checkpoint-every", str(10 * rounds), "--linger",
                       log_dir=state_dir / "logs")
    try:
        swarm.add_peer("--threads", "1")
        swarm.wait_for(lambda: swarm.status()["round"] >= rounds, 1800, f"{rounds} rounds")
        measured = [r for r in swarm.rounds() if r["round"] > 1]
    finally:
        swarm.stop()
    return sum(r["tokens"] for r in measured) / sum(r["duration"] for r in measured)


def prefix_lm_mask(prefix_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: causal, plus every query sees the bidirectional prefix (as the peers' stages do)."""
    positions = torch.arange(seq_len)
    allowed = (positions[None, :] <= positions[:, None])[None] | (positions[None, None, :] < prefix_lengths[:, None, None])
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def plain_tokens_per_second(state_dir: Path, rounds: int) -> float:
    t = CoordinatorConfig()  # the swarm's data and training settings: the defaults
    config = GPTJConfig.from_dict(json.loads(Store(state_dir / "coordinator.sqlite").get_meta("model_config")))
    config._attn_implementation = "eager"
    model = GPTJForCausalLM(config)
    seeded_init(model.named_parameters(), t.seed, config)  # the weights the swarm's peers built from the run's seed
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(str(state_dir / "tokenizer"))
    data = build_mixer(t, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
    tokens, elapsed, tokens_seen = 0, 0.0, 0
    for r in range(1, rounds + 1):
        started = time.perf_counter()
        round_tokens = 0
        for i in range(t.microbatches_per_round):
            mb = data.microbatch(r, i, t.micro_batch_size, tokens_seen)
            logits = model(mb.input_ids, attention_mask=prefix_lm_mask(mb.prefix_lengths, t.seq_len)).logits
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb.target_ids.flatten(), reduction="none")
            loss = (losses * mb.loss_mask.flatten()).sum()
            loss.backward()
            round_tokens += mb.loss_tokens
        for p in model.parameters():
            p.grad /= round_tokens
        optimizer.step()
        optimizer.zero_grad()
        tokens_seen += round_tokens
        if r > 1:
            tokens += round_tokens
            elapsed += time.perf_counter() - started
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="hometrain-bench-") as tmp:
        state = Path(tmp)
        swarm = swarm_tokens_per_second(state, args.model, args.rounds)
        plain = plain_tokens_per_second(state, args.rounds)
    print(f"model {args.model}, {args.rounds} rounds of {TrainConfig().global_batch_size} x {TrainConfig().seq_len} tokens, 1 CPU thread each")
    print(f"plain loop      : {plain:10.0f} tokens/s")
    print(f"1-peer swarm    : {swarm:10.0f} tokens/s")
    print(f"swarm / plain   : {swarm / plain:10.3f}")


if __name__ == "__main__":
    main()
