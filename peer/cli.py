"""`peer join`: lend this machine's GPU (or CPU) to a hometrain run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from proto.console import quiet_libraries, setup_logging
from proto.lifecycle import die_with_parent
from proto.run_config import ConfigError, PeerConfig, add_arguments, load

quiet_libraries()
die_with_parent()
log = logging.getLogger("peer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peer", description="Contribute this machine to a hometrain run.")
    commands = parser.add_subparsers(dest="command", required=True)
    join = commands.add_parser("join", help="Join a run and train until Ctrl-C.", description="Join a run and train until Ctrl-C.")
    join.add_argument("--config", help="TOML file with the same keys as the flags; flags override it.")
    add_arguments(join, PeerConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(PeerConfig, args, args.config)
    except ConfigError as exc:
        print(f"peer: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    try:
        return _join(config)
    except KeyboardInterrupt:  # Ctrl-C before the event loop's handlers were in place (importing torch, say)
        return 130


def _join(config: PeerConfig) -> int:
    import torch

    from .device import DeviceError, probe_device

    try:
        device = probe_device(config.gpu)
    except DeviceError as exc:
        print(f"peer: {exc}", file=sys.stderr)
        return 2
    if device.auto:
        log.info("device: %s (automatic; --gpu N or --gpu cpu chooses)", device.description)
    else:
        log.info("device: %s", device.description)
    if config.threads:
        torch.set_num_threads(config.threads)
        log.info("torch uses %d CPU threads (--threads)", config.threads)
    if config.role == "eval":
        from .eval_worker import EvalWorker

        worker = EvalWorker(config, device)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: worker.stop())
        return worker.run()

    from .node import PeerNode

    async def run() -> int:
        node = PeerNode(config, device)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            if node.stopping.is_set():  # the second Ctrl-C: leave now, without the goodbyes
                print("peer: stopped without leaving the run cleanly", file=sys.stderr, flush=True)
                os._exit(130)  # forked helpers (the DHT) are killed with this process (proto.lifecycle)
            log.info("leaving the run (Ctrl-C again to force)")
            node.stopping.set()

        loop.add_signal_handler(signal.SIGINT, stop)
        loop.add_signal_handler(signal.SIGTERM, stop)
        return await node.run()

    return asyncio.run(run())
