"""Shipping control and shipper heartbeats: what operators set, and what shippers report.

The operator's settings (a rate override, a ceiling override, a pause and its end) are one JSON
object in the local store: the source of truth a shipper reads at start and
every few seconds. A message on the control exchange tells every replica to read
it at once. Each shipper publishes a heartbeat on the status exchange; the store
keeper adds them up for operators.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import aio_pika
import orjson

from services.common import topology
from services.common.broker import Broker, BrokerUnavailable
from services.common.localstore import LocalStore
from services.common.schedule import RateSchedule

log = logging.getLogger(__name__)
T = TypeVar("T")

CONTROL_KEY = "state/shipping-control.json"
# Shippers hear each other's heartbeats to split the cap among the busy ones, so
# they come often; a replica not heard from for PEER_TTL_S is gone.
HEARTBEAT_EVERY_S = 1.0
PEER_TTL_S = 4.0
# What the band above the cap is doing (a replica's heartbeat says; services.shipper.scavenger decides).
SCAVENGING_OFF = "off"  # no band in force (no ceiling, or not above the cap)
SCAVENGING_IDLE = "idle"  # a band in force, but nothing to ship
SCAVENGING_MEASURING = "measuring"  # learning the path's delay before using the band
SCAVENGING_USING = "using_idle_uplink"
SCAVENGING_YIELDING = "yielding"  # the path queues: other traffic needs the uplink
SCAVENGING_UNMEASURED = "unmeasured"  # no recent delay sample: at the floor until there is one
# Most telling first: the one operators are shown when replicas differ.
SCAVENGING_STATES = (SCAVENGING_UNMEASURED, SCAVENGING_YIELDING, SCAVENGING_USING, SCAVENGING_MEASURING,
                     SCAVENGING_IDLE, SCAVENGING_OFF)
# The nudge after a change is a courtesy (shippers re-read the settings every few
# seconds anyway): an operator's request does not wait long for it.
NUDGE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class ShippingControl:
    rate_override: float | None = None  # bytes per second, replacing the schedule
    fresh_share_override: float | None = None  # of the cap, for fresh photos, replacing the schedule's
    # Of the band above the cap where only idle uplink is used, replacing the schedule's; 0: no band.
    ceiling_override: float | None = None
    paused: bool = False
    paused_until: str | None = None  # RFC 3339; None pauses until resumed
    updated_at: str | None = None

    def is_paused(self, now: datetime) -> bool:
        if not self.paused:
            return False
        return self.paused_until is None or now < _aware(self.paused_until)

    def cap(self, schedule: RateSchedule, now: datetime) -> float:
        """The site-wide cap in force, in bytes per second (0 while paused or scheduled off)."""
        if self.is_paused(now):
            return 0.0
        if self.rate_override is not None:
            return self.rate_override
        return schedule.rate_at(now)

    def ceiling(self, schedule: RateSchedule, now: datetime) -> float:
        """The ceiling of the band above the cap in force, in bytes per second: 0 when there is no
        band (none set, set off, not above the cap in force, or shipping paused or scheduled off)."""
        cap = self.cap(schedule, now)
        if cap <= 0:
            return 0.0
        ceiling = self.ceiling_override if self.ceiling_override is not None else schedule.ceiling_at(now)
        return ceiling if ceiling > cap else 0.0

    def fresh_share(self, schedule: RateSchedule, now: datetime) -> float:
        """The share of the cap fresh photos may take (0: strictly oldest first)."""
        if self.fresh_share_override is not None:
            return self.fresh_share_override
        return schedule.fresh_share_at(now)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, body: bytes) -> ShippingControl:
        """Parse the stored settings; raise ValueError when they are not a JSON object.

        A field no version of the operator API writes is dropped with an error in the log,
        and the others kept: a pause whose end cannot be read stays a pause (until resumed),
        so an operator's pause never turns into shipping by accident.
        """
        data = orjson.loads(body)
        if not isinstance(data, dict):
            raise ValueError("the shipping control object is not a JSON object")
        return cls(
            rate_override=_field(data, "rate_override", _positive),
            fresh_share_override=_field(data, "fresh_share_override", _fraction),
            ceiling_override=_field(data, "ceiling_override", _rate_or_off),
            paused=data.get("paused") is True,
            paused_until=_field(data, "paused_until", lambda v: _aware(v).isoformat()),
            updated_at=data.get("updated_at") if isinstance(data.get("updated_at"), str) else None,
        )


def _aware(value: object) -> datetime:
    """An RFC 3339 time with an offset."""
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a time")
    moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no offset")
    return moment


def _field(data: dict[str, Any], name: str, parse: Callable[[Any], T]) -> T | None:
    value = data.get(name)
    if value is None:
        return None
    try:
        return parse(value)
    except (ValueError, TypeError) as exc:
        log.error("a field of the shipping control object is unreadable; ignoring it",
                  extra={"key": CONTROL_KEY, "field": name, "value": str(value)[:80], "error": str(exc)})
        return None


def _positive(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ValueError(f"{value!r} is not a positive number of bytes per second")
    return float(value)


def _rate_or_off(value: object) -> float:
    return 0.0 if value == 0 and not isinstance(value, bool) else _positive(value)


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{value!r} is not a fraction between 0 and 1")
    return float(value)


async def read_control(store: LocalStore) -> ShippingControl:
    """The operator's current settings (defaults when none were ever set)."""
    body = await store.read(CONTROL_KEY)
    if body is None:
        return ShippingControl()
    try:
        return ShippingControl.from_json(body)
    except (ValueError, KeyError, TypeError) as exc:
        log.error("the shipping control object is unreadable; using the configured rate and schedule until an "
                  "operator sets them again", extra={"key": CONTROL_KEY, "error": str(exc)})
        return ShippingControl()


async def write_control(store: LocalStore, broker: Broker, control: ShippingControl) -> ShippingControl:
    """Store new settings and tell every shipper to apply them now."""
    stamped = replace(control, updated_at=datetime.now(UTC).isoformat())
    await store.put(CONTROL_KEY, stamped.to_json(), metadata={"Content-Type": "application/json"})
    try:
        await broker.publish(
            topology.CONTROL_EXCHANGE, "", aio_pika.Message(b"reload", expiration=60), timeout=NUDGE_TIMEOUT_S,
            mandatory=False,
        )
    except BrokerUnavailable as exc:
        # Shippers also re-read the object every few seconds; the nudge only saves time.
        log.warning("control change stored but not broadcast", extra={"error": str(exc)})
    return stamped


@dataclass(frozen=True)
class Heartbeat:
    """One shipper replica's state, as it reports it every few seconds."""

    replica: str
    state: str  # running, paused, breaker_open, starting, stopping
    busy: bool  # has photos to send: counts when the cap is split
    cap_bytes_per_s: float  # site-wide cap in force
    share_bytes_per_s: float  # this replica's part of it
    egress_bytes_per_s: float  # achieved, recent
    fresh_egress_bytes_per_s: float  # of which for fresh photos
    sent_bytes_total: int
    shipped_objects_total: int
    in_flight: int  # shipments this replica holds (unacknowledged messages)
    concurrency: int
    link_limited: bool
    breaker_reason: str | None = None
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    # The band above the cap (a replica of an earlier version sends none of these: the defaults).
    ceiling_bytes_per_s: float = 0.0  # site-wide ceiling in force; 0: no band
    allowed_bytes_per_s: float = 0.0  # this replica's rate now: its share, and what the band adds
    scavenging: str = SCAVENGING_OFF  # one of SCAVENGING_STATES
    queueing_delay_s: float | None = None  # on the path to S3, as last measured
    base_delay_s: float | None = None  # the path's delay with no queue
    delay_target_s: float | None = None  # the queueing delay above which the band yields

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, body: bytes) -> Heartbeat | None:
        """Parse a heartbeat; None (and a warning) when it is not one. Fields this version does not
        know are ignored, so replicas of two versions hear each other during an upgrade."""
        try:
            data: dict[str, Any] = orjson.loads(body)
            known = {f.name for f in fields(cls)}
            return cls(**{name: value for name, value in data.items() if name in known})
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("unreadable heartbeat", extra={"error": str(exc)})
            return None


@dataclass(frozen=True)
class ShippedNotice:
    """Photos a shipper replica marked shipped since its last notice:
    (id, size, seconds from receipt to S3, class: fresh or backlog) each."""

    replica: str
    photos: list[tuple[str, int, float, str]]

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, body: bytes) -> ShippedNotice | None:
        try:
            data: dict[str, Any] = orjson.loads(body)
            return cls(replica=str(data["replica"]),
                       photos=[(str(photo_id), int(size), float(lag), str(kind))
                               for photo_id, size, lag, kind in data["photos"]])
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("unreadable shipped notice", extra={"error": str(exc)})
            return None

