"""The backlog as it is now, not as the last sweep saw it.

A sweep counts the unshipped photos, but it runs every few minutes. Between
sweeps the keeper hears every photo queued for the first time (the tap) and
every photo the shippers mark shipped (their notices), so the backlog follows
uploads and shipments within seconds:

    now = the sweep's unshipped + queued since - shipped since

When a sweep completes, what it already counted is dropped from both sides: a
photo queued while the sweep ran and listed by it as unshipped is in its count;
a shipment is kept only while it concerns a photo of that count or one queued
since. The sweep is the periodic correction for whatever was missed (the keeper
restarting, a notice lost).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from services.store.tap import id_hash


@dataclass(frozen=True)
class Backlog:
    photos: int
    bytes: int
    oldest: datetime | None  # when the oldest photo still waiting was stored


class LiveBacklog:
    def __init__(self) -> None:
        self._swept_photos = 0
        self._swept_bytes = 0
        self._swept_oldest: datetime | None = None
        self._swept_ids: set[int] = set()
        self._queued: dict[int, tuple[int, float]] = {}  # id hash -> (size, received, epoch s)
        self._shipped: dict[int, int] = {}  # id hash -> size

    def queued(self, photo_id: str, size: int, received: float) -> None:
        """A photo was queued for the first time."""
        self._queued[id_hash(photo_id)] = (size, received)

    def shipped(self, photo_id: str, size: int) -> None:
        """A shipper marked a photo shipped."""
        self._shipped[id_hash(photo_id)] = size

    def swept(self, *, photos: int, bytes_: int, oldest: datetime | None, unshipped_ids: set[int]) -> None:
        """A sweep completed: its count replaces what it already covers."""
        self._swept_photos, self._swept_bytes, self._swept_oldest = photos, bytes_, oldest
        self._swept_ids = unshipped_ids
        self._queued = {h: v for h, v in self._queued.items() if h not in unshipped_ids}
        self._shipped = {h: v for h, v in self._shipped.items() if h in unshipped_ids or h in self._queued}

    def now(self) -> Backlog:
        shipped_of_swept = [size for h, size in self._shipped.items() if h in self._swept_ids]
        waiting_new = {h: v for h, v in self._queued.items() if h not in self._shipped}
        photos = self._swept_photos - len(shipped_of_swept) + len(waiting_new)
        size = self._swept_bytes - sum(shipped_of_swept) + sum(s for s, _ in waiting_new.values())
        if self._swept_photos - len(shipped_of_swept) > 0:
            oldest = self._swept_oldest  # shippers take the oldest first: an upper bound on the age
        elif waiting_new:
            oldest = datetime.fromtimestamp(min(received for _, received in waiting_new.values()), UTC)
        else:
            oldest = None
        return Backlog(photos=max(0, photos), bytes=max(0, size), oldest=oldest)


class LagWindow:
    """Seconds from receipt to S3 of the photos shipped lately, by class, for percentiles."""

    def __init__(self, span_s: float = 600.0) -> None:
        self.span_s = span_s
        self._shipped: deque[tuple[float, float, str]] = deque()  # (when, lag, class)

    def add(self, lag_s: float, kind: str, now: float | None = None) -> None:
        self._shipped.append((time.time() if now is None else now, lag_s, kind))

    def percentiles(self, kind: str, now: float | None = None) -> dict[str, float | int | None]:
        """p50 and p99 of the lag of ``kind`` over the span, and how many photos that is."""
        cutoff = (time.time() if now is None else now) - self.span_s
        while self._shipped and self._shipped[0][0] < cutoff:
            self._shipped.popleft()
        lags = sorted(lag for _, lag, k in self._shipped if k == kind)
        if not lags:
            return {"p50_s": None, "p99_s": None, "photos": 0}
        return {"p50_s": round(_rank(lags, 0.5), 2), "p99_s": round(_rank(lags, 0.99), 2), "photos": len(lags)}


def _rank(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank)."""
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]

