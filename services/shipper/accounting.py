"""What the shipper sent and shipped: egress figures, metrics, and the list for the store keeper.

Nothing here decides anything: the pace loop calls ``tick`` once a round, the
handlers ``shipped`` once a photo is in S3, and the peers' loop takes the
photos shipped since its last notice (``take_shipped``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime

from services.common import photos
from services.shipper.lanes import Lane
from services.shipper.limiter import RateLimiter
from services.shipper.metrics import ShipperMetrics
from services.shipper.transfer import Shipment

log = logging.getLogger(__name__)

SHIPPED_KEPT = 20_000  # photos awaiting a notice at most (the keeper's sweep corrects what is dropped)


class Accounting:
    def __init__(self, metrics: ShipperMetrics, limiter: RateLimiter, lanes: Iterable[Lane]) -> None:
        self.metrics = metrics
        self._limiter = limiter
        self._lanes = tuple(lanes)
        self.egress = 0.0  # bytes per second, recent
        self.shipped_objects = 0
        self._last_granted = limiter.granted
        self._last_tick: float | None = None
        # (id, size, lag in seconds, class): told to the store keeper in the next notice.
        self._just_shipped: list[tuple[str, int, float, str]] = []

    def tick(self, now: float) -> None:
        """Egress over the last round, overall and per lane (smoothed), into the metrics."""
        elapsed = max(now - self._last_tick, 1e-3) if self._last_tick is not None else 1.0
        granted = self._limiter.granted
        self.metrics.sent_bytes.inc(granted - self._last_granted)
        self.egress = 0.7 * self.egress + 0.3 * (granted - self._last_granted) / elapsed
        self._last_granted, self._last_tick = granted, now
        for lane in self._lanes:
            lane_granted = lane.limiter.granted
            lane.egress = 0.7 * lane.egress + 0.3 * (lane_granted - lane.last_granted) / elapsed
            self.metrics.class_sent_bytes.labels(lane.name).inc(lane_granted - lane.last_granted)
            lane.last_granted = lane_granted
            self.metrics.lane_egress.labels(lane.name).set(lane.egress)
        self.metrics.egress.set(self.egress)

    def shipped(self, lane: Lane, job: photos.PhotoMessage, shipment: Shipment | None, *, attempt: int,
                duration_s: float) -> None:
        """A photo is in S3 (``shipment`` None: its marker said so before anything was sent)."""
        uploaded = shipment is not None and shipment.uploaded
        if shipment is not None:
            lag = max(0.0, (datetime.now(UTC) - datetime.fromisoformat(job.received_at)).total_seconds())
            self._just_shipped.append((job.id, job.size, round(lag, 3), lane.name))
            del self._just_shipped[:-SHIPPED_KEPT]
            self.shipped_objects += 1
            lane.concurrency.record_sent(shipment.body_bytes)
            self.metrics.lag.labels(lane.name).observe(lag)
            log.info("photo shipped" if uploaded else "photo already in S3",
                     extra={"photo_id": job.id, "size": job.size, "remote_key": shipment.remote_key,
                            "duration_ms": round(duration_s * 1000), "lag_s": round(lag, 1), "attempt": attempt,
                            "class": lane.name})
        if uploaded:
            assert shipment is not None
            self.metrics.shipped_objects.inc()
            self.metrics.shipped_bytes.inc(shipment.body_bytes)
        else:
            self.metrics.duplicates.inc()

    def take_shipped(self, most: int) -> list[tuple[str, int, float, str]]:
        batch, self._just_shipped = self._just_shipped[:most], self._just_shipped[most:]
        return batch

    def put_back(self, batch: list[tuple[str, int, float, str]]) -> None:
        """A notice could not be sent: its photos go in the next one."""
        self._just_shipped[:0] = batch
        del self._just_shipped[:-SHIPPED_KEPT]
