"""Traffic and loss of the demo swarm (2 stages x 2 replicas) uncompressed and with each compression setting.

Every setting trains the same tiny GPT-J from the same seed on the same data for the same
rounds, in one invocation, with the run's training recipe (warm-up, cosine decay to the last
round, global clipping, matrix-only decay). Every round of every setting syncs the same four
replicas: rounds open only when each stage has both of its replicas (``--min-replicas 2``), so
no round runs short of a replica. Bytes are what peers counted sending, by kind, divided by the
loss tokens trained; "reduction" compares activations + gradients + sync with the
uncompressed run (state transfer at start-up and control messages are shown apart). These are
tensor payloads: the framing around them (frame headers, libp2p's yamux and noise, TCP/IP) is
not in them; bench/netlab measures it against the kernel's counters. Final
loss is the mean of the last 5 rounds; the gap is relative to the uncompressed run.

Two tables: from random init, and continued training (GPT-JT's and CocktailSGD's case: an
existing model trained further). For the second, one uncompressed run trains
--pretrain-rounds first; every setting then starts from its last checkpoint (--init-from,
fresh optimizer) on data it has not seen (another seed, causal LM from the start).

A third table trains AQ-SGD on a small dataset for several epochs (samples repeat) and
shows the activation bytes of each epoch: first visits go at --activation-first-bits and
fill both caches, later visits send 2-bit changes. The mixer draws samples with replacement,
so an "epoch" is a dataset's worth of samples, not each sample exactly once.

    python bench/compression.py [--rounds 100] [--pretrain-rounds 240] [--no-scratch] [--only NAME ...]
                                [--repeats 1] [--epochs 3] [--diagnostics]

``--repeats N`` runs each compressed setting N times (rows "#2", "#3"...): which replica trains
which microbatch depends on timing, so compressed rows are not bit-reproducible.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

from coordinator.local_swarm import LocalSwarm

TRAINING_KINDS = ("activations", "gradients", "sync")
DIRECT4 = ["--activation-compression", "direct", "--activation-bits", "4", "--gradient-bits", "4"]
DIRECT2 = ["--activation-compression", "direct", "--activation-bits", "2", "--gradient-bits", "2"]
BLOCK256 = ["--boundary-block", "256"]
COCKTAIL = ["--sync-compression", "cocktail"]
SPARSELOCO = ["--sync-compression", "sparseloco", "--sync-bits", "2"]  # 64 of every 4096 values (--sync-density's default)
SETTINGS: dict[str, list[str]] = {
    "uncompressed": [],
    "aqsgd2/8+g8 (no sync compr.)": ["--activation-compression", "aqsgd", "--activation-bits", "2", "--activation-first-bits", "8",
                                     "--gradient-bits", "8"],
    "direct4+g4 (no sync compr.)": DIRECT4,
    "direct4+g4/256+cocktail.3x.3": [*DIRECT4, *BLOCK256, *COCKTAIL, "--sync-random-ratio", "0.3", "--sync-topk-ratio", "0.3"],
    "direct4+g4/256+cocktail": [*DIRECT4, *BLOCK256, *COCKTAIL],
    "direct2+g2/256+cocktail2+skip.75": [*DIRECT2, *BLOCK256, *COCKTAIL, "--sync-bits", "2", "--p-skip", "0.75", "--resync-every", "10"],
    "direct4+g4/256+sparseloco.H1": [*DIRECT4, *BLOCK256, *SPARSELOCO, "--sync-every", "1"],
    "direct4+g4/256+sparseloco.H4": [*DIRECT4, *BLOCK256, *SPARSELOCO, "--sync-every", "4"],
    "direct4+g4/256+sparseloco.H15": [*DIRECT4, *BLOCK256, *SPARSELOCO, "--sync-every", "15"],
    "direct2+g2/256+sparseloco.H4": [*DIRECT2, *BLOCK256, *SPARSELOCO, "--sync-every", "4"],
}
# Where the loss goes (--diagnostics): each cost alone.
DIAGNOSTICS: dict[str, list[str]] = {
    "direct2+g2 (no sync compr.)": DIRECT2,
    "direct2+g2/256 (no sync compr.)": [*DIRECT2, *BLOCK256],
    "cocktail dense 8-bit (delta form)": [*COCKTAIL, "--sync-random-ratio", "1", "--sync-topk-ratio", "1", "--sync-bits", "8"],
    "cocktail alone": COCKTAIL,
}
# Only by name (--only): the same sync bytes as sparseloco.H4's 1.56%, spent on denser, rarer syncs; and, for long runs
# from random init (e.g. --rounds 300), exact sums first, as CocktailSGD warms up.
WARMUP: dict[str, list[str]] = {
    "direct4+g4/256+sparseloco.H8.d1/8": [*DIRECT4, *BLOCK256, *SPARSELOCO, "--sync-every", "8", "--sync-density", "0.125"],
    "direct4+g4/256+sparseloco.H16.d1/4": [*DIRECT4, *BLOCK256, *SPARSELOCO, "--sync-every", "16", "--sync-density", "0.25"],
    "direct4+g4/256+cocktail after 240 exact": [*DIRECT4, *BLOCK256, *COCKTAIL, "--sync-warmup-rounds", "240"],
    # the same 2% of values as cocktail's default, chosen from a 5% shared subset: half the mask bits
    "direct4+g4/256+cocktail.05x.4": [*DIRECT4, *BLOCK256, *COCKTAIL, "--sync-random-ratio", "0.05", "--sync-topk-ratio", "0.4"],
}


def run_swarm(state: Path, rounds: int, flags: list[str], keep_checkpoint: bool = False, replicas: int = 2,
              add_peers: Callable[[LocalSwarm], None] | None = None) -> tuple[dict, list[dict]]:
    """Train ``rounds`` rounds with 2 stages of ``replicas`` peers each (rounds open only with all of them); returns the
    final status and the round records. ``add_peers`` starts the peers instead (default: plain ``peer join``s).
    With ``keep_checkpoint`` the run publishes a checkpoint of its last round and waits until the status lists it."""
    every = rounds if keep_checkpoint else 10 * rounds
    swarm = LocalSwarm(state, "--eval-on", "off", "--model", "tiny", "--stages", "2", "--min-replicas", str(replicas), "--rounds", str(rounds),
                       "--checkpoint-every", str(every), "--linger", *flags, log_dir=state / "logs")
    try:
        if add_peers is not None:
            add_peers(swarm)
        for _ in range(0 if add_peers is not None else 2 * replicas):
            swarm.add_peer("--serve-after-run")
        swarm.wait_for(lambda: swarm.status()["round"] >= rounds, 1800, f"{rounds} rounds")
        if keep_checkpoint:
            swarm.wait_for(lambda: any(c["round"] == rounds for c in swarm.status()["checkpoints"]), 300, f"the checkpoint of round {rounds}")
        time.sleep(2.5)  # one more heartbeat from every peer carries the final byte counters
        return swarm.status(), swarm.rounds()
    finally:
        swarm.stop()


def compare(tmp: Path, names: list[str], settings: dict[str, list[str]], rounds: int, common: list[str] = (), repeats: int = 1) -> dict:
    """Run every named setting (plus ``common`` flags) for ``rounds``, compressed ones ``repeats`` times; bytes by
    kind, tokens and final loss of each run."""
    results = {}
    for name in names:
        for repeat in range(1 if name == "uncompressed" else repeats):
            label = name if repeat == 0 else f"{name} #{repeat + 1}"
            status, records = run_swarm(tmp / label.replace("/", "_").replace(" ", "_"), rounds, [*common, *settings[name]])
            short = [r["round"] for r in records if len(r["participants"]) != 4]
            if short:
                raise SystemExit(f"{label}: rounds {short[:5]} synced fewer than the 4 replicas; the comparison would not be fair")
            tokens = sum(r["tokens"] for r in records)
            results[label] = (status["wire"], tokens, final_loss(records))
            print(f"ran {label}: {len(records)} rounds, {tokens} tokens", flush=True)
    return results


def final_loss(records: list[dict], last: int = 5) -> float:
    """The mean loss of the last ``last`` rounds that trained (one round's loss is too noisy to compare runs by)."""
    losses = [r["loss"] for r in records if r["loss"] is not None]
    return sum(losses[-last:]) / len(losses[-last:])


def print_table(title: str, results: dict) -> None:
    base_wire, base_tokens, base_loss = results["uncompressed"]
    base_total = sum(base_wire[k]["bytes"] for k in TRAINING_KINDS) / base_tokens
    print(f"\n{title}; bytes sent per trained token")
    print(f"{'setting':44s} {'activations':>11s} {'gradients':>10s} {'sync':>10s} {'total':>10s} {'reduction':>9s} {'state+ctl':>9s} {'loss':>7s} {'gap':>7s}")
    for name, (wire, tokens, loss) in results.items():
        per = {k: wire[k]["bytes"] / tokens for k in TRAINING_KINDS}
        total = sum(per.values())
        other = (wire["state"]["bytes"] + wire["control"]["bytes"]) / tokens
        print(f"{name:44s} {per['activations']:11.1f} {per['gradients']:10.1f} {per['sync']:10.1f} {total:10.1f} "
              f"{base_total / total:8.1f}x {other:9.1f} {loss:7.4f} {100 * (loss - base_loss) / base_loss:+6.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each compressed setting, to show their spread")
    parser.add_argument("--only", nargs="*", default=None, choices=[*SETTINGS, *DIAGNOSTICS, *WARMUP])
    parser.add_argument("--diagnostics", action="store_true", help="run the settings that isolate each cost instead")
    parser.add_argument("--pretrain-rounds", type=int, default=240,
                        help="continued-training table: train uncompressed this long first, then every setting from that model (0 skips it)")
    parser.add_argument("--scratch", action=argparse.BooleanOptionalAction, default=True, help="the table of runs from random init")
    parser.add_argument("--epochs", type=int, default=3, help="0 skips the AQ-SGD epochs table")
    args = parser.parse_args()
    settings = {**SETTINGS, **DIAGNOSTICS, **WARMUP}
    chosen = args.only if args.only is not None else list(DIAGNOSTICS if args.diagnostics else SETTINGS)
    names = ["uncompressed", *[n for n in chosen if n != "uncompressed"]]
    scratch = continued = epochs = None
    with tempfile.TemporaryDirectory(prefix="hometrain-bench-") as tmp:
        if args.scratch:
            scratch = compare(Path(tmp) / "scratch", names, settings, args.rounds, repeats=args.repeats)
        if args.pretrain_rounds:
            pretrained = Path(tmp) / "pretrain"
            status, _ = run_swarm(pretrained, args.pretrain_rounds, [], keep_checkpoint=True)
            checkpoint = next(c["path"] for c in status["checkpoints"] if c["round"] == args.pretrain_rounds)
            print(f"ran the uncompressed pre-training: {args.pretrain_rounds} rounds", flush=True)
            # The GPT-JT case: go on training an existing model, on data it has not seen (another
            # seed), causal from the start, with a fresh optimizer as --init-from gives.
            common = ["--init-from", checkpoint, "--tokenizer", str(pretrained / "tokenizer"),
                      "--seed", "1", "--ul2-tokens", "0"]
            continued = compare(Path(tmp) / "continued", names, settings, args.rounds, common, args.repeats)
        epochs = epoch_table(Path(tmp) / "epochs", args.epochs) if args.epochs else None

    if scratch:
        print_table(f"2 stages x 2 replicas, tiny GPT-J from random init, {args.rounds} rounds", scratch)
    if continued:
        print_table(f"The same, continuing the model of {args.pretrain_rounds} uncompressed rounds, {args.rounds} rounds", continued)
    if epochs is None:
        return
    print(f"\nAQ-SGD (2-bit changes, 8-bit first visits), 2 stages x 1 replica, a small dataset ({epochs['windows']} samples, "
          f"drawn with replacement) for {args.epochs} epochs: activation bytes sent per epoch")
    print(f"{'epoch':>5s} {'rounds':>9s} {'bytes':>10s} {'fp32 bytes':>11s} {'ratio':>7s}")
    for e, (first, last, sent, raw) in enumerate(epochs["rows"], 1):
        print(f"{e:5d} {first:4d}-{last:<4d} {sent:10d} {raw:11d} {raw / max(sent, 1):6.1f}x")


def epoch_table(state: Path, epochs: int) -> dict:
    """Causal LM on a small text file, one replica per stage (each sample keeps its route and its
    cache entries), so every sample comes back each epoch; bytes per epoch from the round records."""
    state.mkdir(parents=True)
    text = state / "small.txt"
    text.write_text("\n\n".join(f"Note {i}: the {i % 7}th lamp of row {i % 11} is {'on' if i % 3 else 'off'}." for i in range(160)))
    config = state / "run.toml"
    config.write_text(f'ul2_tokens = 0\n[[sources]]\nname = "small"\npath = "{text}"\nformat = "text"\nweight = 1.0\n')
    flags = ["--activation-compression", "aqsgd", "--activation-bits", "2", "--activation-first-bits", "8"]
    swarm = LocalSwarm(state / "run", "--eval-on", "off", "--model", "tiny", "--stages", "2", "--rounds", "0", "--checkpoint-every", "1000",
                       "--config", str(config), *flags, log_dir=state / "logs")
    try:
        status = swarm.status()
        seq_len = status["train"]["seq_len"]
        windows = status["data"]["sources"][0]["tokens"] // (seq_len + 1)
        per_epoch = -(-windows // status["train"]["global_batch_size"])
        for _ in range(2):
            swarm.add_peer()
        swarm.wait_for(lambda: swarm.status()["round"] >= epochs * per_epoch, 1800, f"{epochs} epochs")
        rounds = swarm.rounds()
    finally:
        swarm.stop()
    rows, previous = [], {}
    for e in range(epochs):
        last = rounds[(e + 1) * per_epoch - 1]["bytes"]
        sent = last.get("activations_sent", 0) - previous.get("activations_sent", 0)
        raw = last.get("activations_uncompressed_sent", 0) - previous.get("activations_uncompressed_sent", 0)
        rows.append((e * per_epoch + 1, (e + 1) * per_epoch, sent, raw))
        previous = last
    return {"windows": windows, "rows": rows}


if __name__ == "__main__":
    main()
