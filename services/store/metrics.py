"""The store keeper's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from typing import Any

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
        # The operator's figures, as /api/status has them (live, refreshed every few seconds).
        self.backlog = Gauge("photoferry_store_backlog_photos", "Photos not yet shipped", registry=r)
        self.backlog_bytes = Gauge("photoferry_store_backlog_bytes", "Bytes not yet shipped", registry=r)
        self.oldest_age = Gauge("photoferry_store_oldest_unshipped_age_seconds",
                                "How long the oldest photo not yet shipped has waited (0 when none waits)", registry=r)
        self.drain_eta = Gauge("photoferry_store_drain_eta_seconds",
                               "When the backlog drains at current rates under the schedule (+Inf: never)",
                               registry=r)
        self.ingest = Gauge("photoferry_store_ingest_bytes_per_second", "Photo bytes queued, last minute",
                            registry=r)
        self.egress = Gauge("photoferry_store_egress_bytes_per_second", "Bytes sent to S3, all shippers",
                            registry=r)
        self.cap = Gauge("photoferry_store_cap_bytes_per_second", "The egress cap in force (0: paused or off)",
                         registry=r)
        self.ceiling = Gauge("photoferry_store_ceiling_bytes_per_second",
                             "Ceiling of the band above the cap, where only idle uplink is used (0: no band)",
                             registry=r)
        self.above_floor = Gauge("photoferry_store_above_floor_bytes_per_second",
                                 "Egress above the cap (the floor), all shippers: what idle uplink carried",
                                 registry=r)
        self.queueing_delay = Gauge("photoferry_store_queueing_delay_seconds",
                                    "Queueing delay on the path to S3, the most any shipper measures (NaN: none)",
                                    registry=r)
        self.fill = Gauge("photoferry_store_fill_ratio",
                          "How full the local store is: the photo budget or the disk, whichever is fuller",
                          registry=r)
        self.full_eta = Gauge("photoferry_store_full_eta_seconds",
                              "When the local store is full at current rates (+Inf: never)", registry=r)
        self.high_watermark = Gauge("photoferry_store_high_watermark_ratio", "Fill at which uploads stop",
                                    registry=r)
        self.low_watermark = Gauge("photoferry_store_low_watermark_ratio", "Fill under which uploads resume",
                                   registry=r)
        self.parked_photos = Gauge("photoferry_store_parked_photos", "Photos parked for an operator", registry=r)
        self.devices = Gauge("photoferry_store_devices", "Devices that uploaded a photo", registry=r)
        self.silent_devices = Gauge("photoferry_store_silent_devices",
                                    "Devices with no upload for PHOTOFERRY_SILENT_AFTER", registry=r)
        self.shippers = Gauge("photoferry_store_shippers", "Shipper replicas heard from lately", registry=r)
        self.fresh_lag = Gauge("photoferry_store_fresh_lag_seconds",
                               "Receipt to S3 of fresh photos shipped in the last 10 minutes", ["quantile"],
                               registry=r)
        self.fresh_window = Gauge("photoferry_store_fresh_window_seconds",
                                  "How long a photo counts as fresh (PHOTOFERRY_SHIP_FRESH_WINDOW)", registry=r)
        self.fresh_share = Gauge("photoferry_store_fresh_share_ratio",
                                 "Share of the cap fresh photos may take while a backlog waits", registry=r)
        self.fresh_egress = Gauge("photoferry_store_fresh_egress_bytes_per_second",
                                  "Bytes sent to S3 for fresh photos, all shippers", registry=r)
        self.queue_messages = Gauge("photoferry_store_queue_messages",
                                    "Messages ready on each of photoferry's queues", ["queue"], registry=r)
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
        self.deleted.labels("retention").inc(result.deleted_bytes - result.evicted_bytes)
        self.deleted.labels("capacity").inc(result.evicted_bytes)
        self.reconciled.inc(reconciled)

    def observe_status(self, figures: dict[str, Any]) -> None:
        """Export the operator's figures (the dict /api/status answers)."""
        never = float("inf")
        self.backlog.set(figures["backlog_objects"])
        self.backlog_bytes.set(figures["backlog_bytes"])
        self.oldest_age.set(figures["oldest_unshipped_age_s"] or 0)
        self.drain_eta.set(never if figures["eta_drain_s"] is None else figures["eta_drain_s"])
        self.ingest.set(figures["ingest_bytes_per_s"])
        self.egress.set(figures["egress_bytes_per_s"])
        self.cap.set(figures["cap_bytes_per_s"])
        band = figures["scavenging"]
        self.ceiling.set(band["ceiling_bytes_per_s"] or 0)
        self.above_floor.set(band["above_floor_bytes_per_s"])
        self.queueing_delay.set(float("nan") if band["queueing_delay_s"] is None else band["queueing_delay_s"])
        self.fill.set(figures["store_fill"])
        self.full_eta.set(never if figures["store_full_eta_s"] is None else figures["store_full_eta_s"])
        self.high_watermark.set(figures["high_watermark"])
        self.low_watermark.set(figures["low_watermark"])
        self.parked_photos.set(figures["parked"])
        self.devices.set(figures["devices"])
        self.silent_devices.set(len(figures["silent_devices"]))
        self.shippers.set(len(figures["shippers"]))
        fresh = figures["fresh"]
        self.fresh_window.set(fresh["window_s"])
        self.fresh_share.set(fresh["share"])
        self.fresh_egress.set(fresh["egress_bytes_per_s"])
        for quantile, key in (("0.5", "p50_s"), ("0.99", "p99_s")):
            if fresh["lag"][key] is not None:
                self.fresh_lag.labels(quantile).set(fresh["lag"][key])

