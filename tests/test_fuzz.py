"""Every decoder of network input, fuzzed (``bench/fuzz_targets.py``): each returns what it promises or raises its
own error, whatever it is sent. ``bench/fuzz.py`` runs the same targets for much longer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from bench.fuzz_targets import TARGETS

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_decoder_holds_to_its_contract_on_fuzzed_input(target):
    @FUZZ
    @given(target.strategy)
    def run(case):
        target.check(case)  # hypothesis wants None back; the check raises on a broken contract

    run()
