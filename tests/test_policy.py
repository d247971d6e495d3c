"""What becomes of a message after one attempt: every outcome has an answer."""

from __future__ import annotations

import pytest

from services.common.broker import BrokerUnavailable
from services.common.localstore import StoreUnavailable
from services.shipper.failures import (
    Aborted,
    LocalCorrupt,
    LocalMissing,
    LocalUnavailable,
    Rejected,
    Systemic,
    Transient,
)
from services.shipper.policy import Action, DeliveredTooOften, Malformed, decide

MAX = 8


def test_shipped_is_acknowledged() -> None:
    assert decide(None, attempt=3, max_attempts=MAX).action is Action.ACK


@pytest.mark.parametrize("outcome", [LocalMissing("no local object"), Rejected("InvalidObjectName"),
                                     Malformed("not JSON"), DeliveredTooOften("delivered 10 times")])
def test_what_retrying_cannot_fix_is_parked_with_its_reason(outcome: Exception) -> None:
    decision = decide(outcome, attempt=0, max_attempts=MAX)
    assert decision.action is Action.PARK
    assert str(outcome) in decision.reason


def test_a_corrupt_local_copy_is_read_once_more_then_parked() -> None:
    first = decide(LocalCorrupt("SHA-256 differs"), attempt=0, max_attempts=MAX)
    assert (first.action, first.attempt, first.kind) == (Action.RETRY, 1, "local_corrupt")
    assert decide(LocalCorrupt("SHA-256 differs"), attempt=1, max_attempts=MAX).action is Action.PARK


def test_transient_failures_count_until_the_last_attempt() -> None:
    decision = decide(Transient("503 SlowDown", throttled=True), attempt=2, max_attempts=MAX)
    assert (decision.action, decision.attempt, decision.transient, decision.throttled) == (
        Action.RETRY, 3, True, True)
    last = decide(Transient("reset"), attempt=MAX - 1, max_attempts=MAX)
    assert last.action is Action.PARK and last.attempt == MAX and "gave up after 8 attempts" in last.reason


@pytest.mark.parametrize("outcome", [Systemic("InvalidAccessKeyId"), LocalUnavailable("store down"),
                                     StoreUnavailable("store down"), BrokerUnavailable("broker down")])
def test_failures_that_are_not_the_photos_do_not_count_against_it(outcome: Exception) -> None:
    decision = decide(outcome, attempt=7, max_attempts=MAX)
    assert (decision.action, decision.attempt) == (Action.RETRY, 7)
    assert decision.trip_breaker is isinstance(outcome, Systemic)


def test_an_unforeseen_exception_is_retried_and_eventually_parked_never_left_hanging() -> None:
    decision = decide(KeyError("surprise"), attempt=0, max_attempts=MAX)
    assert (decision.action, decision.attempt, decision.kind) == (Action.RETRY, 1, "unexpected")
    assert not decision.transient  # a bug is not a sign that the remote is down
    assert decide(ValueError("again"), attempt=MAX - 1, max_attempts=MAX).action is Action.PARK


def test_an_upload_abandoned_at_a_stop_is_released_to_the_queue() -> None:
    assert decide(Aborted("stopping"), attempt=0, max_attempts=MAX).action is Action.RELEASE
