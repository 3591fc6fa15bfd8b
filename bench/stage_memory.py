"""A GPT-J-6B stage's memory, measured beside the planner's prediction, on this machine's CPU.

    python bench/stage_memory.py                      # 1 and 2 real GPT-J-6B blocks, sequence 2048, microbatch 1
    python bench/stage_memory.py --blocks 1 --seq-len 512

Each setting runs in a fresh process: a middle stage of GPT-J-6B's shape (d_model 4096, 16
heads, d_ff 16384, rotary 64) built by the peer's own StageRuntime, a warm-up round on 16
tokens (so the optimizer's state exists), then the measured round: one forward, one backward
and one optimizer step, as a round runs them (the step after an exact sync of two or more
replicas: the flat gradient and its sum side by side). The measured peak is the process's peak
resident memory (VmHWM, reset once the stage is built) minus what it held before the stage
was built; the prediction is
``proto.memory_plan.plan_stage`` for the same settings. Tokens/s is the forward and backward
of the microbatch. CPU only: autocast to bf16 runs on the CPU too (slowly); on a GPU the
same plan applies to device memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SETTINGS = {
    "fp32 / AdamW": dict(compute_dtype="float32", optimizer="adamw"),
    "fp32 / AdamW, checkpointing": dict(compute_dtype="float32", optimizer="adamw", activation_checkpointing=True),
    "bf16 autocast / AdamW": dict(compute_dtype="bfloat16", optimizer="adamw"),
    "bf16 autocast / AdamW, checkpointing": dict(compute_dtype="bfloat16", optimizer="adamw", activation_checkpointing=True),
    "bf16 autocast / 8-bit AdamW": dict(compute_dtype="bfloat16", optimizer="adamw8bit"),
    "bf16 autocast / 8-bit AdamW, checkpointing": dict(compute_dtype="bfloat16", optimizer="adamw8bit", activation_checkpointing=True),
    "LoRA r8 q,v / bf16 autocast, fp32 base": dict(compute_dtype="bfloat16", lora_rank=8),
    "LoRA r8 q,v / bf16 autocast, int8 base": dict(compute_dtype="bfloat16", lora_rank=8, lora_base_bits=8),
    "LoRA r8 q,v / bf16 autocast, NF4 base": dict(compute_dtype="bfloat16", lora_rank=8, lora_base_bits=4),
}


def _proc_status(field: str) -> int:
    """A VmRSS/VmHWM figure of this process, in bytes."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def gptj_6b():
    from transformers import GPTJConfig

    return GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def measure(setting: dict, blocks: int, seq_len: int, threads: int) -> dict:
    """In this process: build the stage, run a round's work on one microbatch, report peak memory and speed."""
    import gc
    import time

    import torch

    from peer.stage_runtime import StageRuntime
    from proto.memory_plan import StageShape, plan_settings, plan_stage
    from proto.run_config import TrainConfig

    torch.set_num_threads(threads)
    config = gptj_6b()
    train = TrainConfig(seq_len=seq_len, micro_batch_size=1, global_batch_size=1, max_inflight=1, **setting)  # one microbatch, as run here
    torch.manual_seed(0)
    hidden = torch.randn(1, seq_len, config.n_embd)
    output_grad = torch.randn(1, seq_len, config.n_embd)
    before = _proc_status("VmRSS")
    runtime = StageRuntime(config, train, 1, 1 + blocks, torch.device("cpu"))
    if train.lora_rank:  # the frozen base (its own random weights) quantised as --lora-base-bits says, adapters on it
        runtime.load_base({k: p.detach() for k, p in runtime.model.named_parameters()}, seed=0)
    runtime.next_round = 1
    # A warm-up round on a few tokens first: the optimizer makes its state at its first step, so the round
    # measured after it is a steady one (state, gradients, the sync's copies and the step all at once).
    short = seq_len if seq_len <= 16 else 16
    ctx = runtime.forward(1, hidden[:, :short], torch.zeros(1, dtype=torch.int64), torch.ones(1, short), 0)
    runtime.backward(ctx, output_grad[:, :short])
    runtime.load_gradients(runtime.flat_gradients(), short)
    runtime.apply_step(1)
    runtime.finish_round(1)
    # The peak from here on: a LoRA base is built in fp32 on the host and quantised before it reaches the device,
    # so the build's transient is host memory, not what the plan (of device memory) covers.
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    started = time.perf_counter()
    ctx = runtime.forward(2, hidden, torch.zeros(1, dtype=torch.int64), torch.ones(1, seq_len), 0)
    runtime.backward(ctx, output_grad)
    seconds = time.perf_counter() - started
    flat = runtime.flat_gradients()
    summed = flat.clone()  # what an exact sync of two or more replicas returns beside the local gradient
    runtime.load_gradients(summed, seq_len)
    runtime.apply_step(2)
    peak = _proc_status("VmHWM") - before
    plan = plan_stage(StageShape.of(config, 1, 1 + blocks), plan_settings(train))
    return {"measured": peak, "planned": plan.peak, "parts": plan.parts, "tokens_per_second": seq_len / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(SETTINGS[args.one], args.blocks[0], args.seq_len, args.threads)))
        return
    print(f"GPT-J-6B middle stage (d_model 4096, d_ff 16384, 16 heads), sequence {args.seq_len}, microbatch 1 (one in flight), CPU, {args.threads} threads")
    print(f"{'setting':44} {'blocks':>6} {'planned GiB':>12} {'measured GiB':>13} {'measured/planned':>17} {'tokens/s':>9}")
    for name in args.only or SETTINGS:
        for blocks in args.blocks:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--blocks", str(blocks), "--seq-len", str(args.seq_len),
                                  "--threads", str(args.threads)], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name:44} {blocks:>6} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:44} {blocks:>6} {r['planned'] / 2**30:>12.2f} {r['measured'] / 2**30:>13.2f} "
                  f"{r['measured'] / r['planned']:>17.3f} {r['tokens_per_second']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
