"""`peer join`: lend this machine's GPU (or CPU) to a hometrain run."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from proto.lifecycle import die_with_parent
from proto.run_config import ConfigError, PeerConfig, add_arguments, load


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": record.created, "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()})


# gRPC's C core logs an INFO line each time hivemind forks its DHT process; keep the console readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
die_with_parent()


def _setup_logging(config: PeerConfig) -> None:
    handler = logging.StreamHandler()
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING if config.quiet else logging.INFO, handlers=[handler])
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    # A refused frame (stale round, bad input) already reaches its sender as an error it logs; no traceback here.
    logging.getLogger("hivemind.p2p.p2p_daemon").setLevel(logging.ERROR)
    # bitsandbytes warns at import about a CPU matmul kernel hometrain never uses (it only quantizes).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peer", description="Contribute this machine to a hometrain run.")
    commands = parser.add_subparsers(dest="command", required=True)
    join = commands.add_parser("join", help="Join a run and train until Ctrl-C.")
    join.add_argument("--config", help="TOML file with the same keys as the flags; flags override it.")
    add_arguments(join, PeerConfig)
    args = parser.parse_args(argv)
    try:
        config = load(PeerConfig, args, args.config)
    except ConfigError as exc:
        print(f"peer: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config)
    log = logging.getLogger("peer")

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

    from .node import PeerNode

    async def run() -> int:
        node = PeerNode(config, device)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            log.info("leaving the run (Ctrl-C again to force)")
            node.stopping.set()
            loop.remove_signal_handler(signal.SIGINT)

        loop.add_signal_handler(signal.SIGINT, stop)
        loop.add_signal_handler(signal.SIGTERM, stop)
        return await node.run()

    return asyncio.run(run())
