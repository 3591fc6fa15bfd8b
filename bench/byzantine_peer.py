"""`peer` with one bad replica's behaviour, for bench/byzantine.py: ``python bench/byzantine_peer.py ATTACK join ...``.

ATTACK is scale (every update it sends to its stage's replicas x100), signflip (negated) or
random (Gaussian noise of 10x the update's norm). It forges what it sends in the exact sync:
its contribution to every part, and the aggregate of the part it owns. Or ATTACK is forward:
the stage's training forwards come out x1.5 (activations sent on, or the last stage's logits),
while its forward-only answers (INFER, audits) stay honest, as a careful attacker's would.
Everything else is the real peer: the attack is patched in here, so the product has no switch
for it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's packages, whatever is installed

import torch  # noqa: E402

from peer import cli, replica_sync  # noqa: E402

ATTACKS = ("scale", "signflip", "random", "forward")


def forged(x: torch.Tensor, attack: str) -> torch.Tensor:
    if attack == "scale":
        return x * 100
    if attack == "signflip":
        return -x
    noise = torch.randn(x.numel(), dtype=torch.float32)
    return noise * (10 * float(x.norm()) / max(float(noise.norm()), 1e-30))


def install(attack: str) -> None:
    """Patch the exact sync so that all this peer sends to its replicas is forged (or, ``forward``, its training forwards)."""
    if attack == "forward":
        from peer.stage_runtime import StageRuntime

        honest_forward = StageRuntime.forward

        def skewed_forward(self, *args, **kwargs):
            ctx = honest_forward(self, *args, **kwargs)
            ctx.outputs = ctx.outputs * 1.5
            return ctx

        StageRuntime.forward = skewed_forward
        return
    exchange = replica_sync.SyncExchange
    robust_reduce, plain_reduce = exchange.all_reduce_robust, exchange.all_reduce_sum
    robust_part, plain_part = replica_sync._robust_part, replica_sync._sum_in_order

    async def all_reduce_robust(self, contribution, *args, **kwargs):
        return await robust_reduce(self, forged(contribution, attack), *args, **kwargs)

    async def all_reduce_sum(self, flat, *args, **kwargs):
        return await plain_reduce(self, forged(flat, attack), *args, **kwargs)

    def owned_robust_part(*args, **kwargs):
        reduced, suspects = robust_part(*args, **kwargs)
        return forged(reduced, attack), ()

    def owned_plain_part(*args, **kwargs):
        return forged(plain_part(*args, **kwargs), attack)

    exchange.all_reduce_robust, exchange.all_reduce_sum = all_reduce_robust, all_reduce_sum
    replica_sync._robust_part, replica_sync._sum_in_order = owned_robust_part, owned_plain_part


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ATTACKS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(ATTACKS)}}} join [peer join flags]")
    install(sys.argv[1])
    sys.exit(cli.main(sys.argv[2:]))
