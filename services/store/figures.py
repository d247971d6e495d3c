"""The figures operators see (``/api/status``, the page, ``photoferry status``), their
export as metrics, and their history for the page's charts (kept in the store)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from services.common.broker import Broker
from services.common.config import StoreKeeperConfig
from services.common.localstore import LocalStore, StoreUnavailable
from services.common.shipping import (
    SCAVENGING_IDLE,
    SCAVENGING_MEASURING,
    SCAVENGING_OFF,
    SCAVENGING_STATES,
    SCAVENGING_UNMEASURED,
    SCAVENGING_USING,
    SCAVENGING_YIELDING,
    Heartbeat,
    ShippingControl,
)
from services.common.units import format_bytes, format_duration
from services.store.capacity import Capacity
from services.store.forecast import drain_eta_s, full_eta_s
from services.store.live import LagWindow, LiveBacklog
from services.store.sweep import SweepResult
from services.store.tap import RateWindow, Tap

log = logging.getLogger(__name__)

HISTORY_EVERY_S = 30.0
HISTORY_SPAN_S = 12 * 3600
HISTORY_KEY = "state/history.json"
HISTORY_SAVE_EVERY_S = 300.0
# Devices that stopped: ingest counts as 0 once nothing arrived for this long, rather
# than trailing off over the minute the rate is averaged on.
INGEST_QUIET_S = 10.0
# Shippers report the link as the limit when an upload more does not help; near the cap
# that is the cap itself, not the link.
LINK_LIMITED_BELOW = 0.9


class Figures:
    def __init__(self, config: StoreKeeperConfig, *, store: LocalStore, broker: Broker, tap: Tap,
                 capacity: Capacity, parked_messages: Callable[[], int]) -> None:
        self.config = config
        self.store = store
        self.broker = broker
        self.tap = tap
        self.capacity = capacity
        self._parked_messages = parked_messages
        self.backlog = LiveBacklog()
        self.lags = LagWindow()
        self.shipped_by_class = {"fresh": RateWindow(10), "backlog": RateWindow(10)}
        self.control = ShippingControl()
        self.last_sweep: SweepResult | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_SPAN_S / HISTORY_EVERY_S))
        self._history_saved = time.monotonic()
        self._last_ingest = 0.0

    def heard_queued(self, photo_id: str, size: int, received: float) -> None:
        self.backlog.queued(photo_id, size, received)
        self._last_ingest = time.time()

    def heard_shipped(self, photo_id: str, size: int, lag_s: float, kind: str) -> None:
        self.backlog.shipped(photo_id, size)
        self.lags.add(lag_s, kind)
        if kind in self.shipped_by_class:
            self.shipped_by_class[kind].add(size)

    def swept(self, result: SweepResult) -> None:
        self.last_sweep = result
        self.backlog.swept(photos=result.unshipped, bytes_=result.unshipped_bytes,
                           oldest=result.oldest_unshipped, unshipped_ids=result.unshipped_ids)

    def ingest_rate(self) -> float:
        return self.tap.ingest_bytes.rate() if time.time() - self._last_ingest <= INGEST_QUIET_S else 0.0

    def status(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        sweep_result = self.last_sweep
        shippers = self.tap.shippers()
        ingest = self.ingest_rate()
        egress = sum(beat.egress_bytes_per_s for beat in shippers)
        fresh_egress = self._fresh_egress(egress)
        cap = self.control.cap(self.config.schedule, now)
        scavenging = self._scavenging(shippers, cap, self.control.ceiling(self.config.schedule, now), egress)
        link_limited = any(beat.link_limited for beat in shippers) and egress < LINK_LIMITED_BELOW * cap
        backlog = self.backlog.now()
        eta_drain = drain_eta_s(backlog.bytes, ingest, schedule=self.config.schedule, control=self.control, now=now,
                                link_bytes_per_s=egress if link_limited else None)
        oldest_age = (now - backlog.oldest).total_seconds() if backlog.oldest else None
        usage = self.capacity.usage()
        full_eta = full_eta_s(usage, ingest, self.capacity.deleted.rate())
        devices = self._devices()
        silent_before = now.timestamp() - self.config.silent_after
        admission = self.capacity.admission
        return {
            "backlog_objects": backlog.photos,
            "backlog_bytes": backlog.bytes,
            "oldest_unshipped_age_s": _rounded(oldest_age),
            "ingest_bytes_per_s": round(ingest, 1),
            "ingest_photos_per_s": round(self.tap.ingest_photos.rate() if ingest else 0.0, 3),
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
            "admission": {"open": admission.open, "reason": admission.reason},
            # Every parked photo has a message on the parking queue; those the shipper parked
            # also have a marker with the reason. A marker without a message is counted too.
            "parked": max(sweep_result.parked if sweep_result else 0, self._parked_messages()),
            "shipping": self._shipping_state(shippers, now),
            # The band above the cap, where shippers use only idle uplink.
            "scavenging": scavenging,
            "control": {"rate_override": self.control.rate_override,
                        "fresh_share_override": self.control.fresh_share_override,
                        "ceiling_override": self.control.ceiling_override,
                        "paused": self.control.is_paused(now), "paused_until": self.control.paused_until},
            "shippers": [{"replica": b.replica, "state": b.state, "busy": b.busy,
                          "egress_bytes_per_s": round(b.egress_bytes_per_s, 1), "concurrency": b.concurrency,
                          "link_limited": b.link_limited, "breaker_reason": b.breaker_reason,
                          "allowed_bytes_per_s": round(b.allowed_bytes_per_s, 1), "scavenging": b.scavenging,
                          "queueing_delay_s": b.queueing_delay_s}
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
                "scavenging": _scavenging_text(scavenging),
            },
        }

    @staticmethod
    def _scavenging(shippers: list[Heartbeat], cap: float, ceiling: float, egress: float) -> dict[str, Any]:
        """The band above the cap: in force or not, the rate used above the floor, the delay the shippers
        measure, and what they do (the most telling state when they differ)."""
        states = {b.scavenging for b in shippers}
        if ceiling <= 0:
            state = SCAVENGING_OFF
        else:
            state = next((s for s in SCAVENGING_STATES if s in states and s != SCAVENGING_OFF), SCAVENGING_IDLE)
        delays = [b.queueing_delay_s for b in shippers if b.queueing_delay_s is not None]
        bases = [b.base_delay_s for b in shippers if b.base_delay_s is not None]
        targets = [b.delay_target_s for b in shippers if b.delay_target_s is not None]
        return {
            "state": state,
            "floor_bytes_per_s": cap,
            "ceiling_bytes_per_s": ceiling if ceiling > 0 else None,
            # What the shippers may send now, and what they really send above the floor.
            "allowed_bytes_per_s": round(sum(b.allowed_bytes_per_s for b in shippers if b.busy), 1),
            "above_floor_bytes_per_s": round(max(0.0, egress - cap), 1) if ceiling > 0 else 0.0,
            "queueing_delay_s": round(max(delays), 4) if delays else None,
            "base_delay_s": round(min(bases), 4) if bases else None,
            "target_s": max(targets) if targets else None,
        }

    def _fresh_egress(self, egress: float) -> float:
        """The fresh class's part of egress, as the photos the shippers marked shipped lately split it."""
        fresh, backlog = (self.shipped_by_class[k].rate() for k in ("fresh", "backlog"))
        return egress * fresh / (fresh + backlog) if fresh + backlog else 0.0

    def _devices(self) -> dict[str, float]:
        """Each device's last upload (epoch s): the store's record, updated by what the tap heard."""
        seen = {d: t.timestamp() for d, t in (self.last_sweep.devices if self.last_sweep else {}).items()}
        for device, at in self.tap.device_seen.items():
            seen[device] = max(seen.get(device, 0.0), at)
        return seen

    def _shipping_state(self, shippers: list[Heartbeat], now: datetime) -> str:
        if any(b.state == "breaker_open" for b in shippers):
            return "breaker_open"
        if self.control.cap(self.config.schedule, now) <= 0:
            return "paused"
        return "running"

    # -- history, for the operator page's charts -------------------------------------------------

    async def history_step(self) -> None:
        figures = self.status()
        self.history.append({
            "t": figures["now"], "backlog_bytes": figures["backlog_bytes"],
            "backlog_objects": figures["backlog_objects"], "ingest": figures["ingest_bytes_per_s"],
            "egress": figures["egress_bytes_per_s"], "cap": figures["cap_bytes_per_s"],
            "ceiling": figures["scavenging"]["ceiling_bytes_per_s"] or 0,
        })
        if time.monotonic() - self._history_saved >= HISTORY_SAVE_EVERY_S:
            await self.save_history()
            self._history_saved = time.monotonic()

    async def save_history(self) -> None:
        try:
            await self.store.put(HISTORY_KEY, orjson.dumps(list(self.history)),
                                 metadata={"Content-Type": "application/json"})
        except StoreUnavailable as exc:
            log.warning("could not save the history of figures", extra={"error": str(exc)})

    async def load_history(self) -> None:
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


def _scavenging_text(band: dict[str, Any]) -> str:
    """The band's state as a person would say it."""
    def rate(value: float) -> str:
        return f"{format_bytes(value)}/s"

    def ms(seconds: float | None) -> str:
        return "?" if seconds is None else f"{seconds * 1000:.1f} ms"

    floor, delay, target = band["floor_bytes_per_s"], band["queueing_delay_s"], band["target_s"]
    return {
        SCAVENGING_OFF: "off: shipping at the cap only",
        SCAVENGING_IDLE: f"up to {rate(band['ceiling_bytes_per_s'] or 0)} on idle uplink; nothing to ship",
        SCAVENGING_MEASURING: "measuring the delay to S3 before using idle uplink",
        SCAVENGING_USING: f"using idle uplink: {rate(band['above_floor_bytes_per_s'])} above the {rate(floor)} floor "
                          f"(ceiling {rate(band['ceiling_bytes_per_s'] or 0)}); queueing {ms(delay)}, "
                          f"target {ms(target)}",
        SCAVENGING_YIELDING: f"yielding to other traffic: queueing {ms(delay)}, above the {ms(target)} target; "
                             f"at the {rate(floor)} floor",
        SCAVENGING_UNMEASURED: "no delay measurement (the probe to S3 gets no answer): at the floor",
    }[band["state"]]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
