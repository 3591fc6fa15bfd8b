"""Microbatches whose stage work raised: where it happened, counted, and said once, not a thousand times.

A stage whose forward, backward or loss raises (a library that changed, a device out of
memory) fails every microbatch the same way. The failure travels back along the route to
stage 0 as a ``StageFailure`` (stage, peer, error), which reports it to the coordinator; the
status page names it. The failing peer says so in its own output: the first failure with its
traceback, then a summary at most every ``SUMMARY_EVERY`` seconds.
"""

from __future__ import annotations

import logging
import time

from proto import hometrain_pb2 as pb

log = logging.getLogger(__name__)

SUMMARY_EVERY = 10.0
MAX_ERROR_CHARS = 500


def describe(exc: BaseException) -> str:
    """``TypeError: cannot unpack ...``, bounded."""
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


class StageFailed(RuntimeError):
    """A microbatch failed at ``failure.stage`` (on this peer or further down the route)."""

    def __init__(self, failure: pb.StageFailure) -> None:
        super().__init__(f"stage {failure.stage} (peer ...{failure.peer[-8:]}): {failure.error}")
        self.failure = failure


class FailureLog:
    """Counts this peer's own stage failures and logs them without flooding the console."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.count = 0
        self._since_summary = 0
        self._summary_at = 0.0
        self._done_at_summary = 0

    def record(self, stage: int, what: str, exc: BaseException, microbatches_done: int) -> StageFailed:
        """Count one failure of this peer's stage and return the exception that carries it back."""
        self.count += 1
        self._since_summary += 1
        error = describe(exc)
        now = time.monotonic()
        if self.count == 1:
            log.error("stage %d failed on %s: %s; this microbatch is dropped", stage, what, error, exc_info=exc)
            self._summary_at, self._done_at_summary, self._since_summary = now, microbatches_done, 0
        elif now - self._summary_at >= SUMMARY_EVERY:
            done = microbatches_done - self._done_at_summary
            every = " (every one: this peer trains nothing until that is fixed)" if done == 0 else ""
            log.error("stage %d failed on %d of the last %d microbatches%s; last error: %s",
                      stage, self._since_summary, self._since_summary + done, every, error)
            self._summary_at, self._done_at_summary, self._since_summary = now, microbatches_done, 0
        return StageFailed(pb.StageFailure(stage=stage, peer=self.peer_id, error=error))
