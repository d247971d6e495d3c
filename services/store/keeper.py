"""The store keeper's work: sweeps, reconciling, capacity, and the figures operators see.

- A sweep (every ``PHOTOFERRY_RECONCILE_EVERY``, or at once under pressure) walks
  the store, applies retention, and counts what is unshipped.
- Reconciling compares that count with the messages the broker holds for
  shipping (ready, in retry, parked, and in the shippers' hands): only a
  deficit is re-enqueued, so a long healthy backlog causes no duplicates. The
  photos that never had a message go first, then the oldest.
- Capacity: between sweeps usage is the last sweep's plus what has been queued
  since, against ``PHOTOFERRY_STORE_CAPACITY`` and, when MinIO's metrics are
  configured, against the disk itself (whichever is fuller, ``disk.Usage``).
  Past the high watermark a sweep evicts shipped copies early; if usage is still
  past it, admission closes (every gateway answers 503) until usage is under the
  low watermark.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from services.common import messages, photos, topology
from services.common.admission import Admission, write_admission
from services.common.broker import Broker, BrokerUnavailable
from services.common.config import StoreKeeperConfig
from services.common.localstore import LocalStore, StoreUnavailable
from services.common.s3 import ensure_bucket
from services.common.shipping import ShippingControl, read_control
from services.common.supervise import DONE, StepResult, Supervisor
from services.common.units import format_bytes, format_duration
from services.store.disk import Disk, DiskGauge, DiskUnavailable, Usage
from services.store.forecast import drain_eta_s, full_eta_s
from services.store.live import LagWindow, LiveBacklog
from services.store.metrics import KeeperMetrics
from services.store.sweep import SweepResult, sweep
from services.store.tap import RateWindow, Tap

log = logging.getLogger(__name__)

CAPACITY_CHECK_S = 5.0
FIGURES_EVERY_S = 5.0  # the operator's figures as metrics, and the queues' depths
HISTORY_EVERY_S = 30.0
HISTORY_SPAN_S = 12 * 3600
HISTORY_KEY = "state/history.json"
HISTORY_SAVE_EVERY_S = 300.0
RECONCILE_BATCH = 5000  # most re-enqueued per sweep
STALE_UPLOADS_AFTER = timedelta(hours=24)  # incomplete multipart uploads in the local bucket
BROKER_TIMEOUT_S = 10.0
PROVISION_WAIT_S = 1.0  # a sweep waiting for the bucket looks again this soon
STOP_SAVE_TIMEOUT_S = 5.0


class Keeper:
    def __init__(self, config: StoreKeeperConfig, *, store: LocalStore, admin: BaseClient, broker: Broker,
                 tap: Tap, metrics: KeeperMetrics) -> None:
        self.config = config
        self.store = store
        self.admin = admin
        self.broker = broker
        self.tap = tap
        self.metrics = metrics
        self.backlog = LiveBacklog()
        self.lags = LagWindow()
        tap.on_queued = self.backlog.queued
        tap.on_shipped = self._heard_shipped
        self.last_sweep: SweepResult | None = None
        self.admission = Admission()
        self.control = ShippingControl()
        self.queued = 0  # shipping messages the broker holds, at the last count
        self.parked_messages = 0
        self.history: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_SPAN_S / HISTORY_EVERY_S))
        self._deleted = RateWindow(3600)
        self._ingest_at_sweep = 0.0
        self._sweep_lock = asyncio.Lock()
        self._sweep_now = asyncio.Event()
        self._evict_bytes = 0
        self.disk_gauge = (DiskGauge(config.store_metrics_url, token=config.store_metrics_token,
                                     timeout=config.store.timeout) if config.store_metrics_url else None)
        self._disk: Disk | None = None
        self._disk_error: str | None = None
        self._supervisor: Supervisor | None = None
        self._history_saved = time.monotonic()
        self.provisioned = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, supervisor: Supervisor) -> None:
        """Start the keeper's loops; each waits for what it needs and retries what fails."""
        self._supervisor = supervisor
        supervisor.start("keeper-provision", self._provision, every=0)
        supervisor.start("keeper-sweeps", self._sweep_step, every=self.config.reconcile_every, wake=self._sweep_now)
        supervisor.start("keeper-capacity", self._capacity_step, every=CAPACITY_CHECK_S)
        supervisor.start("keeper-history", self._history_step, every=HISTORY_EVERY_S)
        supervisor.start("keeper-figures", self._figures_step, every=FIGURES_EVERY_S)

    async def on_broker_ready(self, broker: Broker) -> None:
        await self.tap.attach(broker)

    async def stop(self) -> None:
        """Save what operators would miss after a restart (loops are stopped by the supervisor)."""
        try:
            async with asyncio.timeout(STOP_SAVE_TIMEOUT_S):
                await self._save_history()
        except TimeoutError:
            log.warning("could not save the history of figures before stopping (store too slow)")
        if self.disk_gauge is not None:
            await self.disk_gauge.close()

    async def _provision(self) -> StepResult:
        """The bucket exists (created if not), stale uploads are cleaned up, history is loaded."""
        try:
            await asyncio.to_thread(self._provision_bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"could not provision the local bucket {self.config.store.bucket}: {exc}") from None
        await self._load_history()
        self.provisioned = True
        log.info("local bucket ready", extra={"bucket": self.config.store.bucket})
        self.request_sweep()
        return DONE

    def _provision_bucket(self) -> None:
        bucket = self.config.store.bucket
        ensure_bucket(self.admin, bucket)
        cutoff = datetime.now(UTC) - STALE_UPLOADS_AFTER
        listing = self.admin.list_multipart_uploads(Bucket=bucket)
        for upload in listing.get("Uploads", []):
            if upload["Initiated"] < cutoff:
                self.admin.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                log.info("aborted an incomplete multipart upload", extra={"key": upload["Key"]})

    def _heard_shipped(self, photo_id: str, size: int, lag_s: float, kind: str) -> None:
        self.backlog.shipped(photo_id, size)
        self.lags.add(lag_s, kind)

    # -- sweeps and reconciling -------------------------------------------------------------

    def request_sweep(self) -> None:
        self._sweep_now.set()

    async def run_sweep(self) -> SweepResult:
        """Sweep now (one at a time), reconcile, and decide admission."""
        async with self._sweep_lock:
            queued_before = await self._count_queued()  # None while the broker is away
            self.tap.begin_sweep()
            ingest_before = self.tap.ingest_bytes.total
            started = time.monotonic()
            # A photo stored a moment ago may be between the gateway's write and its
            # publish: it is a candidate only after a sweep interval (at most a minute).
            grace = timedelta(seconds=min(60.0, self.config.reconcile_every))
            result = await sweep(self.store, now=datetime.now(UTC), retain=timedelta(seconds=self.config.retain),
                                 evict_bytes=self._evict_bytes, orphan_grace=grace, seen=self.tap.has_seen)
            result.finished_at = datetime.now(UTC)
            self.tap.prune(result.unshipped_ids)
            self._evict_bytes = 0
            self._ingest_at_sweep = ingest_before
            self._deleted.add(result.deleted_bytes)
            queued_after = await self._count_queued()
            reconciled = 0
            if queued_before is None or queued_after is None:
                log.log(logging.INFO if self.broker.starting else logging.WARNING,
                        "broker unavailable: the sweep cannot tell which photos lack a message; "
                        "reconciling waits for the next sweep")
            else:
                # Photos parked with a marker are not counted as unshipped, so neither are their
                # messages; those the broker dead-lettered itself (no marker) are.
                self.queued = max(queued_before, queued_after) + max(0, self.parked_messages - result.parked)
                reconciled = await self._reconcile(result)
            self.last_sweep = result
            self.backlog.swept(photos=result.unshipped, bytes_=result.unshipped_bytes,
                               oldest=result.oldest_unshipped, unshipped_ids=result.unshipped_ids)
            self.metrics.observe_sweep(result, time.monotonic() - started, reconciled)
            log.info("store swept", extra={
                "photos": result.photos, "unshipped": result.unshipped, "queued": self.queued,
                "reconciled": reconciled, "deleted": result.deleted, "evicted_bytes": result.evicted_bytes,
                "parked": result.parked, "duration_s": round(result.duration_s, 2)})
        await self._decide_admission()
        return result

    async def _sweep_step(self) -> StepResult:
        if not self.provisioned:
            return PROVISION_WAIT_S
        self.control = await read_control(self.store)
        await self.run_sweep()
        return None

    async def _count_queued(self) -> int | None:
        """Messages ready, in retry and in the shippers' hands; the parking queue's count is kept aside."""
        try:
            depths = await self.broker.queue_depth(*topology.PHOTO_QUEUES)
        except BrokerUnavailable as exc:
            if not self.broker.starting:
                log.warning("could not count queued photos", extra={"error": str(exc)})
            return None
        self.parked_messages = depths.pop(topology.PARKED_QUEUE)
        return sum(depths.values()) + sum(beat.in_flight for beat in self.tap.shippers())

    async def _reconcile(self, result: SweepResult) -> int:
        deficit = result.unshipped - self.queued
        self.metrics.unaccounted.set(max(0, deficit))
        if deficit <= 0:
            return 0
        reconciled = 0
        for orphan in result.orphans[: min(deficit, RECONCILE_BATCH)]:
            if await self.store.exists(photos.shipped_marker_key(orphan.id)):
                continue  # shipped while the sweep ran
            message = await self._message_for(orphan.id)
            if message is None:
                continue
            await self.broker.publish(
                topology.PHOTOS_EXCHANGE, topology.SHIP_ROUTING_KEY,
                messages.shipping_message(message.to_json(), origin=messages.RECONCILE),
                timeout=BROKER_TIMEOUT_S,
            )
            self.tap.saw(orphan.id)
            reconciled += 1
        if reconciled:
            log.warning("re-enqueued photos that had no shipping message",
                        extra={"count": reconciled, "unshipped": result.unshipped, "queued": self.queued})
        return reconciled

    async def _message_for(self, photo_id: str) -> photos.PhotoMessage | None:
        key = photos.object_key(photo_id)
        stored = await self.store.stat(key)
        if stored is None:
            return None
        sha256 = stored.metadata.get("sha256")
        if not sha256:
            # Not written by a gateway (restored by hand?): its own bytes say what it is.
            body = await self.store.read(key)
            if body is None:
                return None
            sha256 = hashlib.sha256(body).hexdigest()
        stored_at = photos.canonical_time(stored.last_modified)
        return photos.PhotoMessage(
            id=photo_id, key=key, size=stored.size, sha256=sha256, content_type=stored.content_type,
            device_id=photos.owner_of(photo_id),
            captured_at=stored.metadata.get("captured-at", stored_at),
            received_at=stored.metadata.get("received-at", stored_at),
        )

    # -- capacity ---------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Local usage now: the last sweep's, plus what has been queued since it began."""
        if self.last_sweep is None:
            return 0
        return int(self.last_sweep.photo_bytes + self.tap.ingest_bytes.total - self._ingest_at_sweep)

    def usage(self) -> Usage:
        """Usage now; the disk's figures count while they are fresh."""
        disk = self._disk if self._disk is not None and self._disk.fresh(time.monotonic()) else None
        return Usage(photo_bytes=self.used_bytes(), capacity_bytes=self.config.capacity, disk=disk)

    async def _read_disk(self) -> None:
        if self.disk_gauge is None:
            return
        try:
            self._disk = await self.disk_gauge.read()
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

    async def _capacity_step(self) -> StepResult:
        await self._read_disk()
        if self.last_sweep is not None:
            usage = self.usage()
            # Evict shipped copies early, to just under the low watermark if they suffice: above
            # the high watermark, and for as long as uploads are refused (photos shipped since the
            # last eviction are evictable too; waiting for the high watermark again would keep
            # uploads refused between the two watermarks for good).
            over = usage.fill >= self.config.high_watermark or (
                not self.admission.open and usage.fill >= self.config.low_watermark)
            if over and not self._sweep_lock.locked():
                self._evict_bytes = usage.excess_over(self.config.low_watermark)
                self.request_sweep()
            await self._decide_admission()
        return None

    async def _decide_admission(self) -> None:
        usage = self.usage()
        high, low = self.config.high_watermark, self.config.low_watermark
        is_open = self.admission.open
        if is_open and usage.fill >= high and not self._evicting():
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
        self.admission = Admission(open=is_open, reason=reason, used_bytes=usage.photo_bytes,
                                   capacity_bytes=usage.capacity_bytes, decided_at=datetime.now(UTC).isoformat())
        self.metrics.admission_open.set(1 if is_open else 0)
        self.metrics.used.set(usage.photo_bytes)
        await write_admission(self.store, self.admission)

    def _evicting(self) -> bool:
        return self._evict_bytes > 0

    # -- figures for operators ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        sweep_result = self.last_sweep
        shippers = self.tap.shippers()
        ingest = self.tap.ingest_bytes.rate()
        egress = sum(beat.egress_bytes_per_s for beat in shippers)
        fresh_egress = sum(beat.fresh_egress_bytes_per_s for beat in shippers)
        cap = self.control.cap(self.config.schedule, now)
        link_limited = any(beat.link_limited for beat in shippers)
        backlog = self.backlog.now()
        eta_drain = drain_eta_s(backlog.bytes, ingest, schedule=self.config.schedule, control=self.control, now=now,
                                link_bytes_per_s=egress if link_limited else None)
        oldest_age = (now - backlog.oldest).total_seconds() if backlog.oldest else None
        usage = self.usage()
        full_eta = full_eta_s(usage, ingest, self._deleted.rate())
        devices = self._devices(now)
        silent_before = now.timestamp() - self.config.silent_after
        return {
            "backlog_objects": backlog.photos,
            "backlog_bytes": backlog.bytes,
            "oldest_unshipped_age_s": _rounded(oldest_age),
            "ingest_bytes_per_s": round(ingest, 1),
            "ingest_photos_per_s": round(self.tap.ingest_photos.rate(), 3),
            "egress_bytes_per_s": round(egress, 1),
            "cap_bytes_per_s": cap,
            # Two classes share the cap: fresh photos (younger than the window) and the backlog.
            "fresh": {
                "window_s": self.config.fresh_window,
                "share": self.control.fresh_share(self.config.schedule, now),
                "share_override": self.control.fresh_share_override,
                "egress_bytes_per_s": round(fresh_egress, 1),
                "lag": self.lags.percentiles("fresh"),
            },
            "backlog_class": {
                "egress_bytes_per_s": round(max(0.0, egress - fresh_egress), 1),
                "lag": self.lags.percentiles("backlog"),
            },
            "eta_drain_s": _rounded(eta_drain),
            "store_used_bytes": usage.photo_bytes,
            "store_capacity_bytes": usage.capacity_bytes,
            "store_disk_total_bytes": usage.disk.total_bytes if usage.disk else None,
            "store_disk_free_bytes": usage.disk.free_bytes if usage.disk else None,
            "store_fill": round(usage.fill, 4),
            "store_full_eta_s": _rounded(full_eta),
            "high_watermark": self.config.high_watermark,
            "low_watermark": self.config.low_watermark,
            "admission": {"open": self.admission.open, "reason": self.admission.reason},
            # Every parked photo has a message on the parking queue; those the shipper parked
            # also have a marker with the reason. A marker without a message is counted too.
            "parked": max(sweep_result.parked if sweep_result else 0, self.parked_messages),
            "queued_messages": self.queued,
            "shipping": self._shipping_state(shippers, now),
            "control": {"rate_override": self.control.rate_override,
                        "fresh_share_override": self.control.fresh_share_override,
                        "paused": self.control.is_paused(now), "paused_until": self.control.paused_until},
            "shippers": [{"replica": b.replica, "state": b.state, "busy": b.busy,
                          "egress_bytes_per_s": round(b.egress_bytes_per_s, 1), "concurrency": b.concurrency,
                          "link_limited": b.link_limited, "breaker_reason": b.breaker_reason}
                         for b in shippers],
            "link_limited": link_limited,
            "devices": len(devices),
            "silent_devices": sorted(d for d, seen in devices.items() if seen < silent_before),
            "swept_at": sweep_result.finished_at.isoformat() if sweep_result and sweep_result.finished_at else None,
            "sweep_duration_s": round(sweep_result.duration_s, 2) if sweep_result else None,
            "now": now.isoformat(),
            # The same figures as a person would say them, for the page and the command line.
            "text": {
                "backlog": f"{backlog.photos} photos, {format_bytes(backlog.bytes)}",
                "oldest_unshipped_age": "nothing waiting" if oldest_age is None else format_duration(oldest_age),
                "eta_drain": "drained" if not backlog.bytes else (
                    "never at current rates" if eta_drain is None else f"in {format_duration(eta_drain)}"),
                "store_full": "never at current rates" if full_eta is None else f"in {format_duration(full_eta)}",
            },
        }

    def _devices(self, now: datetime) -> dict[str, float]:
        """Each device's last upload (epoch s): the store's record, updated by what the tap heard."""
        seen = {d: t.timestamp() for d, t in (self.last_sweep.devices if self.last_sweep else {}).items()}
        for device, at in self.tap.device_seen.items():
            seen[device] = max(seen.get(device, 0.0), at)
        return seen

    def _shipping_state(self, shippers: list[Any], now: datetime) -> str:
        if any(b.state == "breaker_open" for b in shippers):
            return "breaker_open"
        if self.control.cap(self.config.schedule, now) <= 0:
            return "paused"
        return "running"

    # -- history, for the operator page's charts -------------------------------------------------

    async def _figures_step(self) -> StepResult:
        """Export the operator's figures and the queues' depths as metrics."""
        self.metrics.observe_status(self.status())
        if self.broker.is_ready:
            for queue, depth in (await self.broker.queue_depth(*topology.PHOTO_QUEUES)).items():
                self.metrics.queue_messages.labels(queue).set(depth)
        return None

    async def _history_step(self) -> StepResult:
        figures = self.status()
        self.history.append({
            "t": figures["now"], "backlog_bytes": figures["backlog_bytes"],
            "backlog_objects": figures["backlog_objects"], "ingest": figures["ingest_bytes_per_s"],
            "egress": figures["egress_bytes_per_s"], "cap": figures["cap_bytes_per_s"],
        })
        if time.monotonic() - self._history_saved >= HISTORY_SAVE_EVERY_S:
            await self._save_history()
            self._history_saved = time.monotonic()
        return None

    async def _save_history(self) -> None:
        try:
            await self.store.put(HISTORY_KEY, orjson.dumps(list(self.history)),
                                 metadata={"Content-Type": "application/json"})
        except StoreUnavailable as exc:
            log.warning("could not save the history of figures", extra={"error": str(exc)})

    async def _load_history(self) -> None:
        try:
            body = await self.store.read(HISTORY_KEY)
        except StoreUnavailable as exc:
            log.warning("could not load the history of figures", extra={"error": str(exc)})
            return
        if body:
            try:
                self.history.extend(orjson.loads(body))
            except (ValueError, TypeError) as exc:
                log.warning("history of figures unreadable; starting afresh", extra={"error": str(exc)})


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
