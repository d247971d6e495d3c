"""Operator forecasts: ETA to drain under a schedule, and when the store fills."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.common.schedule import RateSchedule
from services.common.shipping import ShippingControl
from services.store.disk import Disk, Usage
from services.store.forecast import drain_eta_s, full_eta_s

MB = 1_000_000
NOON = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
FLAT = RateSchedule.parse("", default=5 * MB, zone=UTC)


def test_drains_at_the_cap_less_what_arrives() -> None:
    # 100 MB at 5 MB/s out and 1 MB/s in: 25 s.
    assert drain_eta_s(100 * MB, 1 * MB, schedule=FLAT, control=ShippingControl(), now=NOON) == pytest.approx(25)


def test_the_sites_deficit_never_drains_at_a_flat_rate() -> None:
    # The site's own numbers: 8.33 MB/s in, 5 MB/s out.
    assert drain_eta_s(1, 8.33 * MB, schedule=FLAT, control=ShippingControl(), now=NOON) is None


def test_a_night_rate_drains_the_day_backlog() -> None:
    schedule = RateSchedule.parse("22:00-06:00=15MB", default=5 * MB, zone=UTC)
    # From noon the backlog grows 3.33 MB/s until 22:00, then shrinks at 6.67 MB/s.
    eta = drain_eta_s(10_000 * MB, 8.33 * MB, schedule=schedule, control=ShippingControl(), now=NOON)
    backlog_at_ten = 10_000 * MB + 3.33 * MB * 10 * 3600
    assert eta == pytest.approx(10 * 3600 + backlog_at_ten / (6.67 * MB), rel=1e-6)


def test_a_pause_until_a_time_delays_the_drain_and_an_override_replaces_the_schedule() -> None:
    until = (NOON + timedelta(minutes=10)).isoformat()
    paused = ShippingControl(paused=True, paused_until=until)
    assert drain_eta_s(50 * MB, 0, schedule=FLAT, control=paused, now=NOON) == pytest.approx(600 + 10)
    assert drain_eta_s(50 * MB, 0, schedule=FLAT, control=ShippingControl(paused=True), now=NOON) is None
    faster = ShippingControl(rate_override=10 * MB)
    assert drain_eta_s(50 * MB, 0, schedule=FLAT, control=faster, now=NOON) == pytest.approx(5)


def test_a_slow_link_sets_the_pace() -> None:
    assert drain_eta_s(50 * MB, 0, schedule=FLAT, control=ShippingControl(), now=NOON,
                       link_bytes_per_s=2 * MB) == pytest.approx(25)


def test_store_fills_at_ingest_less_deletions() -> None:
    usage = Usage(photo_bytes=1_000 * MB, capacity_bytes=2_000 * MB)
    assert full_eta_s(usage, 8 * MB, 3 * MB) == pytest.approx(200)
    assert full_eta_s(usage, 3 * MB, 3 * MB) is None


def test_the_disk_fills_first_when_it_has_less_room_than_the_budget() -> None:
    disk = Disk(total_bytes=1_500 * MB, free_bytes=250 * MB, read_at=0.0)
    usage = Usage(photo_bytes=1_000 * MB, capacity_bytes=2_000 * MB, disk=disk)
    assert full_eta_s(usage, 8 * MB, 3 * MB) == pytest.approx(50)
