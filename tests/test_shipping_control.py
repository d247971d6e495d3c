"""The operator's shipping settings as stored: what any version wrote is read without surprises."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest

from services.common.schedule import RateSchedule
from services.common.shipping import ShippingControl

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def control(**fields: object) -> ShippingControl:
    return ShippingControl.from_json(orjson.dumps(fields))


@pytest.mark.parametrize("until", ["2026-05-01T13:00:00", "tomorrow", 17, "2026-13-01T00:00:00Z"])
def test_a_pause_whose_end_cannot_be_read_stays_a_pause(until: object) -> None:
    stored = control(paused=True, paused_until=until)
    assert stored.is_paused(NOW) and stored.is_paused(NOW + timedelta(days=365))
    assert stored.cap(RateSchedule.parse("", default=5e6, zone=ZoneInfo("UTC")), NOW) == 0


def test_a_pause_until_a_time_ends_then() -> None:
    stored = control(paused=True, paused_until="2026-05-01T14:00:00+02:00")
    assert stored.is_paused(NOW - timedelta(minutes=1))
    assert not stored.is_paused(NOW)


@pytest.mark.parametrize(("field", "value"), [
    ("rate_override", -5), ("rate_override", "40Mbit"), ("rate_override", True),
    ("fresh_share_override", 1.5), ("fresh_share_override", "half"),
])
def test_an_unreadable_override_is_ignored_and_the_rest_kept(field: str, value: object) -> None:
    stored = control(paused=True, **{field: value})
    assert getattr(stored, field) is None
    assert stored.paused


def test_what_the_operator_api_writes_reads_back_the_same() -> None:
    written = ShippingControl(rate_override=5e6, fresh_share_override=0.3, paused=True,
                              paused_until="2026-05-02T06:00:00+00:00", updated_at="2026-05-01T12:00:00+00:00")
    assert ShippingControl.from_json(written.to_json()) == written


def test_settings_that_are_not_an_object_are_an_error() -> None:
    with pytest.raises(ValueError):
        ShippingControl.from_json(b"[1, 2]")
