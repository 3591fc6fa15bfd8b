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


def _token(args: argparse.Namespace) -> int:
    """``coordinator token create|list|revoke``: the run's join tokens, in its store (the coordinator may be running)."""
    import time

    from .join_tokens import issue
    from .store import Store

    database = Path(args.state_dir) / "coordinator.sqlite"
    if args.action != "create" and not database.is_file():
        print(f"coordinator token: {database} does not exist: --state-dir must be the run's state directory", file=sys.stderr)
        return 2
    store = Store(database)
    try:
        if args.action == "create":
            token = issue(store, args.name)
            if args.out:
                out = Path(args.out)
                out.touch(mode=0o600, exist_ok=False)
                out.write_text(token.secret + "\n")
                print(f"token {token.token_id} written to {out}: give that file to the volunteer (peer join --join-token-file FILE)")
            else:
                print(token.secret)
                print(f"token {token.token_id}: shown once; the run keeps only its digest. The volunteer puts it in a file and "
                      "passes --join-token-file FILE, or sets HOMETRAIN_JOIN_TOKEN", file=sys.stderr)
        elif args.action == "list":
            rows = store.tokens()
            if not rows:
                print("no tokens issued (the run admits whoever holds its --join-token, or anyone if it has none)")
            for row in rows:
                created = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created"]))
                state = "live" if row["revoked"] is None else "revoked " + time.strftime("%Y-%m-%d %H:%M", time.localtime(row["revoked"]))
                print(f"{row['id']}  {created}  {state:<24} {row['name']}")
        else:
            if not store.revoke_token(args.token_id):
                print(f"coordinator token: no single live token has the id {args.token_id!r} (see coordinator token list)", file=sys.stderr)
                return 2
            print(f"revoked {args.token_id}: peers that joined with it are refused at their next call")
    except FileExistsError:
        print(f"coordinator token: {args.out} exists; choose a new file (the token is written only to a file created for it)", file=sys.stderr)
        return 2
    finally:
        store.close()
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
    about = "Issue, list and revoke the run's join tokens (each volunteer gets their own; revoking one removes its peers)."
    token = commands.add_parser("token", help=about, description=about)
    token.add_argument("action", choices=("create", "list", "revoke"))
    token.add_argument("token_id", nargs="?", default="", help="revoke: the id (or a unique prefix) that create and list show.")
    token.add_argument("--state-dir", default=CoordinatorConfig.state_dir, help="The run's state directory (as given to coordinator serve).")
    token.add_argument("--name", default="", help="create: who the token is for, shown by list.")
    token.add_argument("--out", default="", help="create: write the token to this new file (mode 0600) instead of printing it.")
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
    if args.command == "token":
        if args.action == "revoke" and not args.token_id:
            print("coordinator token revoke: which token? give its id (coordinator token list shows them)", file=sys.stderr)
            return 2
        return _token(args)
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
