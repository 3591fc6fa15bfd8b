"""Prometheus /metrics of a peer (``peer join --metrics-port``): read at scrape time from the node."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from proto import PACKAGE_VERSION, PROTOCOL_VERSION

if TYPE_CHECKING:
    from .node import PeerNode


class _NodeCollector:
    def __init__(self, node: "PeerNode") -> None:
        self.node = node

    def collect(self):
        node = self.node
        yield InfoMetricFamily("hometrain_build", "Build of this process.", value={"version": PACKAGE_VERSION, "protocol": str(PROTOCOL_VERSION), "role": "peer"})
        yield GaugeMetricFamily("hometrain_peer_stage", "Pipeline stage this peer holds.", value=node.stage)
        yield GaugeMetricFamily("hometrain_peer_round", "Round the coordinator last announced.", value=node.current_round)
        yield CounterMetricFamily("hometrain_peer_microbatches", "Microbatches this peer's stage finished (forward and backward).", value=node.runtime.microbatches_done)
        yield GaugeMetricFamily("hometrain_peer_throughput_samples_per_second", "Measured samples per second of this stage.", value=node.throughput)
        wire = CounterMetricFamily("hometrain_wire_bytes", "Bytes on the wire by kind and direction.", labels=["kind", "direction"])
        raw = CounterMetricFamily("hometrain_wire_uncompressed_bytes", "What the same traffic costs uncompressed (fp32).", labels=["kind", "direction"])
        c = node.counters
        for direction, actual, plain in (("sent", c.sent, c.uncompressed_sent), ("received", c.received, c.uncompressed_received)):
            for kind, n in sorted(dict(actual).items()):
                wire.add_metric([kind, direction], n)
            for kind, n in sorted(dict(plain).items()):
                raw.add_metric([kind, direction], n)
        yield wire
        yield raw
        yield CounterMetricFamily("hometrain_frames_rejected", "Frames from other peers dropped as malformed.", value=node.transport.frames_rejected)


class PeerMetrics:
    """A registry with the node's collector, served on its own port."""

    def __init__(self, node: "PeerNode") -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_NodeCollector(node))
        self._server = None

    def start(self, port: int) -> None:
        self._server, _ = start_http_server(port, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
