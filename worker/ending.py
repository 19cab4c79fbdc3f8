"""How a training attempt ends, decided in one place.

`decide_end` looks at what the attempt observed (the flags the reporter and the heartbeat
raised while it trained, the fit result, or the exception that stopped it) and returns one
`EndReason`; `worker/lifecycle.py` then records that end and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from worker.failures import JobLost, is_transient


class EndReason(str, Enum):
    SUCCEEDED = "succeeded"
    CANCELED_DISCARD = "canceled-discard"  # canceled; nothing kept
    CANCELED_KEEP = "canceled-keep"  # stop-and-keep: the best epoch so far is the model
    TIME_LIMITED_KEPT = "time-limited-kept"  # soft limit reached after at least one epoch
    TIME_LIMITED_EMPTY = "time-limited-empty"  # soft limit reached before any epoch ended
    HANDED_BACK = "handed-back"  # the worker is shutting down: resumed elsewhere
    LOST = "lost"  # another worker or the reaper owns the job now: record nothing
    TRANSIENT_RETRY = "transient-retry"  # store or database briefly down: retried later
    FAILED = "failed"

    @property
    def status(self) -> str:
        """The job's status as this worker leaves it (what `run_job` returns)."""
        return _STATUS[self]

    @property
    def keeps_model(self) -> bool:
        return self in (EndReason.SUCCEEDED, EndReason.CANCELED_KEEP, EndReason.TIME_LIMITED_KEPT)


_STATUS = {
    EndReason.SUCCEEDED: "succeeded",
    EndReason.CANCELED_DISCARD: "canceled",
    EndReason.CANCELED_KEEP: "canceled",
    EndReason.TIME_LIMITED_KEPT: "failed",  # failed TIME_LIMIT_EXCEEDED, with its model
    EndReason.TIME_LIMITED_EMPTY: "failed",
    EndReason.HANDED_BACK: "interrupted",
    EndReason.LOST: "lost",
    EndReason.TRANSIENT_RETRY: "retrying",
    EndReason.FAILED: "failed",
}


@dataclass(frozen=True)
class Observed:
    """What an attempt saw by the time it stopped training, or the error that stopped it."""

    error: BaseException | None = None
    lost: bool = False
    shutting_down: bool = False
    canceled: bool = False
    keep_requested: bool = False  # the cancel asked for stop-and-keep
    time_limited: bool = False
    stopped_early: bool = False  # fit returned before its last epoch
    has_model: bool = False  # at least one epoch finished: there is a best model
    attempt: int = 1
    max_attempts: int = 1


def decide_end(seen: Observed) -> EndReason:
    if seen.error is not None:
        if isinstance(seen.error, JobLost):
            return EndReason.LOST
        if is_transient(seen.error) and seen.attempt < seen.max_attempts:
            return EndReason.TRANSIENT_RETRY
        return EndReason.FAILED
    if seen.lost:
        return EndReason.LOST
    # Shutting down wins over the time limit: the job resumes elsewhere with the time it has
    # left. A cancel wins over both: nothing would resume it.
    if seen.shutting_down and seen.stopped_early and not seen.canceled:
        return EndReason.HANDED_BACK
    if seen.canceled:
        keep = seen.keep_requested and seen.has_model
        return EndReason.CANCELED_KEEP if keep else EndReason.CANCELED_DISCARD
    if seen.time_limited:
        return EndReason.TIME_LIMITED_KEPT if seen.has_model else EndReason.TIME_LIMITED_EMPTY
    return EndReason.SUCCEEDED
