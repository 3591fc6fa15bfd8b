"""Data mixer throughput: tokens/s the coordinator's mixer makes on one core, beside what training consumes.

The mixer is the coordinator's own (``coordinator.data.build.build_mixer`` with the default data
settings: built-in text and instructions, UL2 phase then causal), timed per phase on one
pinned core at seq_len 64 (the demo) and 2048 (GPT-J). Then the demo swarm (``coordinator
demo``'s settings: tiny model, 2 stages, 3 CPU peers) runs a few rounds and its consumption is
read from /api/rounds (round 1 excluded as warm-up). Figures are row tokens (positions a
microbatch carries, padding included: what the pipeline computes on) and loss tokens (what
/api/rounds counts). The GPT-J line compares with the ~100k row tokens/s per core that GPT-J-6B
training on GPUs needs.

    python bench/data.py [--rounds 15] [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from coordinator.data.build import build_mixer, tokenizer_documents, tokenizer_special_tokens
from coordinator.local_swarm import LocalSwarm
from coordinator.data.tokenizer import load_or_train
from proto.run_config import CoordinatorConfig

GPTJ_NEED = 100_000  # row tokens/s per core that GPT-J-6B training on GPUs consumes


def mixer_rates(seq_len: int, tokenizer_dir: Path, seconds: float) -> dict[str, tuple[float, float]]:
    """{phase objective: (row tokens/s, loss tokens/s)} of the default mixer at ``seq_len``."""
    config = CoordinatorConfig(seq_len=seq_len)
    tokenizer = load_or_train(tokenizer_dir, tokenizer_documents(config), config.vocab_size, tokenizer_special_tokens(config))
    mixer = build_mixer(config, tokenizer)
    rates = {}
    for objective, tokens_before in (("ul2", 0), ("causal", config.ul2_tokens)):
        rows = loss = 0
        started = time.perf_counter()
        r = 0
        while time.perf_counter() - started < seconds:
            r += 1
            for i in range(config.microbatches_per_round):
                mb, info = mixer.microbatch_with_info(r, i, config.micro_batch_size, tokens_before)
                assert info.phase_objective == objective
                rows += mb.input_ids.numel()
                loss += sum(info.loss_tokens)
        elapsed = time.perf_counter() - started
        rates[objective] = (rows / elapsed, loss / elapsed)
    return rates


def swarm_rates(state_dir: Path, rounds: int) -> tuple[float, float, int]:
    """(row tokens/s, loss tokens/s, UL2 rounds) the demo swarm consumed over rounds 2..rounds."""
    config = CoordinatorConfig()
    swarm = LocalSwarm(state_dir, "--eval-on", "off", "--model", "tiny", "--stages", "2", "--rounds", str(rounds), "--checkpoint-every", str(10 * rounds),
                       "--linger", log_dir=state_dir / "logs")
    try:
        for _ in range(3):
            swarm.add_peer()
        swarm.wait_for(lambda: swarm.status()["round"] >= rounds, 1800, f"{rounds} rounds")
        records = swarm.rounds()
    finally:
        swarm.stop()
    seen, ul2_rounds = 0, 0
    for r in records:
        ul2_rounds += seen < config.ul2_tokens
        seen += r["tokens"]
    measured = [r for r in records if r["round"] > 1]
    seconds = sum(r["duration"] for r in measured)
    rows = sum(r["samples"] for r in measured) * config.seq_len
    return rows / seconds, sum(r["tokens"] for r in measured) / seconds, ul2_rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="demo swarm rounds")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per mixer phase")
    args = parser.parse_args()
    core = sorted(os.sched_getaffinity(0))[0]
    with tempfile.TemporaryDirectory(prefix="hometrain-bench-data-") as tmp:
        tmp = Path(tmp)
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {core})
        try:
            mixer = {seq_len: mixer_rates(seq_len, tmp / "tokenizer", args.seconds) for seq_len in (64, 2048)}
        finally:
            os.sched_setaffinity(0, affinity)
        swarm_rows, swarm_loss, ul2_rounds = swarm_rates(tmp / "swarm", args.rounds)

    print(f"mixer on 1 core (core {core}), default data settings, microbatches of {CoordinatorConfig().micro_batch_size}:")
    print(f"{'seq_len':>8} {'phase':>7} {'row tok/s':>12} {'loss tok/s':>12}")
    for seq_len, rates in mixer.items():
        for objective, (rows, loss) in rates.items():
            print(f"{seq_len:>8} {objective:>7} {rows:>12,.0f} {loss:>12,.0f}")
    print(f"demo swarm (tiny, 2 stages, 3 CPU peers), rounds 2..{args.rounds} ({ul2_rounds} UL2 rounds): "
          f"{swarm_rows:,.0f} row tok/s, {swarm_loss:,.0f} loss tok/s")
    slowest_64 = min(mixer[64].values())
    print(f"mixer (seq 64, slower phase) / demo swarm : {slowest_64[0] / swarm_rows:,.0f}x row tokens, "
          f"{slowest_64[1] / swarm_loss:,.0f}x loss tokens")
    slowest_2048 = min(mixer[2048].values())
    print(f"mixer (seq 2048, slower phase) / {GPTJ_NEED:,} row tok/s (GPT-J-6B per core) : {slowest_2048[0] / GPTJ_NEED:,.1f}x")


if __name__ == "__main__":
    main()
