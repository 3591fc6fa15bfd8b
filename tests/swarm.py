"""Test helpers over the project's local swarm launcher: logs go to files under the run directory."""

from __future__ import annotations

from pathlib import Path

from coordinator.local_swarm import ENV, LocalSwarm, free_port

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["ENV", "ROOT", "Swarm", "broken_blocks_env", "free_port", "save_base_model", "seeded_model"]


class Swarm(LocalSwarm):
    """A LocalSwarm training the tiny model, with each process's log in ``state_dir/logs``. Checkpoints are not
    evaluated unless the test asks (``--eval-on``): an evaluation competes for the CPU with the peers on 2 cores."""

    def __init__(self, state_dir: Path, *coordinator_args: str) -> None:
        evaluation = () if "--eval-on" in coordinator_args else ("--eval-on", "off")
        super().__init__(state_dir, "--model", "tiny", *evaluation, *coordinator_args, log_dir=state_dir / "logs")

    def wait_evaluated(self, checkpoints: int, timeout: float, who: str) -> None:
        """Wait until ``checkpoints`` are published and each has its evaluation (a result or a recorded failure)."""
        def evaluated() -> bool:
            published = (self.status() or {}).get("checkpoints") or []
            return len(published) == checkpoints and all(c["eval"] is not None for c in published)

        self.wait_for(evaluated, timeout, f"{checkpoints} checkpoints published and evaluated by {who}")


BREAKAGE = ROOT / "tests" / "breakage"


def broken_blocks_env(first_block: int) -> dict[str, str]:
    """Environment for a process whose GPT-J blocks from ``first_block`` on raise (tests/breakage/sitecustomize.py)."""
    return {"PYTHONPATH": str(BREAKAGE), "HOMETRAIN_TEST_BREAK_BLOCKS_FROM": str(first_block)}


def seeded_model(config, seed: int):
    """The whole GPT-J a run from ``seed`` starts from: every peer builds its slice of it (peer.stage_model.seeded_init)."""
    from transformers import GPTJForCausalLM

    from peer.stage_model import seeded_init

    config._attn_implementation = "eager"
    model = GPTJForCausalLM(config)
    seeded_init(model.named_parameters(), seed, config)
    return model


def save_base_model(directory: Path, seed: int = 1234, vocab_size: int = 2048) -> Path:
    """A tiny GPT-J saved as a Hugging Face checkpoint (for --init-from): vocabulary large enough for the run's BPE."""
    from coordinator.model_presets import preset_config

    config = preset_config("tiny", vocab_size, 0, 64)
    seeded_model(config, seed).save_pretrained(directory)
    return directory
