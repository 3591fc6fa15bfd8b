"""Training with one bad replica: a clean swarm beside swarms where one peer forges its sync updates.

2 stages x 4 replicas (8 peers, the tiny GPT-J on CPU, exact sync, the default robust
aggregation: CenteredClip), the same seed, data and rounds in every run. In each attacked run one
replica of stage 1 (``bench/byzantine_peer.py``) sends its stage's replicas forged updates:
``scale`` (x100), ``signflip`` (negated) or ``random`` (noise of 10x the norm), both its own
contribution to every part and the aggregate of the part it owns; or, ``forward``, it skews its
training forwards (x1.5 logits) and answers audits honestly, which forward audits catch. Rounds open once each stage
has 3 replicas (``--min-replicas 3``), so a run goes on when the coordinator takes a flagged peer
out. Final loss is the mean of the last 5 rounds; the gap is relative to the clean run (target:
within 5%). "flagged" is the coordinator's verdict on the bad peer (/api/status peers[].flagged).
``--unprotected`` adds each attack with ``--robust-aggregation off``, to show what the defence buys.

8 peers share this machine's cores, so the default is short: 30 rounds of 8 microbatches
(--global-batch-size 32) per run, a few minutes each on 2 cores.

    python bench/byzantine.py [--attack scale|signflip|random|forward|all] [--rounds 30] [--audit-rate 0.25] [--unprotected]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from coordinator.local_swarm import LocalSwarm

from byzantine_peer import ATTACKS
from compression import final_loss, run_swarm

HERE = Path(__file__).resolve().parent
REPLICAS, BAD_STAGE = 4, 1
FLAGS = ["--global-batch-size", "32", "--min-replicas", "3"]


def add_bad_peer(swarm: LocalSwarm, attack: str, *args: str) -> None:
    """``peer join`` as ``swarm.add_peer`` starts it, through the attacking wrapper (named ``bad``)."""
    cmd = [sys.executable, str(HERE / "byzantine_peer.py"), attack, "join", "--coordinator", f"127.0.0.1:{swarm.port}",
           "--gpu", "cpu", "--threads", "1", "--host", "127.0.0.1", "--name", "bad", *args]
    swarm.peers.append(swarm._spawn(cmd, "bad"))


def peers(attack: str | None):
    def add(swarm: LocalSwarm) -> None:
        for stage in range(2):
            for i in range(REPLICAS):
                if attack is not None and stage == BAD_STAGE and i == 0:
                    add_bad_peer(swarm, attack, "--stage", str(stage), "--serve-after-run")
                else:
                    swarm.add_peer("--stage", str(stage), "--serve-after-run")
    return add


def flagged(status: dict) -> str:
    bad = [p for p in status.get("peers", []) if p.get("name") == "bad"]
    if not bad or "flagged" not in bad[0]:
        return "n/a (coordinator does not flag yet)"
    return f"yes ({bad[0]['flagged']})" if bad[0]["flagged"] else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", choices=[*ATTACKS, "all"], default="all")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--audit-rate", type=float, default=0.25,
                        help="--audit-rate of the protected runs (the run's default, 0.05, flags a forward attacker only after "
                             "about 6 / (8 microbatches x rate x 1/4 of them through it) = 60 rounds, longer than this bench)")
    parser.add_argument("--unprotected", action="store_true",
                        help="also run each attack with --robust-aggregation off (and, forward, --audit-rate 0)")
    args = parser.parse_args()
    attacks = list(ATTACKS) if args.attack == "all" else [args.attack]
    runs: list[tuple[str, str | None, list[str]]] = [("clean", None, ["--audit-rate", str(args.audit_rate)])]
    for attack in attacks:
        runs.append((attack, attack, ["--audit-rate", str(args.audit_rate)]))
        if args.unprotected:
            runs.append((f"{attack}, unprotected", attack, ["--robust-aggregation", "off"] + (["--audit-rate", "0"] if attack == "forward" else [])))
    rows = []
    with tempfile.TemporaryDirectory(prefix="hometrain-byzantine-") as tmp:
        for label, attack, extra in runs:
            status, records = run_swarm(Path(tmp) / label.replace(", ", "_").replace(" ", "_"), args.rounds, [*FLAGS, *extra],
                                        replicas=REPLICAS, add_peers=peers(attack))
            rows.append((label, final_loss(records), "-" if attack is None else flagged(status), len(records)))
            print(f"ran {label}: {len(records)} rounds", flush=True)
    base = rows[0][1]
    print(f"\n2 stages x {REPLICAS} replicas, tiny GPT-J, exact sync, {args.rounds} rounds, --audit-rate {args.audit_rate:g} "
          f"where protected; one bad replica in stage {BAD_STAGE}")
    print(f"{'run':24s} {'final loss':>10s} {'gap':>8s}  bad peer flagged")
    for label, loss, flag, _ in rows:
        gap = 100 * (loss - base) / base
        print(f"{label:24s} {loss:10.4f} {gap:+7.2f}%  {flag}")


if __name__ == "__main__":
    main()
