"""Forward audits: now and then a stage-0 peer runs a microbatch it trained forward a second time, along other replicas.

Robust aggregation bounds what a bad replica's gradient can do to its stage, but a peer that
corrupts the activations it passes on (or the loss it relays back) poisons gradients that look
honest to every replica downstream. So for a fraction ``--audit-rate`` of the microbatches it
trains, a stage-0 peer sends the same inputs, with their targets, as an INFER frame along a
second route that keeps off the first route's peers wherever a stage has another replica. The
frame is pinned to the round: a peer that has stepped since refuses it, as its weights are no
longer those the first loss came from. So the stage-0 peer reports the microbatch done only once
its audit has run: the round cannot close, and its peers step, under it. That puts one forward
pass per audited microbatch on the round's path (about a third of the audited share's compute). The last stage answers with the summed loss. Each stage
names itself in the replies (``pipeline.route_of``), so both routes are known. Audits go to the
coordinator with the round's step report, which judges them itself
(``TrainConfig.losses_agree``: the tolerance follows the precision in use) and flags a peer found
only on routes that disagreed (``coordinator.audits``). An audit that cannot run (the round
closed, no route) is dropped and counted (``/api/status`` ``audits.dropped``).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict

import torch

from proto import hometrain_pb2 as pb
from proto.run_config import TrainConfig

from .pipeline import Pipeline, route_of

log = logging.getLogger(__name__)

MAX_AUDITS_PER_ROUND = 16  # kept for one step report (the coordinator reads no more)


class Auditor:
    """Stage 0's audits: which microbatches to rerun, the reruns, and the results kept for the round's step report."""

    def __init__(self, pipeline: Pipeline, train: TrainConfig, my_id: str, rng: random.Random) -> None:
        self.pipeline = pipeline
        self.train = train
        self.my_id = my_id
        self.rng = rng
        self.done: dict[int, list[pb.Audit]] = defaultdict(list)  # round -> audits finished
        self.dropped = 0  # audits that could not run

    def wanted(self) -> bool:
        return self.train.audit_rate > 0 and self.rng.random() < self.train.audit_rate

    async def rerun(self, header: pb.FrameHeader, batch: dict[str, torch.Tensor], loss_sum: float, tokens: int, route: list[str]) -> None:
        """The second, forward-only run of a microbatch trained along ``[this peer] + route`` to ``loss_sum``."""
        first = [self.my_id, *route]
        request = pb.FrameHeader(kind=pb.INFER, run_id=header.run_id, round=header.round, open_attempt=header.open_attempt, stage=0)
        tensors = {name: batch[name] for name in ("input_ids", "prefix_lengths", "target_ids", "loss_mask")}
        try:
            reply = await self.pipeline.rerun(request, tensors, avoid=frozenset(first))
        except Exception as exc:  # no second route, or a peer refused it: nothing to judge
            self.dropped += 1
            log.debug("audit of microbatch %d of round %d dropped: %s", header.microbatch, header.round, exc)
            return
        second = route_of(reply)
        kept = self.done[header.round]
        if len(kept) < MAX_AUDITS_PER_ROUND:
            kept.append(pb.Audit(microbatch=header.microbatch, first_route=first, second_route=second, first_loss=loss_sum,
                                 second_loss=reply.loss_sum, first_tokens=tokens, second_tokens=reply.tokens))
        if not self.train.losses_agree(loss_sum, tokens, reply.loss_sum, reply.tokens):
            log.warning("audit of microbatch %d of round %d: loss %.6g along %s, %.6g along %s (tokens %d, %d); the coordinator "
                        "judges who is wrong", header.microbatch, header.round, loss_sum, [p[-8:] for p in first], reply.loss_sum,
                        [p[-8:] for p in second], tokens, reply.tokens)

    def take(self, round: int) -> list[pb.Audit]:
        """The audits of ``round`` finished so far (for its step report); older rounds' are dropped."""
        for old in [r for r in self.done if r < round]:
            del self.done[old]
        return self.done.pop(round, [])
