"""What a peer tells its volunteer: Prometheus /metrics (``peer join --metrics-port``) and the live status line.

Both read a ``PeerSnapshot`` the node hands them; neither knows the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from proto import PACKAGE_VERSION, PROTOCOL_VERSION
from proto.console import human_bytes

from .transport import WireCounters


@dataclass(frozen=True)
class PeerSnapshot:
    """The figures a peer reports about itself, as of now."""

    stage: int
    round: int                  # the round the coordinator last announced
    microbatches_done: int      # forward and backward finished on this stage
    microbatches_failed: int    # this stage's own work raised
    throughput: float           # samples per compute-second of this stage
    counters: WireCounters
    frames_rejected: int        # data-plane frames from other peers dropped as malformed
    records_rejected: int       # DHT records dropped as malformed
    peers_in_stage: int = 0
    non_members_refused: int = 0  # data-plane calls from libp2p peers outside the run's member set


class _SnapshotCollector:
    def __init__(self, snapshot: Callable[[], PeerSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        yield InfoMetricFamily("hometrain_build", "Build of this process.", value={"version": PACKAGE_VERSION, "protocol": str(PROTOCOL_VERSION), "role": "peer"})
        yield GaugeMetricFamily("hometrain_peer_stage", "Pipeline stage this peer holds.", value=s.stage)
        yield GaugeMetricFamily("hometrain_peer_round", "Round the coordinator last announced.", value=s.round)
        yield CounterMetricFamily("hometrain_peer_microbatches", "Microbatches this peer's stage finished (forward and backward).", value=s.microbatches_done)
        yield CounterMetricFamily("hometrain_peer_microbatch_failures", "Microbatches on which this peer's own stage work raised.", value=s.microbatches_failed)
        yield GaugeMetricFamily("hometrain_peer_throughput_samples_per_second", "Measured samples per second of this stage.", value=s.throughput)
        wire = CounterMetricFamily("hometrain_wire_bytes", "Bytes on the wire by kind and direction.", labels=["kind", "direction"])
        raw = CounterMetricFamily("hometrain_wire_uncompressed_bytes", "What the same traffic costs uncompressed (fp32).", labels=["kind", "direction"])
        c = s.counters
        for direction, actual, plain in (("sent", c.sent, c.uncompressed_sent), ("received", c.received, c.uncompressed_received)):
            for kind, n in sorted(dict(actual).items()):
                wire.add_metric([kind, direction], n)
            for kind, n in sorted(dict(plain).items()):
                raw.add_metric([kind, direction], n)
        yield wire
        yield raw
        yield CounterMetricFamily("hometrain_frames_rejected", "Frames from other peers dropped as malformed.", value=s.frames_rejected)
        yield CounterMetricFamily("hometrain_dht_records_rejected", "DHT stage records dropped as malformed.", value=s.records_rejected)
        yield CounterMetricFamily("hometrain_non_members_refused", "Data-plane calls refused: the caller is not a member of the run.",
                                  value=s.non_members_refused)


class PeerMetrics:
    """A registry reading snapshots, served on its own port."""

    def __init__(self, snapshot: Callable[[], PeerSnapshot]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(snapshot))
        self._server = None

    def start(self, port: int) -> None:
        self._server, _ = start_http_server(port, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def status_line(s: PeerSnapshot, microbatches_per_second: float) -> str:
    """The volunteer's live line: what this peer is doing."""
    c = s.counters
    failed = f" | {s.microbatches_failed} failed here" if s.microbatches_failed else ""
    return (f"round {s.round} | stage {s.stage} | {microbatches_per_second:.2f} microbatches/s | up {human_bytes(sum(c.sent.values()))} "
            f"down {human_bytes(sum(c.received.values()))} | {s.peers_in_stage} peer(s) in stage{failed}")
