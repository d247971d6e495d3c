"""The store keeper's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.httpserver import HttpMetrics
from services.store.sweep import SweepResult


class KeeperMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = HttpMetrics(r, "store")
        self.sweeps = Histogram("photoferry_store_sweep_seconds", "Time one sweep of the store takes",
                                buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600), registry=r)
        self.photos = Gauge("photoferry_store_photos", "Local copies of photos, at the last sweep", registry=r)
        self.backlog = Gauge("photoferry_store_backlog_photos", "Photos not yet shipped, at the last sweep",
                             registry=r)
        self.backlog_bytes = Gauge("photoferry_store_backlog_bytes", "Bytes not yet shipped, at the last sweep",
                                   registry=r)
        self.used = Gauge("photoferry_store_used_bytes", "Bytes the local copies take (estimated)", registry=r)
        self.deleted = Counter("photoferry_store_deleted_bytes", "Bytes of shipped copies deleted", ["why"],
                               registry=r)
        self.reconciled = Counter("photoferry_store_reconciled",
                                  "Photos re-enqueued because they had no shipping message", registry=r)
        self.unaccounted = Gauge("photoferry_store_unaccounted_photos",
                                 "Unshipped photos beyond the messages the broker holds, at the last sweep",
                                 registry=r)
        self.admission_open = Gauge("photoferry_store_admission_open", "1 while gateways take uploads",
                                    registry=r)

    def observe_sweep(self, result: SweepResult, seconds: float, reconciled: int) -> None:
        self.sweeps.observe(seconds)
        self.photos.set(result.photos)
        self.backlog.set(result.unshipped)
        self.backlog_bytes.set(result.unshipped_bytes)
        self.deleted.labels("retention").inc(result.deleted_bytes - result.evicted_bytes)
        self.deleted.labels("capacity").inc(result.evicted_bytes)
        self.reconciled.inc(reconciled)
