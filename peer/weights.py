"""Where a stage's weights come from and where they go: live replicas, the latest checkpoint, the coordinator.

A replica is preferred: it holds the current round's weights and optimizer state (and the
agreed anchor under cocktail sync), so the newcomer's next step equals its group's; what it
loads is checked against the sha256 the replica sent with it. The published checkpoint (HTTP,
signed manifest, sha256 per file, only this stage's shard) is the fallback when no replica
answers; the state comes in parts checked by hash (``state_transfer``). A download that fails is retried with backoff, saying what to check. At PUBLISH, one
replica per stage uploads the agreed weights to the coordinator.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
import urllib.request
from typing import Any, Callable

import torch
from hivemind.p2p import PeerID
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from proto import codec
from proto import hometrain_pb2 as pb
from proto.codec import WireKind
from proto.manifest import (ADAPTER_FILE, INDEX, MANIFEST, ManifestError, checkpoint_name, optimizer_shard_name, sha256_bytes, stage_name,
                            parse_manifest, verify_file, verify_manifest)

from .control_client import ControlClient, Stopped
from .optimizer import STATE_PREFIX, optimizer_state_name, state_key
from .replica_sync import StageSync
from .stage_runtime import StageRuntime
from .state_transfer import StateServer, TooOld, fetch_state
from .transport import FrameTransport, Tensors

log = logging.getLogger(__name__)

REPLICA_PASSES = 3          # passes over the stage's replicas for their state before falling back to the checkpoint
REPLICA_RETRY_SECONDS = 2.0
DOWNLOAD_BACKOFF_MAX = 30.0
UPLOAD_CHUNK = 1 << 20
METADATA_LIMIT = 64 << 20   # bytes: a checkpoint's manifest or index


class CannotStart(RuntimeError):
    """This peer cannot take part (no weights to load, a port in use); the message says what to do."""


def _get(url: str, timeout: float = 60.0, progress: Callable[[int, int], None] | None = None, limit: int = METADATA_LIMIT) -> bytes:
    """Download ``url``; ManifestError past ``limit`` bytes (a server cannot make the peer hold more than it expects)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            if total > limit:
                raise ManifestError(f"{url} is {total} bytes, more than the {limit} this peer expects of it: refused")
            chunks, received = [], 0
            while block := response.read(1 << 20):
                chunks.append(block)
                received += len(block)
                if received > limit:
                    raise ManifestError(f"{url} sent more than the {limit} bytes this peer expects of it: refused")
                if progress:
                    progress(received, total)
            return b"".join(chunks)
    except OSError as exc:
        raise ConnectionError(f"cannot download {url}: {exc}") from exc


def shard_limit(numel: int) -> int:
    """The most a checkpoint shard of ``numel`` parameters may hold: fp32 weights, or their optimizer state (two
    fp32 moments and a step each), plus the header."""
    return 3 * 4 * numel + METADATA_LIMIT


def check_identity(manifest: dict[str, Any], run_id: str, round: int | None) -> None:
    """A validly signed manifest of another run or round is refused too: the coordinator's key signs every run it serves."""
    if run_id and manifest.get("run") != run_id:
        raise ManifestError(f"the checkpoint's manifest is of run {manifest.get('run')!r}, not this run's {run_id!r}: refused")
    if round is not None and manifest.get("round") != round:
        raise ManifestError(f"the checkpoint's manifest is of round {manifest.get('round')!r}, not the {round} the coordinator "
                            "announced: refused")


def fetch_checkpoint_tensors(
    base_url: str, names: set[str], public_key_hex: str, progress: Callable[[str, int, int], None] | None = None,
    optimizer_shard: str = "", expect: tuple[str, int | None] = ("", None), limit: int = 1 << 40,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, int]:
    """Download only the shards holding ``names`` from a checkpoint URL (and ``optimizer_shard``, if the checkpoint
    has it); verify everything. Returns the tensors, the optimizer's scalars (None without its shard) and the
    checkpoint's round. Raises ManifestError on a bad signature, a hash mismatch or a missing tensor.
    """
    manifest = parse_manifest(_get(base_url + MANIFEST))
    verify_manifest(manifest, public_key_hex)
    check_identity(manifest, *expect)
    index_bytes = _get(base_url + INDEX)
    verify_file(INDEX, index_bytes, manifest)
    weight_map: dict[str, str] = json.loads(index_bytes)["weight_map"]
    missing = sorted(names - set(weight_map))
    if missing:
        raise ManifestError(f"checkpoint of round {manifest.get('round')} lacks {len(missing)} tensors of this stage, e.g. {missing[:3]}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted({weight_map[n] for n in names}):
        data = _get(base_url + shard, progress=(lambda got, total, s=shard: progress(s, got, total)) if progress else None, limit=limit)
        verify_file(shard, data, manifest)
        loaded = load_safetensors(data)
        tensors.update({k: v for k, v in loaded.items() if k in names})
    extras = None
    if optimizer_shard and optimizer_shard in manifest.get("files", {}):
        data = _get(base_url + optimizer_shard, progress=(lambda got, total: progress(optimizer_shard, got, total)) if progress else None,
                    limit=limit)
        verify_file(optimizer_shard, data, manifest)
        tensors.update(load_safetensors(data))
        extras = {"steps": json.loads(_safetensors_metadata(data).get("steps", "{}"))}
    return tensors, extras, int(manifest["round"])


def fetch_adapter_tensors(
    base_url: str, names: set[str], public_key_hex: str, progress: Callable[[str, int, int], None] | None = None,
    optimizer_shard: str = "", expect: tuple[str, int | None] = ("", None), limit: int = 1 << 40,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, int]:
    """LoRA runs: the stage's adapters (``names``, as the stage names them) from an adapter checkpoint, verified."""
    manifest = parse_manifest(_get(base_url + MANIFEST))
    verify_manifest(manifest, public_key_hex)
    check_identity(manifest, *expect)
    data = _get(base_url + ADAPTER_FILE, progress=(lambda got, total: progress(ADAPTER_FILE, got, total)) if progress else None, limit=limit)
    verify_file(ADAPTER_FILE, data, manifest)
    adapters = {stage_name(k): v for k, v in load_safetensors(data).items()}
    missing = sorted(names - set(adapters))
    if missing:
        raise ManifestError(f"adapter checkpoint of round {manifest.get('round')} lacks {len(missing)} adapters of this stage, e.g. {missing[:3]}")
    tensors = {k: v for k, v in adapters.items() if k in names}
    extras = None
    if optimizer_shard and optimizer_shard in manifest.get("files", {}):
        data = _get(base_url + optimizer_shard, limit=limit)
        verify_file(optimizer_shard, data, manifest)
        for name, value in load_safetensors(data).items():  # optim.<peft name>.<key> -> optim.<stage name>.<key>
            param, key = state_key(name)
            tensors[optimizer_state_name(stage_name(param), key)] = value
        steps = json.loads(_safetensors_metadata(data).get("steps", "{}"))
        extras = {"steps": {stage_name(k): v for k, v in steps.items()}}
    return tensors, extras, int(manifest["round"])


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory (its JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {}) or {}


def matching_optimizer_state(names: set[str], tensors: dict[str, torch.Tensor], extras: dict[str, Any] | None
                             ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A checkpoint's optimizer shard is of the stage as it was then; if the layer ranges have changed since (the
    coordinator restarted with other --stages or memory settings), it does not cover this stage: drop it, and the
    optimizer starts fresh on the checkpoint's weights."""
    if extras is None:
        return tensors, extras
    covered = {state_key(k)[0] for k in tensors if k.startswith(STATE_PREFIX)}
    if covered == names:
        return tensors, extras
    weights_only = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
    if not covered:  # written before the stage's first step: there is no state to resume
        return weights_only, None
    log.warning("the checkpoint's optimizer state is of other layer ranges than this stage's (the stages changed since it "
                "was written): the optimizer starts fresh on its weights")
    return weights_only, None


# ------------------------------------------------------------ a stage's whole state, as it travels (compute thread)

def export_stage(runtime: StageRuntime, sync: StageSync) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The agreed weights, the optimizer state and the sync's own state, with the checksum a receiver checks."""
    tensors, extras = runtime.export_state(sync.agreed_weights())
    extras["checksum"] = sync.checksum()
    return tensors | sync.state(), extras


def import_stage(runtime: StageRuntime, sync: StageSync, tensors: dict[str, torch.Tensor], extras: dict[str, Any] | None,
                 next_round: int) -> str:
    """Load what ``export_stage`` (or a checkpoint: weights only) gave; returns the checksum of what was loaded."""
    runtime.import_state(tensors, extras, next_round, also=tuple(sync.state_names))
    sync.adopt({k: v for k, v in tensors.items() if k in sync.state_names}, next_round)
    return sync.checksum()


class StageWeights:
    """Loads a stage's weights (replica first, then checkpoint), serves them to joiners, uploads them to publish."""

    def __init__(self, transport: FrameTransport, run_id: str, public_key: str, stopping: asyncio.Event,
                 connect_timeout: float, show_progress: bool, num_stages: int, seed: int, base_url: str = "") -> None:
        self.num_stages = num_stages
        self.base_url = base_url  # LoRA runs: the round-0 checkpoint, the frozen base
        self.seed = seed
        self.transport = transport
        self.run_id = run_id
        self.public_key = public_key
        self.stopping = stopping
        self.connect_timeout = connect_timeout
        self.show_progress = show_progress
        self.state_server: StateServer | None = None

    async def serve(self, current: Callable[[], tuple[int, StageRuntime, StageSync]]) -> None:
        """Answer joiners' state requests with whatever stage ``current()`` names when they ask."""

        def held() -> tuple[int, int]:
            stage, runtime, _ = current()
            return stage, runtime.next_round

        async def export() -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
            _, runtime, sync = current()
            async with runtime.state_lock:  # never mid-step: the copy is of one round
                tensors, extras = await runtime.run(export_stage, runtime, sync)
                return runtime.next_round, tensors, extras

        self.state_server = StateServer(self.transport, self.run_id, held, export)
        await self.state_server.start()

    async def load(self, stage: int, runtime: StageRuntime, sync: StageSync, sources: Callable[[], Any],
                   checkpoint: Callable[[], tuple[str, int]]) -> None:
        """Current weights from a live replica of the stage, else from the latest checkpoint, else (none published
        yet) from the run's seed, built here.

        ``sources()`` gives the replicas to try (awaitable); ``checkpoint()`` the latest (url, round; "" for none)."""
        # Refuse new microbatches and let those in flight finish: their backward needs the old weights.
        runtime.next_round = 0
        if not runtime.base_loaded:  # LoRA: the frozen base first; replicas and checkpoints only hold adapters
            await self.load_base(stage, runtime, self.base_url)
        deadline = time.monotonic() + sync.train.sync_timeout
        while runtime.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # A replica may be busy loading too, or just gone with its record not yet expired: a few passes
        # before the checkpoint, since weights older than the stage's send this peer straight back here.
        for attempt in range(REPLICA_PASSES):
            replicas = await sources()
            if not replicas:
                break
            for replica in replicas:
                if await self._from_replica(stage, runtime, sync, replica, checkpoint()[1]):
                    return
            if attempt + 1 < REPLICA_PASSES:
                await asyncio.sleep(REPLICA_RETRY_SECONDS)
        if not checkpoint()[0] or (runtime.lora and checkpoint()[1] == 0):
            await runtime.run(self._from_seed, runtime, sync)
            log.info("built stage %d %s from the run's seed (no checkpoint of them is published yet)", stage,
                     "adapters" if runtime.lora else "weights")
            return
        await self._from_checkpoint(stage, runtime, sync, checkpoint)

    def _from_seed(self, runtime: StageRuntime, sync: StageSync) -> None:
        runtime.initialise(self.seed)
        sync.adopt({}, runtime.next_round)

    async def _from_replica(self, stage: int, runtime: StageRuntime, sync: StageSync, replica: str, checkpoint_round: int) -> bool:
        bar = tqdm(unit="B", unit_scale=True, desc=f"stage {stage} state from {replica[-8:]}", leave=False,
                   disable=not self.show_progress or not sys.stderr.isatty())

        def progress(got: int, total: int) -> None:
            bar.total = total
            bar.update(got - bar.n)

        try:
            state = await fetch_state(self.transport, replica, self.run_id, stage, at_least=checkpoint_round, progress=progress)
            got = await runtime.run(import_stage, runtime, sync, state.tensors, state.extras, state.next_round)
            if got != state.extras.get("checksum"):
                runtime.next_round = 0  # not usable: the next source (or the checkpoint) replaces it
                raise codec.FrameError(f"state checksum {got[:12]} does not match the {str(state.extras.get('checksum'))[:12]} the replica sent")
            log.info("loaded stage %d weights and optimizer state of round %d from replica %s", stage, state.next_round - 1, replica[-8:])
            return True
        except TooOld as exc:
            log.info("replica %s: %s (the checkpoint's); trying the next source", replica[-8:], exc)
            return False
        except Exception as exc:
            log.warning("replica %s could not give its state (%s); trying the next source", replica[-8:], exc)
            return False
        finally:
            bar.close()

    async def _from_checkpoint(self, stage: int, runtime: StageRuntime, sync: StageSync, checkpoint: Callable[[], tuple[str, int]]) -> None:
        weights = runtime.weights()
        names, limit = set(weights), shard_limit(sum(t.numel() for t in weights.values()))
        reader = fetch_adapter_tensors if runtime.lora else fetch_checkpoint_tensors  # LoRA: adapters, named as peft names them
        announced: dict[str, int] = {}

        def fetch(url: str, progress):
            return reader(url, names, self.public_key, progress, optimizer_shard_name(stage, self.num_stages),
                          expect=(self.run_id, announced.get(url)), limit=limit)

        def current() -> str:
            url, round = checkpoint()
            announced[url] = round
            return url

        (tensors, extras, round), url = await self._download(stage, current, fetch)
        tensors, extras = matching_optimizer_state(names, tensors, extras)
        await runtime.run(import_stage, runtime, sync, tensors, extras, round + 1)
        what = "weights and optimizer state" if extras is not None else "weights"
        log.info("loaded stage %d %s from the checkpoint of round %d (%s)", stage, "adapters" if runtime.lora else what, round, url)

    async def load_base(self, stage: int, runtime: StageRuntime, url: str) -> None:
        """LoRA: the frozen base of the stage, from the run's round-0 checkpoint, then adapters on it."""
        (tensors, _, round), _ = await self._download(stage, lambda: url, lambda u, progress: fetch_checkpoint_tensors(
            u, set(runtime.base_names), self.public_key, progress, expect=(self.run_id, 0)))
        try:
            await runtime.run(runtime.load_base, tensors, self.seed)
        except Exception as exc:
            if runtime.train.lora_base_bits == 32:
                raise
            raise CannotStart(f"bitsandbytes could not hold the frozen base in {runtime.train.lora_base_bits} bits on {runtime.device} "
                              f"({type(exc).__name__}: {exc}); the organiser's --lora-base-bits 32 runs on any device") from exc
        log.info("loaded stage %d's frozen base from the checkpoint of round %d; %d adapter parameters train", stage, round,
                 sum(p.numel() for _, p in runtime.trainable()))

    async def _download(self, stage: int, url: Callable[[], str], fetch) -> tuple[Any, str]:
        """``fetch(url, progress)`` in a worker thread, retried with backoff until --connect-timeout; says what to check."""
        bars: dict[str, tqdm] = {}

        def progress(shard: str, got: int, total: int) -> None:
            bar = bars.get(shard)
            if bar is None:
                bar = bars[shard] = tqdm(total=total or None, unit="B", unit_scale=True, desc=f"stage {stage} {shard}",
                                         disable=not self.show_progress or not sys.stderr.isatty(), leave=False)
            bar.update(got - bar.n)

        delay, give_up = 1.0, time.monotonic() + self.connect_timeout
        while True:
            current = url()
            try:
                return await asyncio.get_running_loop().run_in_executor(None, fetch, current, progress), current
            except ConnectionError as exc:
                left = give_up - time.monotonic()
                advice = (f"no live replica of stage {stage} gave its state, and the checkpoint download failed ({exc}). "
                          f"Check that this machine can reach the coordinator's HTTP port at {current} (a firewall?); "
                          "an organiser whose machine is behind NAT or a container network starts it with --announce-host ADDRESS")
                if left < delay:
                    raise CannotStart(f"giving up after --connect-timeout {self.connect_timeout:.0f}s: {advice}") from None
                log.warning("%s. Retrying in %.0fs (for another %.0fs, --connect-timeout; Ctrl-C stops)", advice, delay, left)
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                    raise Stopped()
                except asyncio.TimeoutError:
                    pass
                delay = min(2 * delay, DOWNLOAD_BACKOFF_MAX)
            finally:
                for bar in bars.values():
                    bar.close()
                bars.clear()

    async def upload(self, client: ControlClient, peer_id: str, round: int, stage: int, runtime: StageRuntime, sync: StageSync) -> None:
        """PUBLISH: send the stage's agreed weights, then its optimizer state (safetensors, streamed in chunks)."""

        def serialise() -> list[tuple[str, bytes]]:
            named = checkpoint_name if runtime.lora else (lambda k: k)  # LoRA: adapters as peft names them
            weights = save_safetensors({named(k): v.detach().cpu().clone() for k, v in sync.agreed_weights().items()})
            moments, steps = runtime.optimizer.state_tensors()  # (empty before the first step: sent all the same)
            moments = {optimizer_state_name(named(param), key): v for (param, key), v in ((state_key(k), v) for k, v in moments.items())}
            optimizer = save_safetensors(moments, metadata={"steps": json.dumps({named(k): v for k, v in steps.items()})})
            return [("weights", weights), ("optimizer", optimizer)]

        async with runtime.state_lock:
            parts = await runtime.run(serialise)
        for part, payload in parts:
            digest = sha256_bytes(payload)

            async def chunks(payload=payload, digest=digest, part=part):
                for offset in range(0, max(len(payload), 1), UPLOAD_CHUNK):
                    chunk = pb.CheckpointChunk(data=payload[offset : offset + UPLOAD_CHUNK])
                    if offset == 0:
                        chunk.peer_id, chunk.round, chunk.stage, chunk.sha256, chunk.total_bytes = peer_id, round, stage, digest, len(payload)
                        chunk.part = part
                    yield chunk

            reply = await client.upload_checkpoint(chunks(), len(payload))
            if not reply.accepted:
                log.warning("checkpoint upload (%s) for round %d refused: %s", part, round, reply.message)
                return


def state_sources(stage_peers: list[pb.StagePeer], my_id: str, current_round: int, checkpoint_round: int,
                  found: dict[str, Any]) -> list[str]:
    """Replicas to copy the stage's state from: those the coordinator says are at the current round first, then
    the rest it knows, then any the DHT shows (``found``; each group shuffled). Those it knows to be no newer
    than the checkpoint are left out: their state would be refused after the whole transfer."""
    known = [p for p in stage_peers if p.dht_peer_id != my_id]
    current = [p.dht_peer_id for p in known if p.next_round == current_round]
    behind = [p.dht_peer_id for p in known if p.next_round != current_round and p.next_round > checkpoint_round]
    rest = [p for p in found if p != my_id and p not in {k.dht_peer_id for k in known}]
    for group in (current, behind, rest):
        random.shuffle(group)
    return current + behind + rest
