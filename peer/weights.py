"""Where a stage's weights come from and where they go: live replicas, the latest checkpoint, the coordinator.

A replica is preferred: it holds the current round's weights and optimizer state (and the
agreed anchor under cocktail sync), so the newcomer's next step equals its group's; what it
loads is checked against the sha256 the replica sent with it. The published checkpoint (HTTP,
signed manifest, sha256 per file, only this stage's shard) is the fallback when no replica
answers; a download that fails is retried with backoff, saying what to check. At PUBLISH, one
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
from proto.manifest import INDEX, MANIFEST, ManifestError, sha256_bytes, verify_file, verify_manifest

from .control_client import ControlClient, Stopped
from .replica_sync import StageSync
from .stage_runtime import StageRuntime
from .transport import FrameTransport, Tensors

log = logging.getLogger(__name__)

STATE_HANDLER = "hometrain.state"
REPLICA_PASSES = 3          # passes over the stage's replicas for their state before falling back to the checkpoint
REPLICA_RETRY_SECONDS = 2.0
STATE_TIMEOUT = 300.0
DOWNLOAD_BACKOFF_MAX = 30.0
UPLOAD_CHUNK = 1 << 20


class CannotStart(RuntimeError):
    """This peer cannot take part (no weights to load, a port in use); the message says what to do."""


def _get(url: str, timeout: float = 60.0, progress: Callable[[int, int], None] | None = None) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            chunks, received = [], 0
            while block := response.read(1 << 20):
                chunks.append(block)
                received += len(block)
                if progress:
                    progress(received, total)
            return b"".join(chunks)
    except OSError as exc:
        raise ConnectionError(f"cannot download {url}: {exc}") from exc


def fetch_checkpoint_tensors(
    base_url: str, names: set[str], public_key_hex: str, progress: Callable[[str, int, int], None] | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Download only the shards holding ``names`` from a checkpoint URL; verify everything.

    Returns the tensors and the checkpoint's round. Raises ManifestError on a bad signature,
    a hash mismatch or a missing tensor.
    """
    manifest = json.loads(_get(base_url + MANIFEST))
    verify_manifest(manifest, public_key_hex)
    index_bytes = _get(base_url + INDEX)
    verify_file(INDEX, index_bytes, manifest)
    weight_map: dict[str, str] = json.loads(index_bytes)["weight_map"]
    missing = sorted(names - set(weight_map))
    if missing:
        raise ManifestError(f"checkpoint of round {manifest.get('round')} lacks {len(missing)} tensors of this stage, e.g. {missing[:3]}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted({weight_map[n] for n in names}):
        data = _get(base_url + shard, progress=(lambda got, total, s=shard: progress(s, got, total)) if progress else None)
        verify_file(shard, data, manifest)
        loaded = load_safetensors(data)
        tensors.update({k: v for k, v in loaded.items() if k in names})
    return tensors, int(manifest["round"])


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
                 connect_timeout: float, show_progress: bool) -> None:
        self.transport = transport
        self.run_id = run_id
        self.public_key = public_key
        self.stopping = stopping
        self.connect_timeout = connect_timeout
        self.show_progress = show_progress
        self._current: Callable[[], tuple[int, StageRuntime, StageSync]] | None = None

    async def serve(self, current: Callable[[], tuple[int, StageRuntime, StageSync]]) -> None:
        """Answer joiners' state requests with whatever stage ``current()`` names when they ask."""
        self._current = current
        await self.transport.serve(STATE_HANDLER, self._serve_state, receive_kind=WireKind.CONTROL, send_kind=WireKind.STATE)

    async def _serve_state(self, header: pb.FrameHeader, tensors: Tensors, sender: PeerID) -> tuple[pb.FrameHeader, Tensors]:
        stage, runtime, sync = self._current()
        if header.kind != pb.STATE_REQUEST or header.run_id != self.run_id or header.stage != stage:
            raise codec.FrameError(f"this peer serves stage {stage} of run {self.run_id}; asked for stage {header.stage} of run {header.run_id!r}")
        if runtime.next_round == 0:
            raise codec.FrameError("this peer is still loading its own weights")
        async with runtime.state_lock:  # never mid-step: the copy is of one round
            state, extras = await runtime.run(export_stage, runtime, sync)
            next_round = runtime.next_round
        log.info("sent stage %d state of round %d to %s", stage, next_round - 1, sender.to_base58()[-8:])
        return pb.FrameHeader(kind=pb.STATE, run_id=self.run_id, stage=stage, round=next_round, json=json.dumps(extras)), state

    async def load(self, stage: int, runtime: StageRuntime, sync: StageSync, sources: Callable[[], Any],
                   checkpoint: Callable[[], tuple[str, int]]) -> None:
        """Current weights from a live replica of the stage, else from the latest checkpoint.

        ``sources()`` gives the replicas to try (awaitable); ``checkpoint()`` the latest (url, round)."""
        # Refuse new microbatches and let those in flight finish: their backward needs the old weights.
        runtime.next_round = 0
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
        await self._from_checkpoint(stage, runtime, sync, checkpoint)

    async def _from_replica(self, stage: int, runtime: StageRuntime, sync: StageSync, replica: str, checkpoint_round: int) -> bool:
        try:
            header, tensors = await self.transport.call(
                PeerID.from_base58(replica), STATE_HANDLER, pb.FrameHeader(kind=pb.STATE_REQUEST, run_id=self.run_id, stage=stage), {},
                WireKind.CONTROL, WireKind.STATE, timeout=STATE_TIMEOUT,
            )
            if header.round <= checkpoint_round:
                log.info("replica %s holds round %d, older than the checkpoint of round %d; trying the next source",
                         replica[-8:], header.round - 1, checkpoint_round)
                return False
            extras = json.loads(header.json or "{}")
            got = await runtime.run(import_stage, runtime, sync, tensors, extras, header.round)
            if got != extras.get("checksum"):
                runtime.next_round = 0  # not usable: the next source (or the checkpoint) replaces it
                raise codec.FrameError(f"state checksum {got[:12]} does not match the {str(extras.get('checksum'))[:12]} the replica sent")
            log.info("loaded stage %d weights and optimizer state of round %d from replica %s", stage, header.round - 1, replica[-8:])
            return True
        except Exception as exc:
            log.warning("replica %s could not give its state (%s); trying the next source", replica[-8:], exc)
            return False

    async def _from_checkpoint(self, stage: int, runtime: StageRuntime, sync: StageSync, checkpoint: Callable[[], tuple[str, int]]) -> None:
        names = set(runtime.weights())
        bars: dict[str, tqdm] = {}

        def progress(shard: str, got: int, total: int) -> None:
            bar = bars.get(shard)
            if bar is None:
                bar = bars[shard] = tqdm(total=total or None, unit="B", unit_scale=True, desc=f"stage {stage} weights {shard}",
                                         disable=not self.show_progress or not sys.stderr.isatty(), leave=False)
            bar.update(got - bar.n)

        delay, give_up = 1.0, time.monotonic() + self.connect_timeout
        while True:
            url = checkpoint()[0]
            try:
                tensors, round = await asyncio.get_running_loop().run_in_executor(None, fetch_checkpoint_tensors, url, names, self.public_key, progress)
                break
            except ConnectionError as exc:
                left = give_up - time.monotonic()
                advice = (f"no live replica of stage {stage} gave its state, and the checkpoint download failed ({exc}). "
                          f"Check that this machine can reach the coordinator's HTTP port at {url} (a firewall?); "
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
        await runtime.run(import_stage, runtime, sync, tensors, None, round + 1)
        log.info("loaded stage %d weights from the checkpoint of round %d (%s)", stage, round, url)

    async def upload(self, client: ControlClient, peer_id: str, round: int, stage: int, runtime: StageRuntime, sync: StageSync) -> None:
        """PUBLISH: send the stage's agreed weights (safetensors, streamed in chunks) to the coordinator."""

        def serialise() -> tuple[bytes, str]:
            payload = save_safetensors({k: v.detach().cpu().clone() for k, v in sync.agreed_weights().items()})
            return payload, sha256_bytes(payload)

        async with runtime.state_lock:
            payload, digest = await runtime.run(serialise)

        async def chunks():
            for offset in range(0, max(len(payload), 1), UPLOAD_CHUNK):
                chunk = pb.CheckpointChunk(data=payload[offset : offset + UPLOAD_CHUNK])
                if offset == 0:
                    chunk.peer_id, chunk.round, chunk.stage, chunk.sha256, chunk.total_bytes = peer_id, round, stage, digest, len(payload)
                yield chunk

        reply = await client.upload_checkpoint(chunks(), len(payload))
        if not reply.accepted:
            log.warning("checkpoint upload for round %d refused: %s", round, reply.message)


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
