"""bench.netlab: emulated hosts in network namespaces. Lab tests need root, ip/tc/iptables and
/dev/net/tun and skip with the reason otherwise; the pure-logic tests run everywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.netlab import PROFILES, Lab, LabConfig, NetlabError, Profile, can_make_namespaces, cleanup_stale, get_profile
from bench.netlab.cleanup import _running, list_namespaces
from bench.netlab.delay_router import DelayScheduler
from bench.netlab.names import IFNAME_MAX, LabName, parse_ns

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def netns() -> None:
    ok, reason = can_make_namespaces()
    if not ok:
        pytest.skip(f"cannot build network labs here: {reason}")


# ----- pure logic --------------------------------------------------------------------------------

def test_profiles_table_and_rtt_convention() -> None:
    assert {"lan", "home", "home-asym", "oregon-tokyo", "sydney-frankfurt"} <= set(PROFILES)
    asym = PROFILES["home-asym"]
    assert (asym.down_mbit, asym.up_mbit, asym.rtt_ms) == (100, 20, 30) and asym.asymmetric
    assert PROFILES["sydney-frankfurt"].one_way_ms == 265 / 4  # two links, both ways: rtt
    with pytest.raises(ValueError, match="known profiles: lan"):
        get_profile("hom")
    with pytest.raises(ValueError, match="up_mbit"):
        Profile("bad", down_mbit=10, up_mbit=0, rtt_ms=1)


def _ip_packet(src: str, dst: str) -> bytes:
    return bytes([0x45]) + bytes(11) + bytes(map(int, src.split("."))) + bytes(map(int, dst.split(".")))


def test_scheduler_delays_by_both_links_and_never_reorders_a_flow() -> None:
    pkt = _ip_packet("10.0.1.2", "10.0.2.2")
    for gap in (1e-4, 0.02):  # a bulk flow and a sparse ping see the same delays
        sched = DelayScheduler(seed=1)
        sched.set_link("10.0.1", one_way_ms=5, jitter_ms=4)
        sched.set_link("10.0.2", one_way_ms=10, jitter_ms=4)
        releases = [sched.release_time(pkt, now=i * gap) for i in range(5000)]
        assert releases == sorted(releases)
        delays = [r - i * gap for i, r in enumerate(releases)]
        assert 0.011 <= min(delays) and max(delays) <= 0.019
        assert max(delays) - min(delays) > 0.003  # jitter is there
        assert abs(sum(delays) / len(delays) - 0.015) < 0.0005, gap
    assert sched.release_time(_ip_packet("192.168.1.2", "10.0.9.9"), now=500.0) == 500.0  # unknown: no delay


def test_names_are_short_and_parse_back() -> None:
    name = LabName.new()
    assert parse_ns(name.ns("h-a")) == name and name.owner_alive()
    assert parse_ns("htprobe-1-ab") is None and parse_ns("other") is None
    for ifname in ("l250", "lan254", "eth0", "wan", "dly0"):
        assert len(ifname) <= IFNAME_MAX


# ----- labs ----------------------------------------------------------------------------------------

def test_lab_smoke_rtt_rate_nat_counters_and_cleanup(netns: None) -> None:
    from bench.netlab.measure import measure_ping, measure_throughput, start_server, try_dial

    profile = Profile("home-test", down_mbit=20, up_mbit=20, rtt_ms=20, jitter_ms=2)
    with Lab() as lab:
        a = lab.add_host("a", profile)
        b = lab.add_host("b", profile)
        c = lab.add_host("c", profile, nat=True)
        assert a.dialable and not c.dialable and c.public_ip != c.ip
        sleeper = a.popen(["sleep", "60"])
        prefix, router_pid = lab.prefix, lab.delay_router_pid
        assert len(lab.namespaces()) == 5  # router, a, b, c and c's NAT

        ping = measure_ping(a, b, count=10)
        assert 0.8 * 20 <= ping.median_ms <= 1.5 * 20 + 2, ping

        t = measure_throughput(lab, a, b, seconds=1.5)
        assert 0.6 * 20 <= t.mbit <= 1.1 * 20, t
        # Kernel counters see the app's bytes plus headers, on both ends of the path.
        assert t.app_bytes <= t.sender_counters.up_bytes <= 1.05 * t.app_bytes, t
        assert t.app_bytes <= t.receiver_counters.down_bytes <= 1.05 * t.app_bytes, t

        echo_a = start_server(a, "echo-server", 7003)
        echo_c = start_server(c, "echo-server", 7004)
        assert try_dial(c, a.ip, port=7003, timeout_s=2).ok, "NATed host could not dial out"
        assert not try_dial(a, c.ip, port=7004, timeout_s=0.5).ok, "NATed host's address was dialable"
        assert not try_dial(a, c.public_ip, port=7004, timeout_s=0.5).ok, "NAT let a new inbound connection in"
        echo_a.kill(), echo_c.kill()
        # Every routed packet passed through the delay router (hosts also send a few ARP frames).
        routed = sum(lab.counters(h).up_packets for h in (a, b, c))
        assert lab.delay_stats().packets >= routed - 10, (lab.delay_stats(), routed)

    assert not [ns for ns in list_namespaces() if ns.startswith(prefix)]
    assert sleeper.poll() is not None and not _running(router_pid)
    with pytest.raises(NetlabError, match="closed"):
        lab.add_host("d", profile)


def test_asymmetric_link_shapes_each_direction(netns: None) -> None:
    from bench.netlab.measure import measure_throughput

    with Lab() as lab:
        home = lab.add_host("home", Profile("asym-test", down_mbit=40, up_mbit=10, rtt_ms=4))
        dc = lab.add_host("dc", Profile("dc", down_mbit=1000, up_mbit=1000, rtt_ms=4))
        up = measure_throughput(lab, home, dc, seconds=1.0)
        down = measure_throughput(lab, dc, home, seconds=1.0)
    assert 0.6 * 10 <= up.mbit <= 1.1 * 10, up
    assert 0.6 * 40 <= down.mbit <= 1.1 * 40, down


_CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    from bench.netlab import Lab, cleanup
    mode = sys.argv[1]
    if mode == "SIGINT-during-close":  # Ctrl-C arrives in the middle of teardown
        remove = cleanup.remove_namespaces
        def interrupted(names):
            os.kill(os.getpid(), signal.SIGINT)
            return remove(names)
        cleanup.remove_namespaces = interrupted
    lab = Lab()                      # no `with`: the signal handler must clean up
    host = lab.add_host("a", "home")
    lab.add_host("b", "home", nat=True)
    sleeper = host.popen(["sleep", "60"])
    print(json.dumps({"prefix": lab.prefix, "pids": [sleeper.pid, lab.delay_router_pid]}), flush=True)
    if mode == "SIGINT-during-close":
        lab.close()
    else:
        os.kill(os.getpid(), getattr(signal, mode))
    time.sleep(30)
""")


def _run_child(sig: str) -> tuple[subprocess.Popen, dict]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, sig], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    line = child.stdout.readline()
    if not line:
        child.kill()
        pytest.fail(f"child lab did not start: {child.communicate()[1][-2000:]}")
    return child, json.loads(line)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGINT-during-close"])
def test_signal_to_lab_owner_cleans_up(netns: None, sig: str) -> None:
    child, info = _run_child(sig)
    _, err = child.communicate(timeout=20)
    assert child.returncode != 0  # the signal still ends the process (KeyboardInterrupt / SIGTERM)
    left = [ns for ns in list_namespaces() if ns.startswith(info["prefix"])]
    assert not left, f"namespaces left after {sig}: {left}; child stderr: {err[-1500:]}"
    assert not [p for p in info["pids"] if _running(p)]


def test_cleanup_stale_removes_dead_owners_only(netns: None) -> None:
    child, info = _run_child("SIGKILL")  # no chance to clean up
    child.wait(timeout=20)
    deadline = time.monotonic() + 3
    while _running(info["pids"][1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(info["pids"][1]), "delay router outlived its owner (it should exit on stdin EOF)"
    with Lab(LabConfig(remove_stale=False)) as live:  # a live lab must survive the sweep
        removed = [ns for ns in cleanup_stale() if ns.startswith(info["prefix"])]
        assert live.namespaces(), "cleanup_stale removed a live lab"
    assert len(removed) == 4, removed  # router, a, b, b's NAT
    assert not [ns for ns in list_namespaces() if ns.startswith(info["prefix"])]
    assert not _running(info["pids"][0]), "process inside a stale namespace survived"
