"""Test helpers over the project's local swarm launcher: logs go to files under the run directory."""

from __future__ import annotations

from pathlib import Path

from coordinator.local_swarm import ENV, LocalSwarm, free_port

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["ENV", "ROOT", "Swarm", "free_port"]


class Swarm(LocalSwarm):
    """A LocalSwarm training the tiny model, with each process's log in ``state_dir/logs``."""

    def __init__(self, state_dir: Path, *coordinator_args: str) -> None:
        super().__init__(state_dir, "--model", "tiny", *coordinator_args, log_dir=state_dir / "logs")
