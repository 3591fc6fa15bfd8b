"""`peer join --role eval`: lend this machine to judging the run's checkpoints instead of training.

The worker asks the coordinator for a published checkpoint (``NextEvaluation``), downloads it
over HTTP with every file checked against the signed manifest (the optimizer state is left
out: evaluation never reads it), downloads the run's held-out split (and the organiser's own
multiple-choice tasks), runs `coordinator eval` on them with the run's evaluation options on
this machine's device, and sends the result back (``ReportEvaluation``). Then the next one.
It holds no stage and starts no DHT node: it needs only the control plane and HTTP. Ctrl-C
gives the checkpoint it holds back to the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import grpc

from proto import PROTOCOL_VERSION
from proto import hometrain_pb2 as pb
from proto.addresses import reachable_url
from proto.manifest import MANIFEST, ManifestError, is_optimizer_shard, parse_manifest, verify_manifest
from proto.run_config import TASK_NAME, EvalOptions, PeerConfig

from .control_client import ControlClient, Stopped
from .coordinator_key import UntrustedCoordinator, trust_coordinator_key
from .device import DeviceInfo
from .transport import WireCounters

log = logging.getLogger(__name__)

OUTPUT_TAIL = 2000  # characters of a failed `coordinator eval`'s output sent back


class EvalError(RuntimeError):
    """This checkpoint could not be evaluated here; the message goes to the coordinator."""


def download(url: str, target: Path, sha256: str | None = None, timeout: float = 60.0) -> None:
    """Stream ``url`` to ``target`` (never whole in memory: a GPT-J-6B shard is gigabytes), checking its sha256."""
    tmp = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as out:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
    except OSError as exc:
        raise EvalError(f"cannot download {url}: {exc}") from exc
    if sha256 is not None and digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise EvalError(f"{url}: sha256 {digest.hexdigest()[:16]}... does not match the signed manifest's {sha256[:16]}...")
    tmp.replace(target)


def _safe_name(name: str, what: str) -> str:
    if "/" in name or "\\" in name or name.startswith(".") or not name:
        raise EvalError(f"refusing {what} {name!r}: not a plain file name")
    return name


def fetch_checkpoint(url: str, directory: Path, public_key: str, round: int) -> None:
    """The checkpoint at ``url`` (ending in /) into ``directory``: manifest verified, every model file checked."""
    directory.mkdir(parents=True, exist_ok=True)
    download(url + MANIFEST, directory / MANIFEST)
    try:
        manifest = parse_manifest((directory / MANIFEST).read_bytes())
        verify_manifest(manifest, public_key)
    except ManifestError as exc:
        raise EvalError(f"the checkpoint at {url} is not signed by this run's coordinator: {exc}") from None
    if manifest.get("round") != round:
        raise EvalError(f"the checkpoint at {url} is of round {manifest.get('round')}, the job was round {round}")
    for name, sha256 in sorted(manifest.get("files", {}).items()):
        if not is_optimizer_shard(_safe_name(name, "checkpoint file")):
            download(url + name, directory / name, sha256)


def fetch_heldout(url: str, directory: Path, tasks: tuple[str, ...]) -> tuple[str, ...]:
    """The held-out split (and the organiser's tasks) into ``directory``; the tasks as NAME=PATH of the copies here."""
    directory.mkdir(parents=True, exist_ok=True)
    download(url + "split.json", directory / "split.json")
    meta = json.loads((directory / "split.json").read_text())
    for source in meta.get("sources", {}):
        name = _safe_name(meta.get("files", {}).get(source, f"{source}.jsonl"), "held-out file")
        download(url + urllib.parse.quote(name), directory / name)
    local = []
    for spec in tasks:
        name = spec.partition("=")[0]
        if not TASK_NAME.fullmatch(name):
            raise EvalError(f"refusing the task name {name!r}")
        (directory / "tasks").mkdir(exist_ok=True)
        download(f"{url}tasks/{name}.jsonl", directory / "tasks" / f"{name}.jsonl")
        local.append(f"{name}={directory / 'tasks' / f'{name}.jsonl'}")
    return tuple(local)


def device_flag(device: DeviceInfo) -> str:
    """``coordinator eval --device`` for this peer's device."""
    return str(device.device) if device.device.type == "cuda" else "cpu"


class EvalWorker:
    """The loop of an evaluating volunteer: ask, download, evaluate, report."""

    def __init__(self, config: PeerConfig, device: DeviceInfo) -> None:
        self.config = config
        self.device = device
        self.coordinator_host = config.coordinator_host
        self.work_dir = Path(config.state_dir) / "eval" if config.state_dir else Path(tempfile.mkdtemp(prefix="hometrain-eval-"))
        self.stopping: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.evaluated = 0

    def stop(self) -> None:
        """From a signal handler: stop after giving back the checkpoint being evaluated."""
        if self.loop is not None and self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)

    def run(self) -> int:
        return asyncio.run(self._run())

    async def _run(self) -> int:
        self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
        client = ControlClient(self.config.coordinator, WireCounters(), self.stopping, tls_ca=self.config.tls_ca, tls=self.config.tls)
        worker_id = ""
        try:
            while not self.stopping.is_set():
                job = await client.next_evaluation(pb.EvalJobRequest(
                    protocol_version=PROTOCOL_VERSION, join_token=self.config.join_token, name=self.config.name,
                    device=self.device.description, worker_id=worker_id), retry_for=self.config.connect_timeout)
                if not worker_id:
                    trust_coordinator_key(job.checkpoint_public_key, self.config.coordinator, self.config.coordinator_key, self.config.state_dir)
                    log.info("evaluating checkpoints for the run at %s as %s (on %s)", self.config.coordinator, job.worker_id,
                             self.device.description)
                worker_id = job.worker_id
                if job.credential:  # a new worker's: every later request carries it
                    client.credential = job.credential
                if not job.has_job:
                    try:
                        await asyncio.wait_for(self.stopping.wait(), job.retry_after or 10.0)
                    except asyncio.TimeoutError:
                        pass
                    continue
                try:
                    await self._evaluate(client, job)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    log.warning("the coordinator no longer knows this worker (it restarted): asking for a job again")
                    worker_id, client.credential = "", ""
        except Stopped:
            pass
        except grpc.aio.AioRpcError as exc:
            print(f"peer: the coordinator refused: {exc.details() or exc.code().name}", file=sys.stderr)
            return 2
        except UntrustedCoordinator as exc:
            print(f"peer: {exc}", file=sys.stderr)
            return 2
        finally:
            await client.close()
        log.info("stopped after evaluating %d checkpoint(s)", self.evaluated)
        return 0

    async def _evaluate(self, client: ControlClient, job: pb.EvalJob) -> None:
        report = pb.EvalReport(join_token=self.config.join_token, worker_id=job.worker_id, round=job.round)
        checkpoint = self.work_dir / f"round-{job.round:06d}"
        log.info("evaluating the checkpoint of round %d (%s)", job.round, job.checkpoint_url)
        work = asyncio.ensure_future(self._download_and_evaluate(job, checkpoint))
        stopped = asyncio.ensure_future(self.stopping.wait())
        renew_every = max(10.0, (job.lease_seconds or 1800.0) / 4)
        try:
            while not (work.done() or stopped.done()):  # a GPT-J-6B download alone can outlast a lease: renew it
                await asyncio.wait({work, stopped}, timeout=renew_every, return_when=asyncio.FIRST_COMPLETED)
                if not (work.done() or stopped.done()):
                    renewed = await client.report_evaluation(pb.EvalReport(join_token=self.config.join_token, worker_id=job.worker_id,
                                                                           round=job.round, renew=True), retry_for=60)
                    if not renewed.accepted:
                        log.warning("the coordinator took the checkpoint of round %d back (%s); dropping it", job.round, renewed.message)
                        work.cancel()
                        return
            if not work.done():  # Ctrl-C: an empty report gives the checkpoint back to the queue
                work.cancel()
                log.info("giving the checkpoint of round %d back to the coordinator", job.round)
                try:  # straight to the stub: the client's calls give up at once once stopping is set
                    await client.stub.ReportEvaluation(report, timeout=5)
                except grpc.aio.AioRpcError as exc:
                    log.warning("could not give the checkpoint back (%s); it goes to another volunteer when its lease ends", exc.code().name)
                return
            try:
                report.result_json = work.result()
            except EvalError as exc:
                report.error = str(exc)[-OUTPUT_TAIL:]
            ack = await client.report_evaluation(report, retry_for=self.config.connect_timeout)
            if report.error:
                log.warning("the checkpoint of round %d could not be evaluated here: %s", job.round, report.error)
            elif ack.accepted:
                self.evaluated += 1
                log.info("checkpoint of round %d evaluated and reported", job.round)
            else:
                log.warning("the coordinator refused the evaluation of round %d: %s", job.round, ack.message)
        finally:
            stopped.cancel()
            shutil.rmtree(checkpoint, ignore_errors=True)  # gigabytes for GPT-J-6B: kept only while in use

    async def _download_and_evaluate(self, job: pb.EvalJob, checkpoint: Path) -> str:
        try:
            return await self._download_and_evaluate_unchecked(job, checkpoint)
        except (EvalError, asyncio.CancelledError):
            raise
        except Exception as exc:  # whatever it was, the coordinator hears of it and gives the checkpoint to another
            raise EvalError(f"{type(exc).__name__}: {exc}") from exc

    async def _download_and_evaluate_unchecked(self, job: pb.EvalJob, checkpoint: Path) -> str:
        options = json.loads(job.options_json or "{}")
        heldout = self.work_dir / "heldout"
        url, heldout_url = reachable_url(job.checkpoint_url, self.coordinator_host), reachable_url(job.heldout_url, self.coordinator_host)
        tasks = await asyncio.to_thread(fetch_heldout, heldout_url, heldout, tuple(options.get("tasks", ())))
        await asyncio.to_thread(fetch_checkpoint, url, checkpoint, job.checkpoint_public_key, job.round)
        names = {f.name for f in dataclasses.fields(EvalOptions)}
        local = EvalOptions(**{k: v for k, v in options.items() if k in names and k not in ("tasks", "heldout", "device")},
                            tasks=tasks, heldout=str(heldout), device=device_flag(self.device))
        # The published `coordinator eval` command, exactly as the organiser runs it by hand.
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator", "eval", str(checkpoint), "--json", *local.flags(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            stdout, stderr = await child.communicate()
        except asyncio.CancelledError:
            child.kill()
            raise
        if child.returncode != 0:
            raise EvalError(f"coordinator eval exited with status {child.returncode}: "
                            f"{stderr.decode(errors='replace').strip()[-OUTPUT_TAIL:] or 'no output'}")
        return stdout.decode()
