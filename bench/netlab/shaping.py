"""Rate shaping of one direction of a host link with a tc tbf qdisc."""

from __future__ import annotations

from dataclasses import dataclass

from .commands import run, tool

# Ethernet header the qdisc counts on top of the IP packet.
_L2_OVERHEAD = 14


@dataclass(frozen=True)
class Shaping:
    """tbf parameters for one egress: rate, bucket (burst) and queue limit, all in bytes."""

    rate_bit: int
    burst_bytes: int
    limit_bytes: int

    @classmethod
    def for_rate(cls, rate_mbit: float, *, mtu: int, queue_ms: float) -> "Shaping":
        """Bucket just over two full packets (tbf drops packets larger than the bucket);
        queue of ``queue_ms`` at line rate (a home router's buffer), never under 4 packets."""
        rate_bit = int(rate_mbit * 1e6)
        frame = mtu + _L2_OVERHEAD
        burst = max(2 * frame, int(rate_bit / 8 * 0.001))
        limit = max(4 * frame, int(rate_bit / 8 * queue_ms / 1000.0)) + burst
        return cls(rate_bit, burst, limit)

    def tc_args(self) -> list[str]:
        return ["tbf", "rate", f"{self.rate_bit}bit", "burst", str(self.burst_bytes), "limit", str(self.limit_bytes)]


def shape(ns: str, dev: str, shaping: Shaping) -> None:
    """Replace the root qdisc of ``dev`` in namespace ``ns`` with the tbf in ``shaping``."""
    run([tool("tc"), "-n", ns, "qdisc", "replace", "dev", dev, "root", *shaping.tc_args()],
        what=f"shape {dev} in {ns} to {shaping.rate_bit / 1e6:g} Mbit/s")
