"""Per-round decisions shared by replicas and coordinator: deterministic, and at the configured rate."""

from proto.schedule import resyncs, skips_sync, sync_seed


def test_skip_rate_and_determinism():
    draws = [skips_sync(7, r, 1, 0.3) for r in range(1, 5001)]
    assert 0.27 < sum(draws) / len(draws) < 0.33
    assert draws == [skips_sync(7, r, 1, 0.3) for r in range(1, 5001)]
    assert draws != [skips_sync(7, r, 0, 0.3) for r in range(1, 5001)]  # stages draw independently
    assert not any(skips_sync(7, r, 0, 0.0) for r in range(1, 100))


def test_resync_and_seed():
    assert [r for r in range(1, 13) if resyncs(r, 4)] == [4, 8, 12]
    assert not any(resyncs(r, 0) for r in range(1, 50))
    assert sync_seed(1, 2, 3, 0) == sync_seed(1, 2, 3, 0) != sync_seed(1, 2, 3, 1)
