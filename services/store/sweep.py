"""One pass over the local store: what is stored, shipped, parked, and what to delete.

The photo objects (``photos/``) and their markers (``shipped/``, ``parked/``) share
key suffixes and S3 lists keys in order, so the three listings are merged as
streams, one page (1,000 keys) each at a time: memory stays flat however many
objects there are, and a sweep costs about three list requests per 1,000 photos.

On the way it deletes, in batches:

- local copies that are shipped and older than the retention (never an unshipped one);
- under capacity pressure, shipped copies early, in key order (capture order: the
  oldest first), until enough bytes are freed;
- shipped markers whose photo is long gone (a retry of such an old photo would be
  stored again and recognised in S3 by its checksum, so nothing ships twice), and
  parked markers of photos that have shipped since.

It keeps reconcile candidates (unshipped, unparked photos): the oldest of those
that never had a shipping message as far as the caller knows (``seen``), then the
oldest of the others; and when each device last stored a photo.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common import photos
from services.common.localstore import LocalStore
from services.store.tap import id_hash

log = logging.getLogger(__name__)

DELETE_BATCH = 1000
# Markers of photos whose local copy is gone are kept this long past the retention.
MARKER_GRACE = timedelta(days=7)


@dataclass(frozen=True)
class Orphan:
    """A photo stored but neither shipped nor parked (a reconcile candidate)."""

    stored_at: datetime
    id: str


@dataclass
class SweepResult:
    started_at: datetime
    finished_at: datetime | None = None
    photos: int = 0  # local copies
    photo_bytes: int = 0
    unshipped: int = 0  # neither shipped nor parked
    unshipped_bytes: int = 0
    oldest_unshipped: datetime | None = None
    parked: int = 0
    shipped_local: int = 0  # shipped, local copy still kept
    deleted: int = 0  # local copies deleted by retention or eviction
    deleted_bytes: int = 0
    evicted_bytes: int = 0  # of those, deleted early under pressure
    markers_deleted: int = 0
    orphans: list[Orphan] = field(default_factory=list)  # never-seen oldest first, then seen oldest first
    unshipped_ids: set[int] = field(default_factory=set)  # hashes (id_hash) of the unshipped photos
    devices: dict[str, datetime] = field(default_factory=dict)  # device -> last photo stored

    @property
    def duration_s(self) -> float:
        return ((self.finished_at or self.started_at) - self.started_at).total_seconds()


class _Deleter:
    def __init__(self, store: LocalStore) -> None:
        self._store = store
        self._pending: list[str] = []

    async def add(self, key: str) -> None:
        self._pending.append(key)
        if len(self._pending) >= DELETE_BATCH:
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        await self._store.delete_many(pending)


async def _entries(store: LocalStore, prefix: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(key suffix, listing item) in key order."""
    cut = len(prefix)
    async for page in store.list(prefix):
        for item in page:
            yield item["path"][cut:], item


class _Stream:
    """A sorted listing with a look-ahead of one entry."""

    def __init__(self, entries: AsyncIterator[tuple[str, dict[str, Any]]]) -> None:
        self._entries = entries
        self.head: tuple[str, dict[str, Any]] | None = None

    async def advance(self) -> None:
        self.head = await anext(self._entries, None)

    def take_if(self, suffix: str) -> dict[str, Any] | None:
        """The head's item when it is for ``suffix`` (the caller then advances)."""
        if self.head is not None and self.head[0] == suffix:
            return self.head[1]
        return None


async def sweep(
    store: LocalStore,
    *,
    now: datetime,
    retain: timedelta,
    evict_bytes: int = 0,
    orphan_grace: timedelta = timedelta(minutes=1),
    orphan_limit: int = 10_000,
    seen: Callable[[str], bool] = lambda photo_id: False,
) -> SweepResult:
    """Walk the local store once; delete what retention and pressure allow; report the rest."""
    result = SweepResult(started_at=now)
    deleter = _Deleter(store)
    streams = {
        "photo": _Stream(_entries(store, photos.PHOTOS_PREFIX)),
        "shipped": _Stream(_entries(store, photos.SHIPPED_PREFIX)),
        "parked": _Stream(_entries(store, photos.PARKED_PREFIX)),
    }
    for stream in streams.values():
        await stream.advance()
    # The orphan_limit oldest candidates of each kind: heaps of (-stored time, id), newest kept on top.
    orphans: dict[bool, list[tuple[float, str]]] = {False: [], True: []}
    while heads := [s.head[0] for s in streams.values() if s.head is not None]:
        suffix = min(heads)
        photo = streams["photo"].take_if(suffix)
        shipped = streams["shipped"].take_if(suffix)
        parked = streams["parked"].take_if(suffix)
        photo_id = photos.id_from_key(suffix)
        if photo is not None:
            await _visit_photo(result, deleter, photo, photo_id, shipped=shipped is not None,
                               parked=parked is not None, now=now, retain=retain, evict_bytes=evict_bytes,
                               orphan_grace=orphan_grace, orphans=orphans, orphan_limit=orphan_limit,
                               seen=seen)
        elif shipped is not None and shipped["last_modified"] <= now - retain - MARKER_GRACE:
            await deleter.add(shipped["path"])
            result.markers_deleted += 1
        if parked is not None:
            if shipped is not None:  # replayed and shipped since: the reason is history
                await deleter.add(parked["path"])
                result.markers_deleted += 1
            else:
                result.parked += 1
        for stream in streams.values():
            if stream.head is not None and stream.head[0] == suffix:
                await stream.advance()
    await deleter.flush()
    result.orphans = [
        Orphan(datetime.fromtimestamp(-negated, UTC), photo_id)
        for kind in (False, True)
        for negated, photo_id in sorted(orphans[kind], reverse=True)
    ][:orphan_limit]
    return result


async def _visit_photo(
    result: SweepResult,
    deleter: _Deleter,
    item: dict[str, Any],
    photo_id: str,
    *,
    shipped: bool,
    parked: bool,
    now: datetime,
    retain: timedelta,
    evict_bytes: int,
    orphan_grace: timedelta,
    orphans: dict[bool, list[tuple[float, str]]],
    orphan_limit: int,
    seen: Callable[[str], bool],
) -> None:
    size, stored_at = int(item["size"]), item["last_modified"]
    if photos.is_photo_id(photo_id):
        device = photos.owner_of(photo_id)
        previous = result.devices.get(device)
        if previous is None or stored_at > previous:
            result.devices[device] = stored_at
    if shipped:
        expired = stored_at <= now - retain
        evict = not expired and result.evicted_bytes < evict_bytes
        if expired or evict:
            await deleter.add(item["path"])
            result.deleted += 1
            result.deleted_bytes += size
            if evict:
                result.evicted_bytes += size
            return
        result.shipped_local += 1
    elif not parked:
        result.unshipped += 1
        result.unshipped_bytes += size
        result.unshipped_ids.add(id_hash(photo_id))
        if result.oldest_unshipped is None or stored_at < result.oldest_unshipped:
            result.oldest_unshipped = stored_at
        if stored_at <= now - orphan_grace:
            heap = orphans[seen(photo_id)]
            candidate = (-stored_at.timestamp(), photo_id)
            if len(heap) < orphan_limit:
                heapq.heappush(heap, candidate)
            elif candidate > heap[0]:  # older than the newest kept
                heapq.heapreplace(heap, candidate)
    result.photos += 1
    result.photo_bytes += size
