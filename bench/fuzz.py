"""A long fuzz run over every decoder of network input (``bench/fuzz_targets.py``): cases tried, accepted, refused and
crashes found per target (target: 0 crashes).

    PYTHONPATH=. python bench/fuzz.py --examples 20000 --seed 1

A crash is any exception other than the decoder's own error, or a result that breaks its contract; the first one
of each target is printed with its shrunk input. ``tests/test_fuzz.py`` runs the same targets briefly.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from bench.fuzz_targets import REFUSED, TARGETS, Target  # noqa: E402


def fuzz(target: Target, examples: int, rng_seed: int) -> tuple[Counter, str]:
    """Run ``target`` on ``examples`` generated cases; the outcome counts and the first crash's report ("" if none)."""
    counts: Counter = Counter()

    @seed(rng_seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(target.strategy)
    def run(case):
        counts["tried"] += 1
        counts["refused" if target.check(case) == REFUSED else "accepted"] += 1

    try:
        run()
    except Exception as exc:  # hypothesis re-raises the shrunk failing case's error
        return counts, "".join(traceback.format_exception(exc)[-6:])
    return counts, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5000, help="cases per target (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="target names (default: all)")
    args = parser.parse_args(argv)
    chosen = [t for t in TARGETS if args.only is None or t.name in args.only]
    print(f"{'target':<14}{'tried':>9}{'accepted':>10}{'refused':>9}{'crashes':>9}{'seconds':>9}")
    crashes, total = 0, 0
    for target in chosen:
        started = time.monotonic()
        counts, crash = fuzz(target, args.examples, args.seed)
        crashes += bool(crash)
        total += counts["tried"]
        print(f"{target.name:<14}{counts['tried']:>9}{counts['accepted']:>10}{counts['refused']:>9}{int(bool(crash)):>9}"
              f"{time.monotonic() - started:>9.1f}", flush=True)
        if crash:
            print(f"  first crash of {target.name}:\n" + "\n".join("    " + line for line in crash.splitlines()), flush=True)
    print(f"total: {total} cases over {len(chosen)} targets, {crashes} target(s) with a crash")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
