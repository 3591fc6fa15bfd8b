"""Link profiles for emulated hosts: rates, latency and jitter from measured figures.

Latency convention (read this before comparing numbers):

* ``rtt_ms`` is the round-trip time measured between TWO hosts that both sit on
  this profile (e.g. ``oregon-tokyo``: a host in Oregon pinging a host in Tokyo
  sees 96 ms).
* Each host link therefore adds ``rtt_ms / 4`` one way (``Profile.one_way_ms``):
  a packet from A to B crosses A's link and B's link, so one way is
  ``rtt/4 + rtt/4 = rtt/2`` and the round trip is ``rtt``.
* Hosts on different profiles see ``rtt_a/2 + rtt_b/2``.

Rates are per host link in Mbit/s (10**6 bit/s, IP packets incl. headers as the
kernel's qdisc counts them): ``up_mbit`` shapes what the host sends,
``down_mbit`` what it receives. Throughput between A and B is bounded by
``min(A.up_mbit, B.down_mbit)``.

Jitter: a host link's one-way delay wanders within
``one_way_ms +- jitter_ms/2``, piecewise linearly between random targets drawn
every ``4 * jitter_ms`` (delay_router.JitterCurve). Slow enough that packets of a
flow are never reordered, and the mean delay under bulk load equals
``one_way_ms`` (independent per-packet draws would have to be clamped to keep
order, which biases busy flows towards the maximum).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """One host's internet link: rates both ways, round-trip time and jitter."""

    name: str
    down_mbit: float
    up_mbit: float
    rtt_ms: float
    jitter_ms: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        for field_name in ("down_mbit", "up_mbit"):
            value = getattr(self, field_name)
            if not value > 0:
                raise ValueError(
                    f"profile {self.name!r}: {field_name} must be > 0 Mbit/s, got {value!r}; "
                    "a link that carries nothing cannot be emulated")
        for field_name in ("rtt_ms", "jitter_ms"):
            value = getattr(self, field_name)
            if value < 0:
                raise ValueError(f"profile {self.name!r}: {field_name} must be >= 0 ms, got {value!r}")

    @property
    def one_way_ms(self) -> float:
        """Delay this host link adds to each packet, one way (rtt/4, see module doc)."""
        return self.rtt_ms / 4.0

    @property
    def asymmetric(self) -> bool:
        return self.down_mbit != self.up_mbit


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("lan", down_mbit=1000, up_mbit=1000, rtt_ms=1, jitter_ms=0,
                source="gigabit LAN, same building"),
        Profile("home", down_mbit=100, up_mbit=100, rtt_ms=20, jitter_ms=2,
                source="symmetric 100 Mbit/s fibre, same metro area"),
        Profile("home-asym", down_mbit=100, up_mbit=20, rtt_ms=30, jitter_ms=3,
                source="cable/DSL: 100 down / 20 up Mbit/s"),
        Profile("oregon-tokyo", down_mbit=523, up_mbit=523, rtt_ms=96, jitter_ms=1,
                source="measured between cloud regions us-west-2 and ap-northeast-1"),
        Profile("sydney-frankfurt", down_mbit=328, up_mbit=328, rtt_ms=265, jitter_ms=2,
                source="measured between cloud regions ap-southeast-2 and eu-central-1"),
    )
}


def get_profile(profile: Profile | str) -> Profile:
    """Return ``profile`` itself or the table entry named by it, with a helpful error."""
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(
            f"unknown link profile {profile!r}; known profiles: {', '.join(PROFILES)}. "
            "Pass one of these names or a bench.netlab.Profile(...)") from None
