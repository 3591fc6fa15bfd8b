"""Test helpers over the project's local swarm launcher: logs go to files under the run directory."""

from __future__ import annotations

from pathlib import Path

from coordinator.local_swarm import ENV, LocalSwarm, free_port

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["ENV", "ROOT", "Swarm", "broken_blocks_env", "free_port"]


class Swarm(LocalSwarm):
    """A LocalSwarm training the tiny model, with each process's log in ``state_dir/logs``."""

    def __init__(self, state_dir: Path, *coordinator_args: str) -> None:
        super().__init__(state_dir, "--model", "tiny", *coordinator_args, log_dir=state_dir / "logs")


BREAKAGE = ROOT / "tests" / "breakage"


def broken_blocks_env(first_block: int) -> dict[str, str]:
    """Environment for a process whose GPT-J blocks from ``first_block`` on raise (tests/breakage/sitecustomize.py)."""
    return {"PYTHONPATH": str(BREAKAGE), "HOMETRAIN_TEST_BREAK_BLOCKS_FROM": str(first_block)}
