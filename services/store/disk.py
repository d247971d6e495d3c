"""The local store's disk as MinIO itself reports it, and how full the store is.

(The embedded store's disk is read from its file system: ``capacity.FileSystemGauge``.)

The keeper counts the bytes of photos it keeps (``PHOTOFERRY_STORE_CAPACITY`` is
their budget), but the disk under MinIO can fill for other reasons: other
buckets, versions, a smaller volume than configured. When
``PHOTOFERRY_STORE_METRICS_URL`` points at MinIO's cluster metrics
(``http://minio:9000/minio/v2/metrics/cluster``; MinIO needs
``MINIO_PROMETHEUS_AUTH_TYPE=public`` or a bearer token from
``mc admin prometheus generate`` in ``PHOTOFERRY_STORE_METRICS_TOKEN``), the
watermarks apply to whichever is fuller: the photo budget or the disk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from services.common.errors import DependencyUnavailable

log = logging.getLogger(__name__)

TOTAL_METRIC = "minio_cluster_capacity_usable_total_bytes"
FREE_METRIC = "minio_cluster_capacity_usable_free_bytes"
STALE_AFTER_S = 60.0  # an older reading is not trusted for admission


class DiskUnavailable(DependencyUnavailable):
    """MinIO's metrics could not be read or did not say how big the disk is."""


@dataclass(frozen=True)
class Disk:
    total_bytes: int
    free_bytes: int
    read_at: float  # time.monotonic()

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes

    def fresh(self, now: float) -> bool:
        return now - self.read_at <= STALE_AFTER_S


def parse_disk(text: str, *, read_at: float) -> Disk:
    """The usable capacity and free space in a MinIO cluster metrics page."""
    found: dict[str, list[float]] = {TOTAL_METRIC: [], FREE_METRIC: []}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in found:
                    found[sample.name].append(sample.value)
    except ValueError as exc:
        raise DiskUnavailable(f"the metrics page is not in the Prometheus text format: {exc}") from None
    missing = [name for name, values in found.items() if not values]
    if missing:
        raise DiskUnavailable(f"the metrics page has no {' or '.join(missing)} (is it MinIO's cluster metrics?)")
    # One sample each on a cluster page; should a node repeat them, take the fuller view.
    total, free = int(max(found[TOTAL_METRIC])), int(min(found[FREE_METRIC]))
    if total <= 0 or not 0 <= free <= total:
        raise DiskUnavailable(f"implausible disk figures: {free} free of {total} bytes")
    return Disk(total_bytes=total, free_bytes=free, read_at=read_at)


class DiskGauge:
    """Reads MinIO's cluster metrics over HTTP."""

    def __init__(self, url: str, *, token: str | None, timeout: float) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def read(self) -> Disk:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(self.url, headers=self._headers) as response:
                if response.status != 200:
                    raise DiskUnavailable(f"{self.url} answered {response.status}"
                                          + (" (a token is needed?)" if response.status in (401, 403) else ""))
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DiskUnavailable(f"{self.url} could not be read: {exc or type(exc).__name__}") from None
        return parse_disk(text, read_at=time.monotonic())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass(frozen=True)
class Usage:
    """How full the store is: photo bytes against their budget, and the disk when known."""

    photo_bytes: int
    capacity_bytes: int
    disk: Disk | None = None

    @property
    def fill(self) -> float:
        budget = self.photo_bytes / self.capacity_bytes
        if self.disk is None:
            return budget
        return max(budget, self.disk.used_bytes / self.disk.total_bytes)

    def excess_over(self, fraction: float) -> int:
        """Bytes to delete to come under ``fraction`` full (0 when already under)."""
        excess = self.photo_bytes - fraction * self.capacity_bytes
        if self.disk is not None:
            excess = max(excess, self.disk.used_bytes - fraction * self.disk.total_bytes)
        return max(0, int(excess) + 1)

    def room_under(self, fraction: float) -> int:
        """Bytes that may still be stored before ``fraction`` full (0 when already past it)."""
        room = fraction * self.capacity_bytes - self.photo_bytes
        if self.disk is not None:
            room = min(room, fraction * self.disk.total_bytes - self.disk.used_bytes)
        return max(0, int(room))

    def describe(self) -> str:
        text = f"{self.photo_bytes} of {self.capacity_bytes} bytes of photos"
        if self.disk is not None:
            text += f", disk {self.disk.free_bytes} of {self.disk.total_bytes} bytes free"
        return text
