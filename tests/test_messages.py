"""Which copies of a shipping message are new ingest: the store keeper counts only those."""

from __future__ import annotations

import pytest

from services.common import messages


def headers_of(origin: str, **extra: object) -> dict[str, object]:
    return {**dict(messages.shipping_message(b"{}", origin=origin).headers or {}), **extra}


def test_the_gateways_first_copy_is_new_ingest() -> None:
    assert messages.is_first_publish(headers_of(messages.UPLOAD))


@pytest.mark.parametrize("origin", [messages.DEVICE_RETRY, messages.RETRY, messages.REPLAY, messages.RECONCILE,
                                    messages.DEMOTED])
def test_every_other_copy_is_not(origin: str) -> None:
    assert not messages.is_first_publish(headers_of(origin))


def test_a_fresh_photo_the_broker_moved_to_the_backlog_is_not_counted_again() -> None:
    # Expired or pushed out of the fresh queue: the broker republishes it with its headers and x-death.
    moved = headers_of(messages.UPLOAD, **{"x-death": [{"queue": "photoferry.fresh", "reason": "maxlen"}]})
    assert not messages.is_first_publish(moved)
