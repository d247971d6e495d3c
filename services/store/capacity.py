"""Capacity: how full the local store is, early eviction, and the admission decision.

Usage is the last sweep's photo bytes plus what the gateways stored since that
sweep began (the tap hears every first publish within milliseconds, with the
gateway's running total, which also covers photos it stored but could not queue), against
``PHOTOFERRY_STORE_CAPACITY`` and, when known, against the disk itself (MinIO's
metrics, or the embedded store's file system): whichever is fuller.

Nearing the high watermark (half-way from the low one), a sweep evicts shipped
copies early, to just under the low watermark if they suffice; past it with
nothing left to evict, admission closes until usage is under the low watermark.
While admission is open, each decision gives every gateway its share of the room
left under the high watermark (``services/common/admission.py``), so the
watermark holds between decisions.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from services.common.admission import Admission, write_admission
from services.common.config import StoreKeeperConfig
from services.common.localstore import LocalStore, StoreUnavailable
from services.store.disk import Disk, DiskGauge, DiskUnavailable, Usage
from services.store.metrics import KeeperMetrics
from services.store.sweep import SweepResult
from services.store.tap import RateWindow, Tap

log = logging.getLogger(__name__)


class FileSystemGauge:
    """The embedded store's disk, as the file system reports it (statvfs)."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    async def read(self) -> Disk:
        try:
            figures = await self.store.disk()
        except StoreUnavailable as exc:
            raise DiskUnavailable(str(exc)) from None
        assert figures is not None, "a file system gauge measures the embedded store"
        return Disk(total_bytes=figures.total_bytes, free_bytes=figures.free_bytes, read_at=time.monotonic())

    async def close(self) -> None:
        pass


class Capacity:
    def __init__(self, config: StoreKeeperConfig, *, store: LocalStore, tap: Tap, metrics: KeeperMetrics) -> None:
        self.config = config
        self.store = store
        self.tap = tap
        self.metrics = metrics
        self.admission = Admission()
        self.deleted = RateWindow(3600)
        self.gauge: DiskGauge | FileSystemGauge | None = (
            FileSystemGauge(store) if store.kind == "file" else
            DiskGauge(config.store_metrics_url, token=config.store_metrics_token, timeout=config.store.timeout)
            if config.store_metrics_url else None)
        self._swept_bytes: int | None = None  # photo bytes at the last sweep (None before the first)
        self._ingest_at_sweep = 0.0
        self._disk: Disk | None = None
        self._disk_error: str | None = None
        self.evict_bytes = 0  # asked of the next sweep

    def swept(self, result: SweepResult, *, ingest_before: float) -> None:
        """A sweep completed: its count of photo bytes replaces the estimate."""
        self._swept_bytes = result.photo_bytes
        self._ingest_at_sweep = ingest_before
        self.deleted.add(result.deleted_bytes)
        self.evict_bytes = 0

    def used_bytes(self) -> int:
        """Local usage now: the last sweep's, plus what has been queued since it began."""
        if self._swept_bytes is None:
            return 0
        return int(self._swept_bytes + self.tap.stored_heard - self._ingest_at_sweep)

    def usage(self) -> Usage:
        """Usage now; the disk's figures count while they are fresh."""
        disk = self._disk if self._disk is not None and self._disk.fresh(time.monotonic()) else None
        return Usage(photo_bytes=self.used_bytes(), capacity_bytes=self.config.capacity, disk=disk)

    async def read_disk(self) -> None:
        if self.gauge is None:
            return
        try:
            self._disk = await self.gauge.read()
        except DiskUnavailable as exc:
            if str(exc) != self._disk_error:
                log.warning("could not read the store's disk figures; the photo budget alone counts once "
                            "the last reading is a minute old", extra={"error": str(exc)})
            self._disk_error = str(exc)
            return
        if self._disk_error is not None:
            log.info("reading the store's disk figures again", extra={"free_bytes": self._disk.free_bytes,
                                                                     "total_bytes": self._disk.total_bytes})
        self._disk_error = None

    def eviction_wanted(self) -> int:
        """Bytes of shipped copies to evict early now (0: none)."""
        if self._swept_bytes is None:
            return 0
        usage = self.usage()
        high, low = self.config.high_watermark, self.config.low_watermark
        # Evict before the high watermark is reached, and for as long as uploads are refused
        # (photos shipped since the last eviction are evictable too; waiting for the high
        # watermark again would keep uploads refused between the two watermarks for good).
        if usage.fill >= low + (high - low) / 2 or (not self.admission.open and usage.fill >= low):
            return usage.excess_over(low)
        return 0

    async def decide(self, *, evicting: bool) -> None:
        """Decide admission from usage now, and tell the gateways (the decision object)."""
        usage = self.usage()
        high, low = self.config.high_watermark, self.config.low_watermark
        is_open = self.admission.open
        if is_open and usage.fill >= high and not evicting:
            is_open = False
        elif not is_open and usage.fill < low:
            is_open = True
        reason = "" if is_open else (
            f"{usage.fill:.0%} in use ({usage.describe()}), above the {high:.0%} high watermark "
            f"even after evicting shipped copies; uploads resume under {low:.0%}")
        if is_open != self.admission.open:
            log.warning("admission %s", "opened" if is_open else "closed",
                        extra={"used_bytes": usage.photo_bytes, "capacity_bytes": usage.capacity_bytes,
                               "reason": reason})
        gateways = self.tap.gateways()
        self.admission = Admission(open=is_open, reason=reason, used_bytes=usage.photo_bytes,
                                   capacity_bytes=usage.capacity_bytes, decided_at=datetime.now(UTC).isoformat(),
                                   allowance_bytes=usage.room_under(high) // max(1, len(gateways)),
                                   heard_bytes=gateways)
        self.metrics.admission_open.set(1 if is_open else 0)
        self.metrics.used.set(usage.photo_bytes)
        await write_admission(self.store, self.admission)

    async def close(self) -> None:
        if self.gauge is not None:
            await self.gauge.close()
