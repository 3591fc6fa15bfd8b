"""One GPT-J-6B stage on a GPU, sized by the planner for a card's memory: tokens/s, model FLOPs utilisation, peak memory.

    python bench/gpu_stage.py                          # a middle stage that fits 24 GB, bf16 autocast, 8-bit AdamW
    python bench/gpu_stage.py --memory-gb 11 --activation-checkpointing
    python bench/gpu_stage.py --compile                # the same, with the stage's model under torch.compile, side by side
    python bench/gpu_stage.py --device cpu --blocks 1 --seq-len 256 --iterations 1   # the code path, on a CPU

The stage is the largest middle stage (blocks only) of ``plan_layer_ranges`` for the budget,
built by the peer's own StageRuntime; each iteration is one microbatch's forward and backward
as a round runs them, after one warm-up, then one optimizer step. Model FLOPs count 6 per
parameter per token plus attention's 12 x blocks x sequence x d_model per token (recomputed
forwards under activation checkpointing are not counted: that is what makes it *model* FLOPs
utilisation), against the card's dense bf16 peak (``--peak-tflops`` for cards not in the table).
Peak memory is torch.cuda.max_memory_allocated beside the plan's peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DENSE_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}  # SXM parts' dense bf16 tensor-core peaks


def gptj_6b():
    from transformers import GPTJConfig

    return GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def model_flops_per_token(config, blocks: int, seq_len: int) -> float:
    """Forward and backward FLOPs of one token through ``blocks`` GPT-J blocks (no recompute)."""
    from proto.memory_plan import StageShape

    shape = StageShape.of(config, 1, 1 + blocks)
    return 6 * blocks * shape.block_matrices + 12 * blocks * seq_len * config.n_embd


def choose_stage(args):
    """The run's settings, the stage's layer range (the largest middle stage the planner fits in --memory-gb, or
    --blocks), and its plan."""
    from proto.memory_plan import StageShape, plan_layer_ranges, plan_settings, plan_stage
    from proto.run_config import TrainConfig

    config = gptj_6b()
    train = TrainConfig(seq_len=args.seq_len, micro_batch_size=args.micro_batch, global_batch_size=args.micro_batch,
                        compute_dtype=args.compute_dtype, optimizer=args.optimizer, activation_checkpointing=args.activation_checkpointing)
    settings = plan_settings(train)
    if args.blocks:
        start, end = 1, 1 + args.blocks
    else:
        ranges = plan_layer_ranges(config, settings, int(args.memory_gb * 2**30))
        middle = [r for r in ranges if r[0] > 0 and r[1] < config.n_layer] or ranges
        start, end = max(middle, key=lambda r: r[1] - r[0])
    return train, (start, end), plan_stage(StageShape.of(config, start, end), settings)


def run(args, compile_model: bool) -> dict:
    import torch

    from peer.stage_runtime import StageRuntime

    config = gptj_6b()
    train, (start, end), plan = choose_stage(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    runtime = StageRuntime(config, train, start, end, device)
    runtime.initialise(0)
    if compile_model:
        runtime.model = torch.compile(runtime.model)
    hidden = torch.randn(args.micro_batch, args.seq_len, config.n_embd, device=device)
    grad = torch.randn_like(hidden)
    prefix, mask = torch.zeros(args.micro_batch, dtype=torch.int64), torch.ones(args.micro_batch, args.seq_len)

    def iteration() -> None:
        ctx = runtime.forward(1, hidden, prefix, mask, 0)
        runtime.backward(ctx, grad)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    iteration()  # warm-up (and compilation)
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.iterations):
        iteration()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.iterations
    runtime.load_gradients(runtime.flat_gradients(), args.seq_len)
    runtime.apply_step(1)
    if cuda:
        torch.cuda.synchronize()
    tokens_per_second = args.micro_batch * args.seq_len / seconds
    flops = model_flops_per_token(config, end - start, args.seq_len) * tokens_per_second
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"layers": (start, end), "tokens_per_second": tokens_per_second, "tflops": flops / 1e12, "peak": peak, "plan": plan}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-gb", type=float, default=24.0, help="The card's memory the stage is planned for.")
    parser.add_argument("--blocks", type=int, default=0, help="Blocks in the stage instead of the planner's choice.")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--optimizer", default="adamw8bit", choices=["adamw", "adamw8bit"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="Also measure the stage under torch.compile, beside eager.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="The card's dense bf16 peak, if not in the table.")
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        _, layers, plan = choose_stage(args)
        print(f"gpu_stage: no CUDA device here, nothing measured (--device cpu exercises the code path on a CPU). "
              f"The stage it would run: layers {list(layers)}, planned {plan.describe()}")
        return 2
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    peak_tflops = args.peak_tflops or next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), 0.0)
    print(f"{name}: GPT-J-6B stage planned for {args.memory_gb:g} GB, sequence {args.seq_len}, microbatch {args.micro_batch}, "
          f"{args.compute_dtype} autocast, {args.optimizer}, activation checkpointing {'on' if args.activation_checkpointing else 'off'}")
    print(f"{'mode':8} {'layers':>9} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9} {'plan GiB':>9} {'peak/plan':>10}")
    for compiled in ([False, True] if args.compile else [False]):
        r = run(args, compiled)
        mfu = f"{100 * r['tflops'] / peak_tflops:6.1f}%" if peak_tflops else "    n/a"
        peak = f"{r['peak'] / 2**30:9.2f}" if r["peak"] is not None else f"{'n/a':>9}"
        ratio = f"{r['peak'] / r['plan'].peak:10.3f}" if r["peak"] is not None else f"{'n/a':>10}"
        print(f"{'compile' if compiled else 'eager':8} {str(list(r['layers'])):>9} {r['tokens_per_second']:10.1f} {r['tflops']:9.2f} {mfu} "
              f"{peak} {r['plan'].peak / 2**30:9.2f} {ratio}", flush=True)
        print(f"         plan: {r['plan'].describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
