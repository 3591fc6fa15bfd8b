"""The coordinator's persisted state: SQLite in WAL mode under --state-dir.

Holds the run's identity and settings, every completed round, the published checkpoints and
their evaluations, and the join tokens (as digests; ``coordinator token`` writes them from another process) (peers are not kept: after a restart they rejoin by themselves). A restarted coordinator reads
the last completed round from here and resumes at the next one, so no round is numbered twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    loss REAL,
    tokens INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    dropped INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL NOT NULL,
    participants TEXT NOT NULL,
    checksums TEXT NOT NULL,
    bytes TEXT NOT NULL,
    diverged_stages TEXT NOT NULL DEFAULT '[]',
    lr REAL,
    grad_norm REAL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    round INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    loss REAL,
    bytes INTEGER NOT NULL,
    seconds REAL NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (round INTEGER PRIMARY KEY, result TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS join_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL
);
"""


@dataclass(frozen=True)
class RoundRecord:
    """A completed round as stored."""

    round: int
    loss: float | None
    tokens: int
    samples: int
    dropped: int                 # samples dropped
    started: float
    ended: float
    participants: list[str]
    checksums: dict[str, list[str]] = field(default_factory=dict)  # stage -> checksums reported
    bytes: dict[str, int] = field(default_factory=dict)
    diverged_stages: list[int] = field(default_factory=list)  # stages whose replicas skipped syncs and differ until re-aligned
    lr: float | None = None         # the round's learning rate (the schedule's position)
    grad_norm: float | None = None  # the global gradient norm the stages clipped by (None: no clipping)

    @property
    def duration(self) -> float:
        return self.ended - self.started


def holds_a_run(path: Path) -> bool:
    """Whether the database at ``path`` belongs to a run that has started (read-only: nothing is created)."""
    if not path.is_file():
        return False
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone() is not None
    except sqlite3.OperationalError:  # no meta table yet
        return False
    finally:
        db.close()


class Store:
    """Thread-safe access to the run's SQLite database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(rounds)")}
            for column in ("lr", "grad_norm"):  # a store written before the training recipe was recorded
                if column not in columns:
                    self._db.execute(f"ALTER TABLE rounds ADD COLUMN {column} REAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def record_round(self, r: RoundRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.round, r.loss, r.tokens, r.samples, r.dropped, r.started, r.ended,
                 json.dumps(r.participants), json.dumps(r.checksums), json.dumps(r.bytes), json.dumps(r.diverged_stages), r.lr, r.grad_norm),
            )

    def rounds(self, limit: int | None = None) -> list[RoundRecord]:
        query = "SELECT * FROM rounds ORDER BY round DESC" + (f" LIMIT {int(limit)}" if limit else "")
        with self._lock:
            rows = self._db.execute(query).fetchall()
        return [
            RoundRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], json.loads(row[7]), json.loads(row[8]), json.loads(row[9]),
                        json.loads(row[10]), row[11], row[12])
            for row in reversed(rows)
        ]

    def last_round(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return int(row[0] or 0)

    def totals(self) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(tokens), 0), COALESCE(SUM(samples), 0), COALESCE(SUM(dropped), 0) FROM rounds").fetchone()
        return {"rounds": row[0], "tokens": row[1], "samples": row[2], "dropped": row[3]}

    def record_checkpoint(self, round: int, path: str, tokens: int, loss: float | None, size: int, seconds: float) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)", (round, path, tokens, loss, size, seconds, time.time()))

    def checkpoints(self) -> list[dict[str, Any]]:
        """Published checkpoints, oldest first, each with ``eval``: its evaluation's result, or None until there is one."""
        with self._lock:
            rows = self._db.execute(
                "SELECT c.round, path, tokens, loss, bytes, seconds, created, e.result FROM checkpoints c "
                "LEFT JOIN evaluations e ON e.round = c.round ORDER BY c.round").fetchall()
        keys = ("round", "path", "tokens", "loss", "bytes", "seconds", "created")
        return [dict(zip(keys, row[:-1]), eval=json.loads(row[-1]) if row[-1] else None) for row in rows]

    def add_token(self, token_id: str, name: str, digest: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO join_tokens VALUES (?, ?, ?, ?, NULL)", (token_id, name, digest, time.time()))

    def revoke_token(self, token_id: str) -> bool:
        """Revoke a token (by id or a unique prefix of it); False if no live token matches."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM join_tokens WHERE id LIKE ? AND revoked IS NULL", (token_id + "%",)).fetchall()
            if len(rows) != 1:
                return False
            self._db.execute("UPDATE join_tokens SET revoked = ? WHERE id = ?", (time.time(), rows[0][0]))
        return True

    def tokens(self) -> list[dict[str, Any]]:
        """Every token ever created, oldest first: id, name, digest, created, revoked (None: live)."""
        with self._lock:
            rows = self._db.execute("SELECT id, name, digest, created, revoked FROM join_tokens ORDER BY created").fetchall()
        return [dict(zip(("id", "name", "digest", "created", "revoked"), row)) for row in rows]

    def data_version(self) -> int:
        """Changes whenever another connection (``coordinator token revoke``) wrote to the database."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def record_evaluation(self, round: int, result: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO evaluations VALUES (?, ?)", (round, json.dumps(result)))
