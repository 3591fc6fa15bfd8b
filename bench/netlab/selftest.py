"""Self-test: build two public hosts and one NATed host per profile and measure the lab itself."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .lab import Lab, LabConfig
from .measure import measure_ping, measure_rtt, measure_throughput, start_server, try_dial
from .profiles import PROFILES, Profile, get_profile


@dataclass(frozen=True)
class SelftestRow:
    """What one profile's lab measured, next to what the profile promises."""

    profile: Profile
    ping_median_ms: float      # ICMP echo a->b (b's kernel answers)
    ping_min_ms: float
    tcp_rtt_median_ms: float   # 1-byte TCP echo a->b through Python on both ends
    ab_mbit: float
    ab_steady_mbit: float
    ba_mbit: float
    ba_steady_mbit: float
    kernel_over_app: float
    nat_dial_out_ok: bool
    nat_inbound_private: str   # how dialing the NATed host's own address failed ("" if it worked!)
    nat_inbound_public: str    # how dialing its NAT's public address failed
    delay_cpu_s: float         # delay router CPU over the whole lab's life
    delay_cpu_transfer_frac: float  # CPU share of one core during the bulk transfers
    delay_mean_late_ms: float
    delay_packets: int
    build_s: float

    @property
    def expected_mbit(self) -> float:
        return min(self.profile.up_mbit, self.profile.down_mbit)


def selftest_profile(profile: Profile | str, *, seconds: float = 3.0, config: LabConfig | None = None) -> SelftestRow:
    prof = get_profile(profile)
    t0 = time.monotonic()
    with Lab(config) as lab:
        a = lab.add_host("a", prof)
        b = lab.add_host("b", prof)
        c = lab.add_host("c", prof, nat=True)
        build_s = time.monotonic() - t0
        count = max(5, min(20, int(2000 / max(prof.rtt_ms, 1))))
        ping = measure_ping(a, b, count=count)
        rtt = measure_rtt(a, b, count=count)
        ab = measure_throughput(lab, a, b, seconds=seconds)
        ba = measure_throughput(lab, b, a, seconds=seconds)
        echo_a = start_server(a, "echo-server", 7003)
        echo_c = start_server(c, "echo-server", 7004)
        out = try_dial(c, a.ip, port=7003, timeout_s=2.0)
        timeout = max(1.0, 3 * prof.rtt_ms / 1000)
        in_private = try_dial(a, c.ip, port=7004, timeout_s=timeout)
        in_public = try_dial(a, c.public_ip, port=7004, timeout_s=timeout)
        for p in (echo_a, echo_c):
            p.kill()
            p.wait()
        stats = lab.delay_stats()
    transfer_s = ab.seconds + ba.seconds
    return SelftestRow(
        prof, ping.median_ms, ping.min_ms, rtt.median_ms, ab.mbit, ab.steady_mbit, ba.mbit, ba.steady_mbit,
        ab.kernel_over_app, out.ok,
        "" if in_private.ok else (in_private.error or "failed"),
        "" if in_public.ok else (in_public.error or "failed"),
        stats.cpu_s, (ab.delay_cpu_s + ba.delay_cpu_s) / max(transfer_s, 1e-9), stats.mean_late_ms, stats.packets,
        build_s)


def format_rows(rows: list[SelftestRow]) -> str:
    head = (f"{'profile':<17}{'RTT ms: exp/ping med/min/tcp':>30}{'Mbit/s exp':>11}{'a->b (steady)':>16}{'b->a (steady)':>16}"
            f"{'kern/app':>9}{'NAT out':>8}{'NAT in':>9}{'dly CPU s':>10}{'CPU@xfer':>9}{'late ms':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        refused = bool(r.nat_inbound_private) and bool(r.nat_inbound_public)
        lines.append(
            f"{r.profile.name:<17}"
            f"{f'{r.profile.rtt_ms:g} / {r.ping_median_ms:.2f} {r.ping_min_ms:.2f} {r.tcp_rtt_median_ms:.2f}':>30}"
            f"{r.expected_mbit:>11g}{f'{r.ab_mbit:.0f} ({r.ab_steady_mbit:.0f})':>16}"
            f"{f'{r.ba_mbit:.0f} ({r.ba_steady_mbit:.0f})':>16}{r.kernel_over_app:>9.4f}"
            f"{'ok' if r.nat_dial_out_ok else 'FAILED':>8}{'refused' if refused else 'OPEN!':>9}"
            f"{r.delay_cpu_s:>10.2f}{r.delay_cpu_transfer_frac:>9.1%}{r.delay_mean_late_ms:>8.3f}")
    for r in rows:
        lines.append(f"{r.profile.name}: inbound to NATed host: private address -> {r.nat_inbound_private or 'CONNECTED'}; "
                     f"NAT public address -> {r.nat_inbound_public or 'CONNECTED'}; lab built in {r.build_s:.2f} s, "
                     f"{r.delay_packets} packets through the delay router")
    return "\n".join(lines)


def selftest(profiles: list[str] | None = None, *, seconds: float = 3.0, echo: bool = True) -> list[SelftestRow]:
    rows = []
    for name in profiles or list(PROFILES):
        rows.append(selftest_profile(name, seconds=seconds))
        if echo:
            print(f"  {name}: done", flush=True)
    return rows
