"""What the swarm has trained on: loss tokens by data phase, and by (source, objective).

Counted as microbatches finish, saved in the store with every recorded round, so a restarted
coordinator keeps counting from there; the status page, ``/api/status`` ``data`` and
``hometrain_data_tokens`` read ``progress``.
"""

from __future__ import annotations

import json

from ..store import Store
from .batch import MicrobatchInfo
from .mixer import DataMixer

STORE_KEY = "data_tokens"  # store meta: loss tokens trained by phase and by (source, objective), JSON


class DataAccounting:
    """Loss tokens trained, by phase and by (source, objective); persisted with each recorded round."""

    def __init__(self, store: Store, mixer: DataMixer) -> None:
        self.store = store
        self.mixer = mixer
        saved = store.get_meta(STORE_KEY)
        totals = json.loads(saved) if saved else {}
        self.phases: dict[str, int] = dict(totals.get("phases", {}))
        self.sources: dict[str, dict[str, int]] = {k: dict(v) for k, v in totals.get("sources", {}).items()}

    def count(self, info: MicrobatchInfo) -> None:
        """Add a trained microbatch's loss tokens to the totals by phase and by (source, objective)."""
        self.phases[str(info.phase)] = self.phases.get(str(info.phase), 0) + sum(info.loss_tokens)
        for source, objective, n in zip(info.sources, info.objectives, info.loss_tokens):
            per_source = self.sources.setdefault(source, {})
            per_source[objective] = per_source.get(objective, 0) + int(n)

    def save(self) -> None:
        self.store.set_meta(STORE_KEY, json.dumps({"phases": self.phases, "sources": self.sources}, sort_keys=True))

    def progress(self, tokens_before: int) -> dict:
        """The data phase in force for a round that starts after ``tokens_before`` loss tokens, and the loss
        tokens trained so far by phase, source, objective and (source, objective)."""
        phase = self.mixer.phase_at(tokens_before)
        pairs = {s: dict(sorted(o.items())) for s, o in sorted(self.sources.items())}
        by_objective: dict[str, int] = {}
        for objectives in pairs.values():
            for objective, n in objectives.items():
                by_objective[objective] = by_objective.get(objective, 0) + n
        total = sum(by_objective.values())
        return {
            "phase": phase,
            "objective": str(self.mixer.phase_configs[phase].objective),
            "tokens_per_phase": [self.phases.get(str(i), 0) for i in range(len(self.mixer.phase_configs))],
            "tokens_per_source": {s: sum(o.values()) for s, o in pairs.items()},
            "tokens_per_objective": dict(sorted(by_objective.items())),
            "tokens_per_source_objective": pairs,
            "objective_shares": {o: n / total for o, n in sorted(by_objective.items())} if total else {},
        }
