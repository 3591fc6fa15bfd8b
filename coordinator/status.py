"""What the coordinator shows: the /api/status and /api/rounds JSON, and the gauges /metrics reads at scrape time.

Both are snapshots of the coordinator's state, taken on its event loop (the HTTP server runs
in other threads and asks for them through ``*_threadsafe``).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Protocol

from transformers import GPTJConfig

from proto import PACKAGE_VERSION
from proto import hometrain_pb2 as pb
from proto.codec import WireKind
from proto.run_config import CoordinatorConfig

from .membership import Membership
from .metrics import CoordinatorMetrics
from .model_presets import parameter_count
from .rounds import RoundEngine
from .store import Store


class CoordinatorParts(Protocol):
    """What the report reads of the coordinator (``coordinator.app.CoordinatorApp`` has all of it)."""

    config: CoordinatorConfig
    store: Store
    engine: RoundEngine
    membership: Membership
    metrics: CoordinatorMetrics
    model_config: GPTJConfig
    layer_ranges: list[tuple[int, int]]
    data_description: dict[str, Any]
    run_id: str
    join_template: pb.JoinReply
    last_tokens_per_second: float | None
    loop: asyncio.AbstractEventLoop

    def checkpoint_url(self, round: int) -> str: ...


class StatusReport:
    """Reads the coordinator's parts; never changes them."""

    def __init__(self, app: CoordinatorParts) -> None:
        self.app = app

    def metrics_threadsafe(self) -> bytes:
        asyncio.run_coroutine_threadsafe(self.refresh_gauges(), self.app.loop).result(timeout=5)
        return self.app.metrics.render()

    def status_threadsafe(self) -> dict[str, Any]:
        return asyncio.run_coroutine_threadsafe(self.status(), self.app.loop).result(timeout=5)

    async def refresh_gauges(self) -> None:
        app, metrics = self.app, self.app.metrics
        metrics.peers.clear()
        for stage in range(app.membership.num_stages):  # a stage with nobody online shows 0, not nothing (alerts need it)
            metrics.peers.labels(str(stage), "online").set(0)
        for (stage, state), n in app.membership.counts().items():
            metrics.peers.labels(str(stage), state).set(n)
        for direction in ("sent", "received"):
            for kind, value in self.wire_totals(direction).items():
                metrics.wire_bytes.labels(kind, direction).set(value["bytes"])
                metrics.wire_uncompressed_bytes.labels(kind, direction).set(value["uncompressed_bytes"])
        metrics.stalled.set(1 if app.engine.stall is not None else 0)
        for agreed, n in app.engine.audit_verdicts.items():
            metrics.audits.labels("agreed" if agreed else "disagreed").set(n)
        metrics.flagged_peers.set(sum(1 for p in app.membership.live() if p.flagged))
        data = app.engine.data_progress()
        metrics.data_phase.set(data["phase"])
        for source, objectives in data["tokens_per_source_objective"].items():
            for objective, n in objectives.items():
                metrics.data_tokens.labels(source, objective).set(n)

    def wire_totals(self, direction: str = "sent") -> dict[str, dict[str, int]]:
        return {str(kind): {"bytes": 0, "uncompressed_bytes": 0} for kind in WireKind} | self.app.membership.wire_totals(direction)

    async def status(self) -> dict[str, Any]:
        app = self.app
        totals = app.store.totals()
        last = app.store.rounds(limit=1)
        stages = []
        for k, (a, b) in enumerate(app.layer_ranges):
            live = [p for p in app.membership.live() if p.stage == k]
            online = app.membership.online(k)
            stages.append({"index": k, "layers": [a, b], "replicas": len(live), "online": len(online), "throughput": sum(p.throughput for p in online)})
        checkpoints = [
            {**c, "path": str(Path(c["path"]).resolve()), "url": app.checkpoint_url(c["round"])} for c in app.store.checkpoints()
        ]
        cfg = app.model_config
        interval, timeout = app.membership.paced()
        return {
            "run": app.run_id,
            "version": PACKAGE_VERSION,
            "key_fingerprint": app.key_fingerprint,  # of the key that signs checkpoints: volunteers pin it (--coordinator-key)
            "private": app.tokens.required,  # join tokens are needed, and the data plane serves members only
            "model": {"preset": app.config.init_from or app.config.model, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                      "n_head": cfg.n_head, "rotary_dim": cfg.rotary_dim, "vocab_size": cfg.vocab_size, "parameters": parameter_count(cfg)},
            "round": last[0].round if last else 0,
            "current_round": app.engine.round,
            "phase": pb.RoundPhase.Name(app.engine.phase).lower(),
            "reason": app.engine.waiting_reason,
            "stalled": app.engine.stall_status(time.time()),
            "last_failure": app.engine.failure_status(),
            "loss": last[0].loss if last else None,
            "tokens": totals["tokens"],
            "samples": totals["samples"],
            "samples_dropped": totals["dropped"],
            "tokens_per_second": app.last_tokens_per_second,
            "peers": [p.as_json() for p in app.membership.records()],
            "peers_retired": app.membership.retired,
            "heartbeat": {"interval": interval, "rate": app.config.heartbeat_rate, "timeout": timeout},
            "stages": stages,
            "checkpoints": checkpoints,
            "evaluation": {"on": app.config.eval_on, **(app.evaluator.status() if app.evaluator else {"pending": [], "evaluating": [], "workers": []})},
            "wire": self.wire_totals(),
            "progress": app.engine.progress(),
            "audits": {"agreed": app.engine.audit_verdicts[True], "disagreed": app.engine.audit_verdicts[False],
                       "dropped": app.membership.retired_audits_dropped + sum(p.audits_dropped for p in app.membership.records())},
            "dht_maddrs": list(app.join_template.initial_peers),
            "train": json.loads(app.config.train_config().to_json()),
            "loss_scale": app.engine.loss_scale.value if app.engine.loss_scale is not None else None,
            "data": self.data_status(),
            "now": time.time(),
        }

    def data_status(self) -> dict[str, Any]:
        """The data phase in force, the schedule, the sources and the loss tokens trained by phase, source and objective."""
        progress = self.app.engine.data_progress()
        description = self.app.data_description
        phases = [{**p, "tokens": n} for p, n in zip(description["phases"], progress["tokens_per_phase"])]
        sources = [{**s, "trained_tokens": progress["tokens_per_source"].get(s["name"], 0)} for s in description["sources"]]
        return {
            "phase": {"index": progress["phase"], "objective": progress["objective"]},
            "phases": phases,
            "tokens_per_phase": progress["tokens_per_phase"],
            "tokens_per_source": progress["tokens_per_source"],
            "tokens_per_objective": progress["tokens_per_objective"],
            "objective_shares": progress["objective_shares"],
            "sources": sources,
            "ul2": description["ul2"],
            "seq_len": description["seq_len"],
            "pack_instructions": description["pack_instructions"],
            "heldout_share": description["heldout_share"],
        }

    def rounds(self) -> list[dict[str, Any]]:
        return [
            {
                "round": r.round, "loss": r.loss, "tokens": r.tokens, "samples": r.samples, "dropped": r.dropped,
                "started": r.started, "ended": r.ended, "duration": r.duration, "tokens_per_second": r.tokens / r.duration if r.duration > 0 else None,
                "participants": r.participants, "checksums": r.checksums, "diverged_stages": r.diverged_stages, "bytes": r.bytes,
                "lr": r.lr, "grad_norm": r.grad_norm,
            }
            for r in self.app.store.rounds()
        ]
