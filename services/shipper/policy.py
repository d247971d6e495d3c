"""What becomes of a shipping message once the shipper tried it: a pure decision.

``decide(outcome, attempt=…)`` maps how one attempt ended (``None`` for shipped,
else the exception) and how many attempts failed before to one action:

- ``ack``: the photo is in S3 (or was already), or nothing more can be done here;
- ``retry``: a new copy of the message goes through a delay queue and comes back;
  the attempt count grows only when the photo itself may be at fault;
- ``park``: kept on the parking queue with a reason, for an operator;
- ``release``: the message goes back to the queue unacknowledged (the shipper is
  stopping mid-upload), to be shipped by whoever consumes next.

No I/O here: the shipper carries the decision out. Every exception has an
answer, so no delivery is ever left unacknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from services.common.errors import DependencyUnavailable
from services.shipper.failures import (
    Aborted,
    LocalCorrupt,
    LocalMissing,
    LocalUnavailable,
    Rejected,
    Systemic,
    Transient,
)


class Action(StrEnum):
    ACK = "ack"
    RETRY = "retry"
    PARK = "park"
    RELEASE = "release"


class Malformed(Exception):
    """The message is not a shipping message this version understands."""


class DeliveredTooOften(Exception):
    """The broker delivered the message again and again without an acknowledgement."""


@dataclass(frozen=True)
class Decision:
    action: Action
    attempt: int = 0  # the attempt count the next copy of the message carries
    reason: str = ""
    kind: str = ""  # what failed, for the retry metric's label
    trip_breaker: bool = False  # the remote takes nothing now: stop consuming
    transient: bool = False  # counts towards the breaker's failures in a row
    throttled: bool = False  # the remote asked us to slow down


def decide(outcome: BaseException | None, *, attempt: int, max_attempts: int) -> Decision:
    """The action for one attempt's ``outcome``, the ``attempt``-th failure so far excluded."""
    if outcome is None:
        return Decision(Action.ACK, attempt)
    reason = str(outcome) or type(outcome).__name__
    match outcome:
        case Aborted():
            return Decision(Action.RELEASE, attempt, reason)
        case Malformed() | DeliveredTooOften() | LocalMissing():
            return Decision(Action.PARK, attempt, reason)
        case Rejected():
            return Decision(Action.PARK, attempt, f"S3 refused the photo: {reason}")
        case LocalCorrupt() if attempt >= 1:
            return Decision(Action.PARK, attempt, reason)
        case LocalCorrupt():
            # Retried once (a bad read), then parked: the local copy itself is wrong.
            return Decision(Action.RETRY, attempt + 1, reason, kind="local_corrupt")
        case Systemic():
            # Every photo would fail alike: not this photo's attempt.
            return Decision(Action.RETRY, attempt, reason, kind="systemic", trip_breaker=True)
        case LocalUnavailable() | DependencyUnavailable():
            # The site's own store or broker is away: not the photo's fault either.
            return Decision(Action.RETRY, attempt, reason, kind="local_store")
        case Transient():
            return _counted(reason, attempt, max_attempts, kind="transient", transient=True,
                            throttled=outcome.throttled)
        case _:
            # A bug or a case nobody foresaw: retried like a transient failure, so it
            # neither blocks its prefetch slot nor loops forever.
            return _counted(f"{type(outcome).__name__}: {reason}", attempt, max_attempts, kind="unexpected",
                            transient=False)


def _counted(reason: str, attempt: int, max_attempts: int, *, kind: str, transient: bool,
             throttled: bool = False) -> Decision:
    """A failure that counts against the photo: retried until ``max_attempts``, then parked."""
    if attempt + 1 >= max_attempts:
        return Decision(Action.PARK, attempt + 1, f"gave up after {attempt + 1} attempts: {reason}",
                        kind=kind, transient=transient, throttled=throttled)
    return Decision(Action.RETRY, attempt + 1, reason, kind=kind, transient=transient, throttled=throttled)
