"""Microbatches in flight sized from the pipeline's measured round trip (peer.inflight)."""

from peer.inflight import InflightSizer


def test_enough_in_flight_to_cover_the_round_trip_and_no_more_than_the_run_allows():
    sizer = InflightSizer(cap=8)
    assert sizer.choose(0.0) == 8  # nothing measured: the run's cap
    for trip in (0.52, 0.41, 0.47):  # a 100 ms hop each way plus three stages' compute
        sizer.observe_trip(trip)
    assert sizer.choose(0.1) == 5    # ceil(0.41 / 0.1): the fastest trip, not one that queued
    assert sizer.choose(0.5) == 1    # compute dominates: one at a time keeps the stage busy
    assert sizer.choose(0.01) == 8   # capped by --max-inflight (what the memory plan counts)
    assert "410 ms" in sizer.describe(5, 0.1) and "--inflight" in sizer.describe(5, 0.1)
    assert "covering it takes 41, more than the run's --max-inflight 8" in sizer.describe(8, 0.01)


def test_a_fixed_count_wins_but_not_over_the_cap():
    assert InflightSizer(cap=4, fixed=2).choose(0.1) == 2
    fixed = InflightSizer(cap=4, fixed=9)
    assert fixed.choose(0.1) == 4 and "capped" in fixed.describe(4, 0.1)
