"""The operator's shipping settings as stored: what any version wrote is read without surprises."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest

from services.common.schedule import RateSchedule
from services.common.shipping import Heartbeat, ShippingControl

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
    written = ShippingControl(rate_override=5e6, fresh_share_override=0.3, ceiling_override=2e7, paused=True,
                              paused_until="2026-05-02T06:00:00+00:00", updated_at="2026-05-01T12:00:00+00:00")
    assert ShippingControl.from_json(written.to_json()) == written


def test_settings_that_are_not_an_object_are_an_error() -> None:
    with pytest.raises(ValueError):
        ShippingControl.from_json(b"[1, 2]")


SCHEDULE = RateSchedule.parse("08:00-18:00=5MB..20MB, 18:00-20:00=30MB", default=5e6, zone=ZoneInfo("UTC"),
                              ceiling=10e6)


def test_the_ceiling_in_force_is_the_override_else_the_schedules_and_only_above_the_cap() -> None:
    assert ShippingControl().ceiling(SCHEDULE, NOW) == 20e6
    assert ShippingControl().ceiling(SCHEDULE, NOW.replace(hour=22)) == 10e6
    assert ShippingControl().ceiling(SCHEDULE, NOW.replace(hour=19)) == 0  # the cap is above the ceiling then
    assert ShippingControl(ceiling_override=12e6).ceiling(SCHEDULE, NOW) == 12e6
    assert ShippingControl(ceiling_override=0.0).ceiling(SCHEDULE, NOW) == 0  # the operator turned it off
    assert ShippingControl(rate_override=25e6).ceiling(SCHEDULE, NOW) == 0
    assert ShippingControl(paused=True).ceiling(SCHEDULE, NOW) == 0


@pytest.mark.parametrize("value", [-1, "160Mbit", True, float("inf")])
def test_an_unreadable_ceiling_override_is_ignored(value: object) -> None:
    assert control(ceiling_override=value, rate_override=5e6).ceiling_override is None


def test_a_ceiling_override_of_zero_reads_back_as_off() -> None:
    written = ShippingControl(ceiling_override=0.0)
    assert ShippingControl.from_json(written.to_json()).ceiling_override == 0.0
    assert ShippingControl.from_json(ShippingControl(ceiling_override=2e7).to_json()).ceiling_override == 2e7


OLDER_HEARTBEAT = {  # what a replica of the version before the band sends
    "replica": "r1", "state": "running", "busy": True, "cap_bytes_per_s": 5e6, "share_bytes_per_s": 5e6,
    "egress_bytes_per_s": 4.9e6, "fresh_egress_bytes_per_s": 1e6, "sent_bytes_total": 10, "shipped_objects_total": 1,
    "in_flight": 2, "concurrency": 4, "link_limited": False, "breaker_reason": None, "at": "2026-05-01T12:00:00+00:00",
}


def test_heartbeats_of_an_older_and_a_newer_version_are_both_heard() -> None:
    older = Heartbeat.from_json(orjson.dumps(OLDER_HEARTBEAT))
    assert older is not None and older.scavenging == "off" and older.ceiling_bytes_per_s == 0
    newer = Heartbeat.from_json(orjson.dumps({**OLDER_HEARTBEAT, "scavenging": "yielding", "a_later_field": [1]}))
    assert newer is not None and newer.replica == "r1" and newer.scavenging == "yielding"
    assert Heartbeat.from_json(newer.to_json()) == newer


@pytest.mark.parametrize("body", [b"[1]", b"{}", b"not json", orjson.dumps({"replica": "r1"})])
def test_what_is_not_a_heartbeat_is_not_heard(body: bytes) -> None:
    assert Heartbeat.from_json(body) is None
