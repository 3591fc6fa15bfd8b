"""HTTP side of the coordinator: status page, JSON API, Prometheus /metrics, checkpoint files.

A stdlib threading server: it only reads snapshots the event loop hands it and files on disk,
so it needs no async framework. Works offline: the page has no external assets.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from prometheus_client import CONTENT_TYPE_LATEST

from .status_page import render_page

log = logging.getLogger(__name__)


class StatusHTTPServer:
    """Serves ``/``, ``/api/status``, ``/api/rounds``, ``/metrics``, ``/checkpoints/<round-dir>/<file>`` and
    ``/heldout/<file>`` (the held-out split, for evaluating volunteers)."""

    def __init__(
        self,
        host: str,
        port: int,
        status: Callable[[], dict[str, Any]],
        rounds: Callable[[], list[dict[str, Any]]],
        metrics: Callable[[], bytes],
        checkpoint_root: Path,
        heldout_root: Path | None = None,
    ) -> None:
        handler = self._make_handler(status, rounds, metrics, checkpoint_root, heldout_root)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _make_handler(status, rounds, metrics, checkpoint_root: Path, heldout_root: Path | None):
        roots = {"/checkpoints/": (checkpoint_root.resolve(), "checkpoint file")}
        if heldout_root is not None:  # an evaluating volunteer reads the held-out split from here
            roots["/heldout/"] = (heldout_root.resolve(), "held-out split file")

        class Handler(BaseHTTPRequestHandler):
            server_version = "hometrain"

            def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per request is noise
                log.debug("http %s", fmt % args)

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, data: Any, code: int = 200) -> None:
                self._send(code, json.dumps(data, indent=1).encode(), "application/json")

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                path = urlparse(self.path).path
                try:
                    if path in ("/", "/index.html"):
                        self._send(200, render_page(status(), rounds()).encode(), "text/html; charset=utf-8")
                    elif path == "/api/status":
                        self._json(status())
                    elif path == "/api/rounds":
                        self._json(rounds())
                    elif path == "/metrics":
                        self._send(200, metrics(), CONTENT_TYPE_LATEST)
                    elif any(path.startswith(prefix) for prefix in roots):
                        prefix = next(prefix for prefix in roots if path.startswith(prefix))
                        self._file(*roots[prefix], unquote(path[len(prefix):]))
                    else:
                        self._json({"error": f"no such page {path!r}; try / or /api/status"}, HTTPStatus.NOT_FOUND)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                except Exception as exc:  # a page must never take the coordinator down
                    log.exception("http %s failed", path)
                    self._json({"error": f"{type(exc).__name__}: {exc}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

            def _file(self, root: Path, what: str, relative: str) -> None:
                target = (root / relative).resolve()
                if root not in target.parents or not target.is_file() or any(p.startswith(".") for p in target.relative_to(root).parts):
                    self._json({"error": f"no {what} {relative!r}"}, HTTPStatus.NOT_FOUND)
                    return
                size = target.stat().st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                if self.command == "HEAD":
                    return
                with target.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        self.wfile.write(block)

        return Handler
