"""Time-of-day caps in the site's zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.common.schedule import RateSchedule

BERLIN = ZoneInfo("Europe/Berlin")
MB = 1_000_000


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_ranges_wrap_midnight_and_fall_back_to_the_flat_rate() -> None:
    schedule = RateSchedule.parse("22:00-06:00=15MB, 12:00-13:00=off", default=5 * MB, zone=UTC)
    assert schedule.rate_at(at("2026-05-01T23:30:00+00:00")) == 15 * MB
    assert schedule.rate_at(at("2026-05-01T05:59:59+00:00")) == 15 * MB
    assert schedule.rate_at(at("2026-05-01T06:00:00+00:00")) == 5 * MB
    assert schedule.rate_at(at("2026-05-01T12:30:00+00:00")) == 0
    assert schedule.rate_at(at("2026-05-01T13:00:00+00:00")) == 5 * MB


def test_times_are_the_sites_local_times() -> None:
    schedule = RateSchedule.parse("22:00-24:00=40Mbit", default=MB, zone=BERLIN)
    assert schedule.rate_at(at("2026-07-01T20:30:00+00:00")) == 5 * MB  # 22:30 in Berlin (summer)
    assert schedule.rate_at(at("2026-01-15T20:30:00+00:00")) == MB  # 21:30 in Berlin (winter)
    whole_day = RateSchedule.parse("00:00-24:00=2MB", default=MB, zone=UTC)
    assert whole_day.rate_at(at("2026-01-15T23:59:59+00:00")) == 2 * MB


def test_segments_cover_the_horizon_with_constant_caps() -> None:
    schedule = RateSchedule.parse("22:00-06:00=15MB", default=5 * MB, zone=UTC)
    start = at("2026-05-01T20:00:00+00:00")
    segments = list(schedule.segments(start, timedelta(hours=12)))
    assert [(a.hour, b.hour, r) for a, b, r in segments] == [(20, 22, 5 * MB), (22, 6, 15 * MB), (6, 8, 5 * MB)]
    assert segments[0][0] == start and segments[-1][1] == start + timedelta(hours=12)


def test_a_dst_night_has_the_right_length() -> None:
    # Berlin springs forward on 2026-03-29: the night of 22:00-06:00 lasts 7 hours.
    schedule = RateSchedule.parse("22:00-06:00=15MB", default=5 * MB, zone=BERLIN)
    night = [(a, b) for a, b, r in schedule.segments(at("2026-03-28T12:00:00+00:00"), timedelta(days=1))
             if r == 15 * MB]
    assert night[0][1] - night[0][0] == timedelta(hours=7)


@pytest.mark.parametrize(
    "text", ["22:00=15MB", "25:00-06:00=15MB", "06:00-06:00=1MB", "22:00-06:00=fast",
             "22:00-06:00=15MB, 05:00-07:00=1MB", "24:00-02:00=1MB"],
)
def test_malformed_schedules_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        RateSchedule.parse(text, default=MB, zone=UTC)


def test_a_window_may_set_the_ceiling_of_the_band_above_its_cap_or_turn_the_band_off() -> None:
    schedule = RateSchedule.parse("08:00-18:00=5MB..20MB@0.2, 18:00-20:00=5MB..off, 22:00-06:00=15MB",
                                  default=5 * MB, zone=UTC, ceiling=10 * MB)
    day = at("2026-05-01T12:00:00+00:00")
    assert (schedule.rate_at(day), schedule.ceiling_at(day), schedule.fresh_share_at(day)) == (5 * MB, 20 * MB, 0.2)
    assert schedule.ceiling_at(at("2026-05-01T19:00:00+00:00")) == 0  # no band then
    assert schedule.ceiling_at(at("2026-05-01T23:00:00+00:00")) == 10 * MB  # the default ceiling
    assert schedule.ceiling_at(at("2026-05-01T07:00:00+00:00")) == 10 * MB
    assert RateSchedule.parse("", default=5 * MB, zone=UTC).ceiling_at(day) == 0  # off unless set


@pytest.mark.parametrize(("text", "words"), [
    ("08:00-18:00=5MB..5MB", "not above the rate"),
    ("08:00-18:00=5MB..4MB", "not above the rate"),
    ("08:00-18:00=off..20MB", "needs a cap to stand on"),
    ("08:00-18:00=5MB..lots", "the ceiling"),
    ("08:00-18:00=5MB..", "the ceiling"),
])
def test_a_ceiling_that_is_not_above_its_windows_cap_is_refused(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        RateSchedule.parse(text, default=MB, zone=UTC)
