"""Automatic evaluation: every published checkpoint is queued, in publish order, and evaluated off the round path.

Who evaluates is ``--eval-on``:

- ``coordinator``: a child process of the coordinator runs `coordinator eval` on each in turn
  (on CPU with one torch thread at low priority, beside the training peers): the tiny and
  small presets, or a coordinator with a GPU (``--eval-device cuda``).
- ``peer``: volunteers that run ``peer join --role eval`` (a GPU for GPT-J-6B) take the
  checkpoints one at a time over the control plane (``NextEvaluation``), download them and the
  held-out split over HTTP, run `coordinator eval` there and send the result back
  (``ReportEvaluation``). A checkpoint taken by a worker that reports nothing within
  ``LEASE_SECONDS`` (or asks for another) goes back to the front of the queue.

Either way the result (``eval.json``) is recorded in the store (``/api/status``
``checkpoints[].eval``) and the ``hometrain_eval_*`` gauges, and kept beside the checkpoint.
A restarted coordinator queues every checkpoint that has no result yet (and records at once
those whose ``eval.json`` an interrupted run already wrote).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from proto.run_config import EvalOptions

from .evaluation import load_saved, save

log = logging.getLogger(__name__)

STDERR_TAIL = 2000            # characters of a failed evaluation's output kept for the log and the status
LEASE_SECONDS = 1800.0        # how long a worker may hold a checkpoint without renewing it before it goes to another
ATTEMPTS = 3                  # volunteers that may fail on a checkpoint before the failure is recorded as its result
WORKER_IDLE_SECONDS = 86400.0  # a volunteer not heard from for a day is dropped from the table
RESULT_MAX_BYTES = 1 << 20    # a reported eval.json larger than this is refused
LOCAL = "coordinator"         # the worker id of the coordinator's own child process


@dataclass
class Lease:
    worker: str
    checkpoint: Path
    deadline: float
    started: float


@dataclass
class Worker:
    """An evaluating volunteer, as the status page shows it."""

    worker_id: str
    name: str
    device: str
    last_seen: float
    evaluated: int = 0
    credential_digest: str = ""  # of the credential its first job reply carried: its later requests must carry it

    def as_json(self, leases: dict[int, Lease]) -> dict[str, Any]:
        holding = [r for r, lease in leases.items() if lease.worker == self.worker_id]
        return {"id": self.worker_id, "name": self.name, "device": self.device, "last_seen": self.last_seen,
                "evaluating": holding[0] if holding else None, "evaluated": self.evaluated}


def check_result(result: Any, round: int, sources: set[str] | None = None, tasks: set[str] | None = None) -> str | None:
    """Why a reported evaluation cannot be recorded, or None: it must look like `coordinator eval`'s own, naming only
    the run's ``sources`` and ``tasks`` (when given)."""
    if not isinstance(result, dict):
        return f"expected a JSON object, got {type(result).__name__}"
    if result.get("round") != round:
        return f"the result is for round {result.get('round')!r}, the job was round {round}"
    perplexity, accuracy, seconds = result.get("perplexity"), result.get("accuracy"), result.get("seconds")
    # Perplexity may be +inf (a diverged model), never NaN or below 1.
    if not isinstance(perplexity, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) and v >= 1
                                                   for k, v in perplexity.items()):
        return "perplexity must map source names to numbers >= 1"
    if not isinstance(accuracy, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and set(v) == {"acc", "acc_norm"}
            and all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v.values()) for k, v in accuracy.items()):
        return "accuracy must map task names to {acc, acc_norm} in [0, 1]"
    if sources is not None and not set(perplexity) <= sources:
        return f"perplexity names sources this run does not have: {sorted(set(perplexity) - sources)[:5]}"
    if tasks is not None and not set(accuracy) <= tasks:
        return f"accuracy names tasks this run does not have: {sorted(set(accuracy) - tasks)[:5]}"
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return "seconds must be a finite number >= 0"
    return None


class Evaluator:
    """The queue of checkpoints to evaluate, the leases of those being evaluated and who evaluates them."""

    def __init__(self, options: EvalOptions, on_result: Callable[[int, dict[str, Any]], None], local: bool) -> None:
        self.options = options
        self.on_result = on_result
        self.local = local
        self.waiting: list[tuple[int, Path]] = []   # in publish order
        self.leases: dict[int, Lease] = {}
        self.workers: dict[str, Worker] = {}
        self.failures: dict[int, list[str]] = {}  # round -> what went wrong, attempt by attempt
        self.sources: set[str] | None = None      # names a result may use (None: not checked)
        self.tasks: set[str] | None = None
        self._changed = asyncio.Event()
        self._child: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.local:
            self._task = asyncio.get_running_loop().create_task(self._work(), name="checkpoint-evaluation")

    # ------------------------------------------------------------ the queue

    def submit(self, round: int, checkpoint: Path) -> None:
        """Queue a checkpoint (call on the event loop), or record at once the result it already holds."""
        saved = load_saved(checkpoint)
        if saved is not None and check_result(saved, round, self.sources, self.tasks) is None:
            self.on_result(round, saved)
            return
        if round not in self.leases and all(r != round for r, _ in self.waiting):
            self.waiting.append((round, checkpoint))
            self._changed.set()

    def pending(self) -> list[int]:
        """Rounds being evaluated, then those queued, oldest first."""
        return sorted(self.leases) + [r for r, _ in self.waiting]

    def take(self, worker: str, now: float, lease_seconds: float = LEASE_SECONDS) -> tuple[int, Path] | None:
        """The oldest queued checkpoint, leased to ``worker`` (whose earlier lease, if any, is given back)."""
        self.expire(now, worker)
        while self.waiting:
            round, checkpoint = self.waiting.pop(0)
            if checkpoint.is_dir():  # else removed by the organiser meanwhile
                self.leases[round] = Lease(worker, checkpoint, now + lease_seconds, now)
                return round, checkpoint
        return None

    def expire(self, now: float, giving_back: str = "") -> None:
        """Leases past their deadline, and those of ``giving_back``, return to the front of the queue."""
        for round, lease in sorted(self.leases.items(), reverse=True):
            if lease.deadline <= now or lease.worker == giving_back:
                del self.leases[round]
                self.waiting.insert(0, (round, lease.checkpoint))
                log.warning("evaluation of the checkpoint of round %d by %s %s; queued again", round, lease.worker,
                            "was given up" if lease.worker == giving_back else f"took over {now - lease.started:.0f}s")
        self.waiting.sort(key=lambda job: job[0])

    def give_back(self, worker: str, round: int) -> None:
        """``worker`` stops evaluating ``round`` (it is leaving, or failed): the checkpoint is queued again, in order."""
        lease = self.leases.get(round)
        if lease is not None and lease.worker == worker:
            del self.leases[round]
            self.waiting.append((round, lease.checkpoint))
            self.waiting.sort(key=lambda job: job[0])
            self._changed.set()
            log.info("evaluating volunteer %s gave the checkpoint of round %d back; queued again", worker, round)

    def renew(self, worker: str, round: int, now: float, lease_seconds: float = LEASE_SECONDS) -> bool:
        """``worker`` is still evaluating ``round``: its lease runs for another ``lease_seconds``."""
        lease = self.leases.get(round)
        if lease is None or lease.worker != worker:
            return False
        lease.deadline = max(lease.deadline, now + lease_seconds)
        return True

    def finish(self, worker: str, round: int, result: dict[str, Any]) -> str | None:
        """Record ``worker``'s result for ``round``; why not, if it is refused. A failure (or a refused result) of a
        volunteer queues the checkpoint again for the next one, until ``ATTEMPTS`` have failed: that is recorded."""
        lease = self.leases.get(round)
        if lease is None or lease.worker != worker:
            return f"round {round} is not leased to this worker (its lease expired, or it was never taken)"
        why = None if "error" in result else check_result(result, round, self.sources, self.tasks)
        if why is not None or "error" in result:
            problem = why or str(result["error"])
            self.failures.setdefault(round, []).append(f"{worker}: {problem}"[:STDERR_TAIL])
            if worker != LOCAL and len(self.failures[round]) < ATTEMPTS:
                log.warning("evaluation of the checkpoint of round %d by %s failed (%s); queued for another attempt", round, worker, problem)
                self.give_back(worker, round)
                return why
            result = {"error": " | ".join(self.failures.pop(round))}
        del self.leases[round]
        self._changed.set()
        if worker in self.workers:
            self.workers[worker].evaluated += 1
        if "error" in result:
            log.warning("evaluation of the checkpoint of round %d failed: %s", round, result["error"])
        else:
            if worker != LOCAL:  # the worker's copy is on its machine: keep one beside the published checkpoint
                save(lease.checkpoint, result)
            log.info("checkpoint of round %d evaluated in %.1f s (%s): perplexity %s; accuracy %s", round, result.get("seconds", 0), worker,
                     {k: round_(v) for k, v in result.get("perplexity", {}).items()},
                     {k: round_(v.get("acc")) for k, v in result.get("accuracy", {}).items()})
        self.on_result(round, result)
        return why

    def register(self, worker_id: str, name: str, device: str, now: float) -> Worker:
        """A worker that asks for work: known by the id it was given, else new."""
        for idle in [w for w in self.workers.values() if now - w.last_seen > WORKER_IDLE_SECONDS]:
            del self.workers[idle.worker_id]
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = Worker(uuid.uuid4().hex[:12], name, device, now)
            self.workers[worker.worker_id] = worker
            log.info("evaluating volunteer %s joined (%s, %s)", worker.worker_id, name or "unnamed", device)
        worker.last_seen = now
        return worker

    def status(self) -> dict[str, Any]:
        return {"pending": self.pending(), "evaluating": sorted(self.leases), "workers": [w.as_json(self.leases) for w in self.workers.values()]}

    async def drain(self) -> None:
        """Return once every queued checkpoint is evaluated."""
        while self.pending():
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 5.0)
            except asyncio.TimeoutError:
                self.expire(time.time())

    # ------------------------------------------------------------ the coordinator's own child process

    async def _work(self) -> None:
        while True:
            job = self.take(LOCAL, time.time(), math.inf)
            if job is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            round, checkpoint = job
            try:
                result = await self._evaluate(checkpoint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one bad checkpoint stop the evaluation of the next
                result = {"error": f"{type(exc).__name__}: {exc}"}
            why = self.finish(LOCAL, round, result)
            if why is not None:  # a result of its own that cannot be recorded (finish recorded the refusal instead)
                log.warning("the evaluation of round %d gave a result that cannot be recorded: %s", round, why)

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
