"""`coordinator serve` (one run's coordinator), `coordinator demo` (a local swarm), `coordinator export` (a checkpoint for
transformers), `coordinator eval` (a checkpoint's held-out perplexity and multiple-choice accuracy)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from proto.console import quiet_libraries, setup_logging
from proto.lifecycle import die_with_parent
from proto.run_config import ConfigError, CoordinatorConfig, EvalOptions, add_arguments, load

from .demo import EXIT_STALLED, DemoConfig

quiet_libraries()
die_with_parent()


def _serve(config: CoordinatorConfig) -> int:
    from .app import CoordinatorApp

    async def run() -> int:
        app = CoordinatorApp(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, app.stop_requested.set)
        try:  # shut down whatever started even if start() failed: a live DHT child would keep the process from exiting
            await app.start()
            await app.serve_until_done()
        finally:
            await app.shutdown()
        return EXIT_STALLED if app.engine.gave_up else 0

    return asyncio.run(run())


def _export(args: argparse.Namespace) -> int:
    from .export import ExportConfig, export_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_checkpoint(ExportConfig(args.checkpoint, args.out, args.merge, args.base))
    except (ConfigError, OSError) as exc:
        print(f"coordinator export: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from .evaluation import evaluate

    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = evaluate(args.checkpoint, load(EvalOptions, args))
    except (ConfigError, OSError) as exc:
        print(f"coordinator eval: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=1, sort_keys=True))
        return 0
    details = result.details
    print(f"checkpoint of round {result.round}: {args.checkpoint} ({result.seconds:.1f} s on {details.get('device')})")
    for source, ppl in result.perplexity.items():
        d = details["perplexity"][source]
        print(f"  perplexity  {source:<16} {ppl:10.3f}   ({d['tokens']} held-out tokens, context {d['context']}, stride {d['stride']})")
    for task, acc in result.accuracy.items():
        d = details["accuracy"][task]
        print(f"  accuracy    {task:<16} acc {acc['acc']:.3f}  acc_norm {acc['acc_norm']:.3f}   ({d['n']} questions, {d['shots']}-shot)")
    print(f"saved to {args.checkpoint / 'eval.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator", description="Run a hometrain training run's coordinator.")
    commands = parser.add_subparsers(dest="command", required=True)
    about = "Coordinate a training run (gRPC control plane, status page, checkpoints)."
    serve = commands.add_parser("serve", help=about, description=about)
    serve.add_argument("--config", help="TOML file with the same keys as the flags; flags override it.")
    add_arguments(serve, CoordinatorConfig)
    about = "Start a coordinator and local CPU peers training a tiny GPT-J on this machine."
    demo = commands.add_parser("demo", help=about, description=about)
    add_arguments(demo, DemoConfig)
    about = "Write a published checkpoint as a Hugging Face model directory (LoRA adapters merged with --merge)."
    export = commands.add_parser("export", help=about, description=about)
    export.add_argument("checkpoint", type=Path, help="A checkpoint directory, e.g. STATE_DIR/checkpoints/round-000030.")
    export.add_argument("--out", type=Path, required=True, help="New directory to write (must not exist or be empty).")
    export.add_argument("--merge", action="store_true", help="LoRA checkpoints: fold the adapters into the base weights (peft's merge_and_unload).")
    export.add_argument("--base", type=Path, default=None,
                        help="LoRA checkpoints: the base model directory, if not where the adapter config says (the run's round-0 checkpoint).")
    about = "Evaluate a checkpoint: perplexity on each source's held-out split, multiple-choice accuracy (acc, acc_norm)."
    evaluation = commands.add_parser("eval", help=about, description=about)
    evaluation.add_argument("checkpoint", type=Path, help="A checkpoint directory, e.g. STATE_DIR/checkpoints/round-000030.")
    evaluation.add_argument("--json", action="store_true", help="Print the results as JSON (saved as eval.json beside the checkpoint either way).")
    add_arguments(evaluation, EvalOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "export":
        return _export(args)
    if args.command == "eval":
        return _eval(args)
    try:
        config = load(CoordinatorConfig, args, args.config) if args.command == "serve" else load(DemoConfig, args)
        setup_logging(config, "%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.command == "serve":
            return _serve(config)
        from .demo import run_demo

        return run_demo(config)
    except (ConfigError, FileNotFoundError, OSError) as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the event loop's handlers were in place
        return 130
