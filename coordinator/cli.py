"""`coordinator serve` (one run's coordinator) and `coordinator demo` (a local swarm)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from proto.lifecycle import die_with_parent
from proto.run_config import ConfigError, CoordinatorConfig, add_arguments, load

# gRPC's C core logs an INFO line each time hivemind forks its DHT process; keep the console readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
die_with_parent()


def _serve(config: CoordinatorConfig) -> int:
    from .app import CoordinatorApp

    async def run() -> None:
        app = CoordinatorApp(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, app.stop_requested.set)
        try:  # shut down whatever started even if start() failed: a live DHT child would keep the process from exiting
            await app.start()
            await app.serve_until_done()
        finally:
            await app.shutdown()

    asyncio.run(run())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coordinator", description="Run a hometrain training run's coordinator.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Coordinate a training run (gRPC control plane, status page, checkpoints).")
    serve.add_argument("--config", help="TOML file with the same keys as the flags; flags override it.")
    add_arguments(serve, CoordinatorConfig)
    demo = commands.add_parser("demo", help="Start a coordinator and local CPU peers training a tiny GPT-J.")
    from .demo import DemoConfig

    add_arguments(demo, DemoConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            return _serve(load(CoordinatorConfig, args, args.config))
        from .demo import run_demo

        return run_demo(load(DemoConfig, args))
    except (ConfigError, FileNotFoundError, OSError) as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return 2
