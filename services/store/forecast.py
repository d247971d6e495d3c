"""Forecasts for operators: when the backlog drains, when the store fills.

The backlog drains at the cap in force (the operator's override or pause, else the
schedule) or at what the link achieves when shippers report the link as the
limit, less what keeps arriving. The store fills at the ingest rate less what
retention deletes. Both are projections of current rates, not promises.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

from services.common.schedule import RateSchedule
from services.common.shipping import ShippingControl
from services.store.disk import Usage

HORIZON = timedelta(days=7)


def drain_eta_s(
    backlog_bytes: float,
    ingest_bytes_per_s: float,
    *,
    schedule: RateSchedule,
    control: ShippingControl,
    now: datetime,
    link_bytes_per_s: float | None = None,
    horizon: timedelta = HORIZON,
) -> float | None:
    """Seconds until the backlog is gone at these rates, or None if it does not drain within the horizon."""
    if backlog_bytes <= 0:
        return 0.0
    remaining = float(backlog_bytes)
    for start, end in _pieces(schedule, control, now, horizon):
        cap = control.cap(schedule, start)
        sending = min(cap, link_bytes_per_s) if link_bytes_per_s is not None else cap
        net = sending - ingest_bytes_per_s
        length = (end - start).total_seconds()
        if net > 0 and remaining <= net * length:
            return (start - now).total_seconds() + remaining / net
        remaining -= net * length
    return None


def full_eta_s(usage: Usage, ingest_bytes_per_s: float, deleted_bytes_per_s: float) -> float | None:
    """Seconds until the store is full (budget or disk, whichever comes first), or None while not filling."""
    growth = ingest_bytes_per_s - deleted_bytes_per_s
    if growth <= 0:
        return None
    room = usage.capacity_bytes - usage.photo_bytes
    if usage.disk is not None:
        room = min(room, usage.disk.free_bytes)
    return max(0.0, room / growth)


def _pieces(schedule: RateSchedule, control: ShippingControl, now: datetime,
            horizon: timedelta) -> list[tuple[datetime, datetime]]:
    """Spans of constant cap: the schedule's, also cut where a timed pause ends."""
    cuts = {now, now + horizon}
    cuts |= {start for start, _, _ in schedule.segments(now, horizon)}
    if control.paused and control.paused_until:
        until = datetime.fromisoformat(control.paused_until)
        if now < until < now + horizon:
            cuts.add(until)
    edges = sorted(cuts)
    return list(itertools.pairwise(edges))
