"""Bytes per trained token on the wire at GPT-J-6B's shapes, by kind, from the project's real codecs.

On the tiny model the replica sync is most of the bytes (few activations per parameter). At
GPT-J-6B a boundary carries 4096 values per token and a stage holds a billion or more
parameters, so the balance moves: this script shows where, for each compression setting.

Each codec runs on real tensors: one microbatch's boundary (1 x seq_len x 4096 activations, and
the same for their gradients) through ``quantization.encode_direct``, and a slice of a stage's
flat parameter vector (``--slice`` values, random, as a delta or accumulator would be) through
``cocktail.compress`` or ``sparseloco.compress``. Sync bytes scale from the slice to the stage
by the measured bytes per value, checked at a quarter of the slice too (the check is printed).
Framing (frame headers, libp2p's yamux and noise, TCP/IP) is not in these figures.

Per trained token, summed over all peers as ``bench/compression.py`` counts them: activations
and gradients cross stages - 1 boundaries once each; with R ``--replicas`` per stage the exact
sync sends 8 (R - 1) bytes per parameter per round (each replica's share of a reduce-scatter and
an all-gather of fp32 sums), a compressed sync R (R - 1) payloads (each replica's to every other),
per ``--sync-every`` rounds for sparseloco; all divided by ``--global-batch-tokens`` per round.

    python bench/gptj6b_bytes.py [--stages 4] [--replicas 2] [--seq-len 2048] [--global-batch-tokens 1048576] [--slice 16777216] [--json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from coordinator.assignment import stage_layer_ranges
from coordinator.model_presets import preset_config, stage_parameter_counts
from peer.compression import cocktail, sparseloco
from peer.compression.cocktail import SyncCompressionConfig
from peer.compression.quantization import QuantConfig, encode_direct
from peer.compression.sparseloco import SparseLoCoConfig


@dataclass(frozen=True)
class Setting:
    """Boundary bits (0: fp32) and block, and the sync: none, cocktail (bits) or sparseloco (bits, density, H)."""

    name: str
    boundary_bits: int = 0
    block: int = 256
    sync: str = "none"
    sync_bits: int = 4
    density: float = 64 / 4096
    every: int = 1


SETTINGS = (
    Setting("uncompressed"),
    Setting("direct4+g4/256+cocktail", 4, sync="cocktail"),
    Setting("direct2+g2/256+cocktail2", 2, sync="cocktail", sync_bits=2),
    Setting("direct4+g4/256+sparseloco.H15", 4, sync="sparseloco", sync_bits=2, every=15),
    Setting("direct4+g4/256+sparseloco.H8.d1/8", 4, sync="sparseloco", sync_bits=2, density=1 / 8, every=8),
    Setting("direct2+g2/256+sparseloco.H15", 2, sync="sparseloco", sync_bits=2, every=15),
)


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def boundary_bytes_per_token(bits: int, block: int, seq_len: int, d_model: int) -> float:
    """Bytes of one token's boundary tensor (activations or their gradients) at ``bits`` (0: fp32)."""
    x = torch.randn(1, seq_len, d_model, generator=torch.Generator().manual_seed(0))
    if not bits:
        return 4.0 * d_model
    return nbytes(encode_direct(x, QuantConfig(bits, block=block), "q.")) / seq_len


def sync_bytes_per_value(setting: Setting, n: int) -> float:
    """Payload bytes per parameter of one sync, measured on a random vector of ``n`` values."""
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    if setting.sync == "cocktail":
        payload, _ = cocktail.compress(v, 7, SyncCompressionConfig(bits=setting.sync_bits))
    else:
        payload, _ = sparseloco.compress(v, SparseLoCoConfig(density=setting.density, bits=setting.sync_bits))
    return nbytes(payload) / n


def table(stages: int, seq_len: int, global_batch_tokens: int, slice_values: int, replicas: int = 2) -> dict:
    config = preset_config("gptj-6b", 50400, 0, seq_len)
    counts = stage_parameter_counts(config, stage_layer_ranges(config.n_layer, stages))
    d = config.n_embd
    rows, checks = [], {}
    for s in SETTINGS:
        boundary = boundary_bytes_per_token(s.boundary_bits, s.block, seq_len, d) * (stages - 1)
        if s.sync == "none":
            per_round = 8.0 * (replicas - 1)
        else:
            per_value = sync_bytes_per_value(s, slice_values)
            quarter = sync_bytes_per_value(s, slice_values // 4)
            checks[s.name] = (per_value, quarter)
            per_round = replicas * (replicas - 1) * per_value
        sync = per_round * sum(counts) / s.every / global_batch_tokens
        rows.append({"setting": s.name, "activations": boundary, "gradients": boundary, "sync": sync, "total": 2 * boundary + sync})
    base = rows[0]["total"]
    for row in rows:
        row["reduction"] = base / row["total"]
    return {"stages": stages, "replicas": replicas, "stage_parameters": counts, "seq_len": seq_len, "global_batch_tokens": global_batch_tokens,
            "rows": rows, "linearity": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=2, help="replicas of each stage")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch-tokens", type=int, default=1 << 20, help="loss tokens per round (one optimizer step)")
    parser.add_argument("--slice", type=int, default=1 << 24, help="values of a stage the sync codecs run on")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.replicas < 2 or not 2 <= args.stages <= 28:
        parser.error(f"--replicas must be >= 2 (one replica syncs nothing) and --stages from 2 to 28; got {args.replicas}, {args.stages}")
    result = table(args.stages, args.seq_len, args.global_batch_tokens, args.slice, args.replicas)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"GPT-J-6B, {args.stages} stages x {args.replicas} replicas, stages of {', '.join(f'{c / 1e9:.2f}B' for c in result['stage_parameters'])} parameters, "
          f"seq {args.seq_len}, {args.global_batch_tokens} tokens per round; bytes per trained token")
    print(f"{'setting':36s} {'activations':>11s} {'gradients':>10s} {'sync':>8s} {'total':>9s} {'reduction':>9s} {'boundary share':>14s}")
    for r in result["rows"]:
        share = (r["activations"] + r["gradients"]) / r["total"]
        print(f"{r['setting']:36s} {r['activations']:11.0f} {r['gradients']:10.0f} {r['sync']:8.1f} {r['total']:9.0f} "
              f"{r['reduction']:8.1f}x {share:13.1%}")
    for name, (full, quarter) in result["linearity"].items():
        print(f"linearity {name}: {full:.5f} bytes per value on {args.slice} values, {quarter:.5f} on {args.slice // 4} "
              f"({abs(full - quarter) / full:.2%} apart)")


if __name__ == "__main__":
    main()
