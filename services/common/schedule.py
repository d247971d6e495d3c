"""Time-of-day egress caps (``PHOTOFERRY_SHIP_SCHEDULE``) in the site's time zone.

    PHOTOFERRY_SHIP_SCHEDULE="22:00-06:00=120Mbit@0.2, 08:00-18:00=40Mbit..160Mbit, 12:00-13:00=off"

Each entry is a local-time range ``HH:MM-HH:MM`` (it may wrap midnight; ``24:00``
ends a day) and a rate in the units of ``PHOTOFERRY_SHIP_RATE``, or ``off`` to
send nothing then; ``..ceiling`` optionally sets the ceiling of the band above the
cap where the shipper uses only idle uplink (``PHOTOFERRY_SHIP_CEILING``
otherwise; ``..off``: no band then); ``@share`` optionally sets the share of the
cap fresh photos get then (``PHOTOFERRY_SHIP_FRESH_SHARE`` otherwise). Times
outside every range use the flat ``PHOTOFERRY_SHIP_RATE`` and
``PHOTOFERRY_SHIP_CEILING``. Ranges may not overlap. Time zone changes (DST)
follow the site's zone.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from services.common.units import parse_fraction, parse_rate

_ENTRY = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*=\s*([^@\s]+)\s*(?:@\s*(\S+)\s*)?")
MINUTES_PER_DAY = 24 * 60


@dataclass(frozen=True)
class Window:
    start: int  # minutes after local midnight, 0..1439
    end: int  # exclusive, 1..1440; below start when the window wraps midnight
    rate: float  # bytes per second; 0 means off
    fresh_share: float | None = None  # of the cap, for fresh photos; None: the default
    ceiling: float | None = None  # of the band above the cap, bytes per second; 0: none; None: the default

    def covers(self, minute: float) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


@dataclass(frozen=True)
class RateSchedule:
    default: float
    windows: tuple[Window, ...]
    zone: ZoneInfo
    fresh_share: float = 0.5  # outside windows that set their own
    ceiling: float = 0.0  # of the band above the cap, outside windows that set their own; 0: no band

    @classmethod
    def parse(cls, text: str, *, default: float, zone: ZoneInfo, fresh_share: float = 0.5,
              ceiling: float = 0.0) -> RateSchedule:
        """Parse a schedule; raise ValueError naming the entry that is wrong."""
        windows: list[Window] = []
        for raw in filter(str.strip, re.split(r"[,;]", text)):
            match = _ENTRY.fullmatch(raw)
            if not match:
                raise ValueError(f"{raw.strip()!r} is not HH:MM-HH:MM=RATE (or =off), optionally ..CEILING "
                                 "(or ..off) and @FRESH_SHARE")
            h1, m1, h2, m2, rate_text, share_text = match.groups()
            rate_text, band, ceiling_text = rate_text.partition("..")
            start, end = _minutes(int(h1), int(m1), raw), _minutes(int(h2), int(m2), raw)
            if start == MINUTES_PER_DAY:
                raise ValueError(f"{raw.strip()!r} starts at 24:00; start at 00:00")
            if start == end:
                raise ValueError(f"{raw.strip()!r} is an empty range")
            rate = 0.0 if rate_text.lower() == "off" else parse_rate(rate_text)
            share = parse_fraction(share_text) if share_text is not None else None
            window_ceiling = _ceiling(raw, rate, ceiling_text) if band else None
            window = Window(start, end, rate, share, window_ceiling)
            for other in windows:
                if _overlap(window, other):
                    raise ValueError(f"{raw.strip()!r} overlaps another range")
            windows.append(window)
        return cls(default=default, windows=tuple(windows), zone=zone, fresh_share=fresh_share, ceiling=ceiling)

    def rate_at(self, moment: datetime) -> float:
        """The cap in force at an (aware) moment, in bytes per second."""
        window = self._window_at(moment)
        return self.default if window is None else window.rate

    def fresh_share_at(self, moment: datetime) -> float:
        """The share of the cap fresh photos may take at an (aware) moment."""
        window = self._window_at(moment)
        if window is None or window.fresh_share is None:
            return self.fresh_share
        return window.fresh_share

    def ceiling_at(self, moment: datetime) -> float:
        """The ceiling of the band above the cap at an (aware) moment; 0 when there is none."""
        window = self._window_at(moment)
        if window is None or window.ceiling is None:
            return self.ceiling
        return window.ceiling

    def _window_at(self, moment: datetime) -> Window | None:
        local = moment.astimezone(self.zone)
        minute = local.hour * 60 + local.minute + local.second / 60
        return next((window for window in self.windows if window.covers(minute)), None)

    def segments(self, start: datetime, horizon: timedelta) -> Iterator[tuple[datetime, datetime, float]]:
        """Yield (from, to, rate) pieces of constant cap covering [start, start + horizon)."""
        end = start + horizon
        boundaries = sorted({b for b in self._boundaries(start, end) if start < b < end})
        edges = [start, *boundaries, end]
        for left, right in itertools.pairwise(edges):
            yield left, right, self.rate_at(left)

    def _boundaries(self, start: datetime, end: datetime) -> Iterator[datetime]:
        day = start.astimezone(self.zone).date() - timedelta(days=1)
        last = end.astimezone(self.zone).date() + timedelta(days=1)
        while day <= last:
            for window in self.windows:
                for minute in (window.start, window.end):
                    # Wall-clock arithmetic on an aware local time: 24:00 is the next midnight.
                    local = datetime.combine(day, time(0), self.zone) + timedelta(minutes=minute)
                    yield local.astimezone(UTC)
            day += timedelta(days=1)


def _ceiling(raw: str, rate: float, text: str) -> float:
    """A window's ``..CEILING``: above the window's rate, or ``off`` (0)."""
    if text.strip().lower() == "off":
        return 0.0
    if rate <= 0:
        raise ValueError(f"{raw.strip()!r} is off: a band above the cap needs a cap to stand on "
                         "(give the window a small rate instead)")
    try:
        ceiling = parse_rate(text)
    except ValueError as exc:
        raise ValueError(f"{raw.strip()!r}: the ceiling: {exc}") from None
    if ceiling <= rate:
        raise ValueError(f"{raw.strip()!r}: the ceiling {text.strip()} is not above the rate")
    return ceiling


def _minutes(hour: int, minute: int, raw: str) -> int:
    if not (0 <= hour <= 24 and 0 <= minute < 60) or (hour == 24 and minute):
        raise ValueError(f"{raw.strip()!r} has a time outside 00:00..24:00")
    return hour * 60 + minute


def _overlap(a: Window, b: Window) -> bool:
    def minutes(w: Window) -> set[int]:
        if w.start < w.end:
            return set(range(w.start, w.end))
        return set(range(w.start, MINUTES_PER_DAY)) | set(range(0, w.end))

    return bool(minutes(a) & minutes(b))
