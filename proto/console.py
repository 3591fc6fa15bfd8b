"""Console output shared by both processes: log format, verbosity, and the libraries kept quiet.

``--log-format json`` writes one JSON object per line (for journald, Loki, Kubernetes);
``--quiet`` keeps warnings and errors only. Both commands take the same two flags.
"""

from __future__ import annotations

import json
import logging
import os

from .run_config import ConsoleConfig


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": record.created, "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def quiet_libraries() -> None:
    """gRPC's C core logs a line each time hivemind forks its DHT process; keep the console readable."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def setup_logging(config: ConsoleConfig, text_format: str = "%(asctime)s %(levelname)s %(message)s") -> None:
    handler = logging.StreamHandler()
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(text_format, datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING if config.quiet else logging.INFO, handlers=[handler], force=True)
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    # A refused frame (stale round, bad input) already reaches its sender as an error it logs; no traceback here.
    logging.getLogger("hivemind.p2p.p2p_daemon").setLevel(logging.ERROR)
    # bitsandbytes warns at import about a CPU matmul kernel hometrain never uses (it only quantizes).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def human_bytes(n: float) -> str:
    """``1.2 MiB``: binary units, one decimal (bytes as a whole number)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
