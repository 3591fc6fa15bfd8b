"""Automatic evaluation: every published checkpoint goes through `coordinator eval` in a child process.

Publishing only queues the checkpoint: the evaluation runs in its own process (at low CPU
priority, one torch thread where it shares a CPU with training), one checkpoint at a time
in publish order, so rounds never wait for it. Its result, the ``eval.json`` it wrote beside
the checkpoint, is recorded in the store (``/api/status`` ``checkpoints[].eval``) and the
``hometrain_eval_*`` gauges. A restarted coordinator queues every checkpoint that has no
result yet (and records at once those whose ``eval.json`` an interrupted run already wrote).

On the tiny and small presets the coordinator evaluates on its own CPU; a GPT-J-6B run
should give the coordinator a GPU (``--eval-device cuda``) or turn this off (``--eval-on
off``) and run ``coordinator eval`` where one is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from proto.run_config import EvalOptions

from .evaluation import load_saved

log = logging.getLogger(__name__)

STDERR_TAIL = 2000  # characters of a failed evaluation's stderr kept for the log and the status


class Evaluator:
    """A queue of checkpoints and the one task that evaluates them in turn; ``on_result(round, result)`` per outcome."""

    def __init__(self, options: EvalOptions, on_result: Callable[[int, dict[str, Any]], None]) -> None:
        self.options = options
        self.on_result = on_result
        self.queue: asyncio.Queue[tuple[int, Path]] = asyncio.Queue()
        self.running: tuple[int, float] | None = None  # (round, monotonic start) of the evaluation under way
        self._child: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name="checkpoint-evaluation")

    def submit(self, round: int, checkpoint: Path) -> None:
        """Queue a checkpoint (call on the event loop), or record at once the result it already holds."""
        saved = load_saved(checkpoint)
        if saved is not None and saved.get("round") == round:
            self.on_result(round, saved)
            return
        self.queue.put_nowait((round, checkpoint))

    def pending(self) -> list[int]:
        """Rounds queued or under evaluation, oldest first."""
        queued = [r for r, _ in list(self.queue._queue)]  # asyncio.Queue keeps its items in a deque
        return ([self.running[0]] if self.running else []) + queued

    async def _work(self) -> None:
        while True:
            round, checkpoint = await self.queue.get()
            try:
                if checkpoint.is_dir():  # else removed by the organiser meanwhile
                    await self._evaluate_and_report(round, checkpoint)
            finally:
                self.queue.task_done()

    async def drain(self) -> None:
        """Return once every queued checkpoint is evaluated."""
        await self.queue.join()

    async def _evaluate_and_report(self, round: int, checkpoint: Path) -> None:
        self.running = (round, time.monotonic())
        try:
            result = await self._evaluate(checkpoint)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one bad checkpoint stop the evaluation of the next
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.running = None
        if "error" in result:
            log.warning("evaluation of the checkpoint of round %d failed: %s", round, result["error"])
        else:
            log.info("checkpoint of round %d evaluated in %.1f s: perplexity %s; accuracy %s", round, result.get("seconds", 0),
                     {k: round_(v) for k, v in result.get("perplexity", {}).items()},
                     {k: round_(v.get("acc")) for k, v in result.get("accuracy", {}).items()})
        self.on_result(round, result)

    async def _evaluate(self, checkpoint: Path) -> dict[str, Any]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "coordinator", "eval", str(checkpoint), "--json", *self.options.flags()]
        if self.options.device == "cpu":  # beside the training peers of a demo: one thread, low priority
            env.setdefault("OMP_NUM_THREADS", "1")
            command = (["nice", "-n", "10"] if shutil.which("nice") else []) + command
        self._child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
        _, stderr = await self._child.communicate()
        code, self._child = self._child.returncode, None
        saved = load_saved(checkpoint)
        if code != 0 or saved is None:
            tail = stderr.decode(errors="replace").strip()[-STDERR_TAIL:]
            return {"error": f"coordinator eval exited with status {code}: {tail or 'no output'}"}
        return saved

    async def stop(self) -> None:
        if self._child is not None and self._child.returncode is None:
            self._child.kill()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def round_(value: Any, digits: int = 3) -> Any:
    return round(value, digits) if isinstance(value, float) else value
