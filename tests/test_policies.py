"""Pure policies: stage layout, stage choice for a newcomer, next-hop choice."""

from __future__ import annotations

import random

import time

import pytest

from coordinator.assignment import Replica, StageNeeds, capacity, choose_stage, plan_rebalance, stage_layer_ranges, stage_needs
from proto import hometrain_pb2 as pb
from proto.run_config import TrainConfig
from peer.routing import choose_next_hop


@pytest.mark.parametrize(
    "n_layer, stages, expected",
    [
        (4, 2, [(0, 2), (2, 4)]),
        (4, 1, [(0, 4)]),
        (28, 3, [(0, 10), (10, 19), (19, 28)]),
        (28, 4, [(0, 7), (7, 14), (14, 21), (21, 28)]),
        (5, 5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    ],
)
def test_stage_layer_ranges(n_layer, stages, expected):
    assert stage_layer_ranges(n_layer, stages) == expected


@pytest.mark.parametrize("stages", [0, 5])
def test_stage_layer_ranges_refuses_impossible_splits(stages):
    with pytest.raises(ValueError, match="--stages"):
        stage_layer_ranges(4, stages)


@pytest.mark.parametrize(
    "replicas, requested, expected",
    [
        ([], -1, 0),                                                  # first peer: stage 0
        ([Replica(0, 0)], -1, 1),                                     # an empty stage first
        ([Replica(0, 0), Replica(1, 0)], -1, 0),                      # tie: lowest index
        ([Replica(0, 0), Replica(1, 0), Replica(0, 0)], -1, 1),
        ([Replica(0, 5.0), Replica(1, 1.0)], -1, 1),                  # weakest total throughput
        ([Replica(0, 1.0), Replica(0, 1.0), Replica(1, 5.0)], -1, 0),  # by throughput, not by count
        ([Replica(0, 4.0), Replica(1, 0.0)], -1, 0),                  # unmeasured weighs as the median (4.0): a tie, lower index
        ([Replica(0, 1.0)], 0, 0),                                    # an explicit request wins
        ([], 7, 0),                                                   # an impossible request is ignored
    ],
)
def test_choose_stage(replicas, requested, expected):
    assert choose_stage(replicas, 2, requested) == expected


GIB = 2**30
NEEDS = [StageNeeds(memory=10 * GIB, bytes_per_sample=1e6), StageNeeds(memory=4 * GIB, bytes_per_sample=1e6)]


def test_newcomer_only_goes_where_its_memory_fits():
    small = Replica(-1, 1.0, free_memory=6 * GIB)
    assert choose_stage([], 2, newcomer=small, needs=NEEDS) == 1           # stage 0 is empty but needs 10 GiB
    assert choose_stage([], 2, newcomer=Replica(-1, 1.0, free_memory=0), needs=NEEDS) == 0  # unknown memory: not excluded
    with pytest.raises(ValueError, match="stage 0 needs 10.0 GiB .* 6.0 GiB free"):
        choose_stage([], 2, requested=0, newcomer=small, needs=NEEDS)
    with pytest.raises(ValueError, match="smallest stage needs 4.0 GiB .* 1.0 GiB free"):
        choose_stage([], 2, newcomer=Replica(-1, 1.0, free_memory=GIB), needs=NEEDS)


def test_link_bandwidth_caps_what_a_replica_counts_for():
    # Stage 0 has a fast GPU on a 1 MB/s link: 1 sample/s at 1 MB per sample, not 10.
    slow_link = Replica(0, 10.0, bandwidth=1e6)
    assert capacity(slow_link, NEEDS[0]) == 1.0 and capacity(slow_link, None) == 10.0
    replicas = [slow_link, Replica(1, 3.0, bandwidth=1e9)]
    assert choose_stage(replicas, 2, needs=NEEDS) == 0  # 1 < 3 samples/s once the link is counted
    assert choose_stage(replicas, 2) == 1               # by compute alone stage 1 looked weaker


def test_rebalance_moves_a_peer_that_fits_and_gains_most():
    # Stage 1 empty; stage 0 has three replicas. "big" is the slowest, but only "mid" and "fast" fit stage 1's 4 GiB.
    replicas = [("fast", Replica(0, 9.0, free_memory=20 * GIB)), ("mid", Replica(0, 5.0, free_memory=8 * GIB)),
                ("big", Replica(0, 2.0, free_memory=3 * GIB))]
    assert plan_rebalance(replicas, 2) == ("big", 1)           # without needs: the slowest moves
    assert plan_rebalance(replicas, 2, NEEDS) == ("mid", 1)    # with them: the slowest that fits
    # A replica whose link limits it less on the empty stage moves first.
    needs = [StageNeeds(1, 4e6), StageNeeds(1, 1e6)]
    linked = [("a", Replica(0, 4.0, bandwidth=4e6)), ("b", Replica(0, 1.0, bandwidth=1e9))]
    assert plan_rebalance(linked, 2, needs) == ("a", 1)       # 1 -> 4 samples/s for a; b would stay at 1
    assert plan_rebalance([("x", Replica(0, 1.0, free_memory=GIB)), ("y", Replica(0, 1.0, free_memory=GIB))], 2, NEEDS) is None
    assert plan_rebalance([("x", Replica(0, 1.0)), ("y", Replica(1, 1.0))], 2, NEEDS) is None  # nothing empty


def test_rebalance_keeps_min_replicas_and_leaves_pinned_peers():
    three_one = [("a", Replica(0, 1.0)), ("b", Replica(0, 1.0)), ("c", Replica(0, 1.0)), ("d", Replica(1, 1.0))]
    assert plan_rebalance(three_one, 2, min_replicas=2) == ("a", 1)        # 3 + 1 -> 2 + 2
    assert plan_rebalance(three_one, 2, min_replicas=2, pinned={"a", "b"}) == ("c", 1)
    assert plan_rebalance(three_one, 2, min_replicas=2, pinned={"a", "b", "c"}) is None  # they asked for stage 0
    two_one = [("a", Replica(0, 1.0)), ("b", Replica(0, 1.0)), ("d", Replica(1, 1.0))]
    assert plan_rebalance(two_one, 2, min_replicas=2) is None             # stage 0 would fall short in turn
    assert plan_rebalance(two_one, 2, min_replicas=1) is None             # nothing empty


def test_membership_moves_only_after_the_grace_and_never_a_peer_that_asked_for_its_stage():
    from coordinator.membership import Membership

    m = Membership(2, 10)
    asked = [m.add(f"asked-{i}", "cpu", 1.0, requested_stage=0) for i in range(2)]
    t = time.time()
    assert m.rebalance(1, grace=5, now=t) is None and m.short_since == {1: t}
    assert m.rebalance(1, grace=5, now=t + 60) is None                     # due, but both asked for stage 0: stage 1 waits
    free = m.add("free", "cpu", 1.0, requested_stage=-1)
    free.stage = 0                                                          # as if it had been put there
    start = time.time()
    assert m.rebalance(1, grace=5, now=start) is None                      # short, but not for long enough
    moved = m.rebalance(1, grace=5, now=start + 6)
    assert moved is not None and moved[0] is free and moved[1:] == (0, 1) and all(p.stage == 0 for p in asked)


def test_stage_needs_follow_the_run_settings():
    counts = [1000, 2000, 1000]
    plain = stage_needs(counts, 64, TrainConfig(seq_len=32), memory=[16000, 32000, 16000])
    assert [n.memory for n in plain] == [16000, 32000, 16000]  # the memory plan's, as given
    boundary = 32 * 64 * 8  # fp32 activations forward + fp32 gradients back, per sample
    assert plain[0].bytes_per_sample == pytest.approx(boundary + 4 * 1000 / 16)
    assert plain[1].bytes_per_sample == pytest.approx(2 * boundary + 4 * 2000 / 16)  # a middle stage has two boundaries
    small = stage_needs(counts, 64, TrainConfig(seq_len=32, compute_dtype="bfloat16", activation_compression="direct", activation_bits=4,
                                                gradient_bits=4, sync_compression="cocktail"), memory=[8000] * 3)
    assert small[0].memory == 8000 and all(c.bytes_per_sample < p.bytes_per_sample / 7 for c, p in zip(small, plain))


def test_next_hop_skips_banned_and_weights_by_throughput():
    rng = random.Random(0)
    candidates = {"a": 9.0, "b": 1.0, "c": 0.0}
    picks = [choose_next_hop(candidates, {}, 0.0, rng) for _ in range(2000)]
    # "c" is unmeasured and weighs as the (upper) median of [1, 9], 9: a 9/19, b 1/19, c 9/19.
    assert 0.42 < picks.count("a") / 2000 < 0.53
    assert 0.02 < picks.count("b") / 2000 < 0.09
    assert choose_next_hop(candidates, {"a": 10.0, "b": 10.0}, 5.0, rng) == "c"
    assert choose_next_hop(candidates, {"a": 10.0, "b": 10.0, "c": 10.0}, 5.0, rng) is None
    assert choose_next_hop(candidates, {"a": 1.0, "b": 1.0, "c": 1.0}, 5.0, rng) is not None  # bans expired
    assert choose_next_hop({}, {}, 0.0, rng) is None


def test_directory_prefers_the_coordinators_recent_list_over_the_dht(monkeypatch):
    import asyncio

    import peer.directory as directory_module
    from peer.directory import StageRecord

    class FakeDHT:  # answers like a partitioned DHT: no records at all
        def __init__(self):
            self.gets = 0

        async def _nothing(self):
            return None

        def get(self, *args, **kwargs):
            self.gets += 1
            return self._nothing()

    dht = FakeDHT()
    addresses: dict[str, list[str]] = {}
    directory = directory_module.StageDirectory(dht, "run", addresses)
    assert asyncio.run(directory.replicas(1, max_age=0)) == {} and dht.gets == 1
    directory.learn(1, {"peer-a": StageRecord(throughput=2.0, maddrs=("/ip4/127.0.0.1/tcp/4001",))})
    assert addresses["peer-a"] == ["/ip4/127.0.0.1/tcp/4001"]  # dialable even if the DHT never shows it
    assert asyncio.run(directory.replicas(1, max_age=0)) == {"peer-a": StageRecord(throughput=2.0, maddrs=("/ip4/127.0.0.1/tcp/4001",))}
    assert dht.gets == 1
    directory.learn(1, {})  # the coordinator knows nobody there: the DHT may
    asyncio.run(directory.replicas(1, max_age=0))
    assert dht.gets == 2
    directory.learn(1, {"peer-a": StageRecord(throughput=2.0)})
    monkeypatch.setattr(directory_module, "TOLD_MAX_AGE", 0.0)  # an old list (coordinator down) no longer counts
    assert asyncio.run(directory.replicas(1, max_age=0)) == {} and dht.gets == 3


def test_stage_records_are_used_only_if_they_fit_their_schema():
    from peer.directory import StageRecord

    good = StageRecord(throughput=2.5, next_round=7, name="alice", maddrs=("/ip4/10.0.0.1/tcp/4001",))
    assert StageRecord.parse(good.to_value()) == good
    assert StageRecord.parse({"leaving": True}) == StageRecord(leaving=True)
    for bad in ("nonsense", None, [1], {"throughput": "fast"}, {"throughput": float("nan")}, {"throughput": -1.0},
                {"next_round": 1.5}, {"next_round": True}, {"maddrs": "/ip4/10.0.0.1"}, {"maddrs": [3]},
                {"maddrs": ["x" * 300]}, {"maddrs": ["/ip4/10.0.0.1"] * 9}, {"name": "n" * 65}, {"extra": 1}):
        assert StageRecord.parse(bad) is None, bad


def test_a_bad_dht_record_is_dropped_and_counted_not_raised():
    import asyncio
    from types import SimpleNamespace

    from peer.directory import StageDirectory, StageRecord

    good = StageRecord(throughput=1.0, maddrs=("/ip4/10.0.0.2/tcp/4001",))

    class FakeDHT:
        async def _found(self):
            return SimpleNamespace(value={"peer-a": SimpleNamespace(value={"throughput": "fast"}), "peer-b": SimpleNamespace(value=good.to_value()),
                                          7: SimpleNamespace(value=good.to_value()), "peer-c": SimpleNamespace(value={"leaving": True})})

        def get(self, *args, **kwargs):
            return self._found()

    directory = StageDirectory(FakeDHT(), "run")
    assert asyncio.run(directory.replicas(1, max_age=0)) == {"peer-b": good}
    assert directory.records_rejected == 2 and directory.addresses == {"peer-b": ["/ip4/10.0.0.2/tcp/4001"]}


def test_a_relayed_peer_gets_a_quarter_of_its_share_so_direct_paths_carry_most_frames():
    from peer.directory import StageRecord

    rng = random.Random(0)
    candidates = {"direct": 10.0, "natted": 10.0}
    picks = [choose_next_hop(candidates, {}, 0.0, rng, relayed={"natted"}) for _ in range(4000)]
    assert 0.15 < picks.count("natted") / len(picks) < 0.25  # 0.25 / 1.25 = 0.2
    assert choose_next_hop({"natted": 10.0}, {}, 0.0, rng, relayed={"natted"}) == "natted"  # still used when it is all there is
    relay = "/ip4/10.0.0.1/tcp/31337/p2p/12D3KooWS4ikruusyM48AkxpHhvWJESSCho1UmPNexVz8ZubURM1/p2p-circuit/p2p/12D3KooWx"
    assert StageRecord(maddrs=(relay,)).relayed and not StageRecord(maddrs=(relay, "/ip4/1.2.3.4/tcp/4001")).relayed
    assert not StageRecord().relayed


def test_a_large_swarm_is_paced_and_its_timeout_stretches_alike():
    from coordinator.membership import Membership

    m = Membership(1, heartbeat_timeout=10, heartbeat_interval=2, heartbeat_rate=10)
    peers = [m.add(f"p{i}", "cpu", 1.0, requested_stage=-1) for i in range(50)]
    assert m.pace(peers[0]) == 5.0 and peers[0].heartbeat_timeout == 25.0  # 50 peers at 10 beats/s: one beat each 5 s
    now = time.time()
    for p in peers[1:]:
        p.last_seen = now                                                    # they beat; peers[0] has been silent 20 s
    peers[0].last_seen = now - 20
    assert m.expire(now) == [] and m.live_count == 50                        # 20 s is within its stretched timeout
    assert m.expire(now + 6) == [peers[0]] and m.live_count == 49            # 26 s is not
    small = Membership(1, heartbeat_timeout=10, heartbeat_interval=2, heartbeat_rate=100)
    few = small.add("alone", "cpu", 1.0, requested_stage=-1)
    assert small.pace(few) == 2.0 and few.heartbeat_timeout == 10.0          # a small swarm keeps the run's settings
    unpaced = Membership(1, heartbeat_timeout=10, heartbeat_interval=2, heartbeat_rate=0)
    assert unpaced.pace(unpaced.add("x", "cpu", 1.0, requested_stage=-1)) == 2.0


def test_departed_peers_are_folded_into_totals_so_the_table_holds_those_present():
    from coordinator.membership import EXPIRE_EVERY, RETIRE_AFTER, Membership

    m = Membership(1, heartbeat_timeout=10)
    stays, leaves, dies = (m.add(name, "cpu", 1.0, requested_stage=-1) for name in ("stays", "leaves", "dies"))
    now = time.time()
    leaves.state = pb.LEFT
    for p in (stays, leaves, dies):
        p.bytes_sent = {"sync": 100}
        p.uncompressed_sent = {"sync": 400}
        p.last_seen = now
    dies.last_seen = now - 11
    dies.audits_dropped = 3
    assert m.expire(now) == [dies] and m.expire(now + EXPIRE_EVERY / 2) == []  # walked at most every EXPIRE_EVERY s
    assert list(m.peers) == [stays.peer_id] and len(m.records()) == 3           # off the table walked per report,
    assert m.retired == 0 and m.counts()[(0, "gone")] == 1                     # still listed a while
    stays.last_seen = now + RETIRE_AFTER + 1
    m.expire(now + RETIRE_AFTER + 1)
    assert m.records() == [stays] and m.retired == 2
    assert m.wire_totals("sent") == {"sync": {"bytes": 300, "uncompressed_bytes": 1200}}  # their bytes still count
    assert m.retired_audits_dropped == 3
