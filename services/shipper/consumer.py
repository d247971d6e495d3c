"""The shipping loop: consume, ship once, acknowledge only what is in S3.

For each message: skip it if the photo is already marked shipped; otherwise copy
it (``Transfer.ship``, which also skips a photo S3 already holds), write the
``shipped/`` marker, and only then acknowledge. How an attempt ended decides
what becomes of the message (``policy.decide``): acknowledged, a delayed retry
(a TTL queue that returns it to the shipping queue), parked with a reason, or
released at a stop. Every outcome has an answer, so no delivery is left
unacknowledged; the shipper never requeues a message itself, so the broker's
delivery count only grows when a shipper dies holding it.

Two lanes consume two queues: **fresh** photos (received less than
PHOTOFERRY_SHIP_FRESH_WINDOW ago; older ones expire into the backlog queue) and
the **backlog**, oldest first. Each upload's bytes pass its lane's limiter and
the replica's: the replica's holds the cap, the lanes' split it (``pacing.split``)
while both have work.

One supervised loop keeps the pace: the site-wide cap and fresh share (operator
settings, else the schedule), this replica's share of the cap
(``pacing.CapShare``), consuming or not, the upload concurrency, and a
heartbeat. Every call it makes to the broker is bounded, so it keeps going (and
a stop stays prompt) through an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from services.common import messages, parking, photos, topology
from services.common.broker import Broker, BrokerUnavailable, bounded
from services.common.config import ShipperConfig
from services.common.errors import DEPENDENCY_ERRORS
from services.common.localstore import LocalStore, StoreUnavailable
from services.common.shipping import HEARTBEAT_EVERY_S, Heartbeat, ShippedNotice, ShippingControl, read_control
from services.common.supervise import StepResult, Supervisor
from services.shipper import pacing, policy
from services.shipper.breaker import Breaker
from services.shipper.concurrency import ConcurrencyController, Slots
from services.shipper.limiter import Pace, RateLimiter
from services.shipper.locks import PhotoLocks
from services.shipper.metrics import ShipperMetrics
from services.shipper.pacing import CapShare
from services.shipper.policy import Action, Decision
from services.shipper.threads import Threads
from services.shipper.transfer import Aborted, Shipment, Transfer, TransferError

log = logging.getLogger(__name__)

TICK_S = 1.0
BACKLOG_REFRESH_S = 2.0  # how often the queues' depths are read
CONTROL_REFRESH_S = 5.0
CONCURRENCY_WINDOW_S = 5.0
BROKER_TIMEOUT_S = 10.0  # publishing a retry or a parked message
ACK_TIMEOUT_S = 5.0
CONSUMER_TIMEOUT_S = 3.0  # starting or stopping a consumer
HEARTBEAT_TIMEOUT_S = 2.0
ABORT_WAIT_S = 5.0  # after the shutdown timeout, how long aborted uploads get to unwind
QUIET_REPEAT_S = 60.0  # the same dependency warning, at most this often
SHIPPED_BATCH = 5000  # photos in one shipped notice at most
STARVED_AFTER_S = 30.0  # photos wait, yet nothing is delivered: the consumer is started again
FRESH, BACKLOG = "fresh", "backlog"


@dataclass
class Lane:
    """One class of work: its queue, its limiter, its uploads and its consumer."""

    name: str
    queue: str
    limiter: RateLimiter
    concurrency: ConcurrencyController
    slots: Slots
    may_send: asyncio.Event = field(default_factory=asyncio.Event)
    consumer_tag: str | None = None
    prefetch: int = 0  # of the running consumer
    in_flight: int = 0
    waiting: int = 0  # ready on its queue, at the last count
    competing: bool = False  # the other lane has work too: this one keeps to its share
    egress: float = 0.0
    last_granted: int = 0
    starved_since: float | None = None

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.waiting > 0


class Shipper:
    def __init__(
        self,
        config: ShipperConfig,
        *,
        broker: Broker,
        store: LocalStore,
        transfer: Transfer,
        metrics: ShipperMetrics,
        replica: str,
    ) -> None:
        self.config = config
        self.broker = broker
        self.store = store
        self.transfer = transfer
        self.metrics = metrics
        self.replica = replica
        self.limiter = transfer.limiter  # the replica's: it holds the cap
        self.pacing = CapShare(replica)
        self.breaker = Breaker(probe=self._probe, on_change=self._wake)
        rate = self.limiter.rate
        # A few uploads at once to start with, to fill the link with small photos; each lane adapts.
        initial = min(4, config.max_concurrency)
        self.lanes = {
            name: Lane(name, queue, RateLimiter(rate),
                       ConcurrencyController(initial=initial, maximum=config.max_concurrency), Slots(initial))
            for name, queue in ((FRESH, topology.FRESH_QUEUE), (BACKLOG, topology.SHIP_QUEUE))
        }
        self.control = ShippingControl()
        self.fresh_share = config.schedule.fresh_share
        self.egress = 0.0
        self.shipped_objects = 0
        self._threads = Threads(2 * config.max_concurrency + 1)
        self._listeners: list[AbstractQueue] = []  # robust channels restore only what is referenced
        self._wakeup = asyncio.Event()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._photo_locks = PhotoLocks()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._ran_dry = False
        self._next_control = self._next_backlog = self._next_concurrency = self._next_heartbeat = 0.0
        self._last_granted, self._last_tick = self.limiter.granted, time.monotonic()
        self._warned: dict[str, float] = {}
        # (id, size, lag in seconds, class): told to the store keeper at the next round.
        self._just_shipped: list[tuple[str, int, float, str]] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, supervisor: Supervisor) -> None:
        supervisor.start("shipper-pace", self._pace, every=TICK_S, wake=self._wakeup)

    async def on_broker_ready(self, broker: Broker) -> None:
        """Listen for operator controls and the other replicas' heartbeats."""
        assert broker.channel is not None and broker.declared is not None and broker.connection is not None
        listeners = []
        for exchange, callback in ((topology.CONTROL_EXCHANGE, self._on_control),
                                   (topology.STATUS_EXCHANGE, self._on_heartbeat)):
            queue = await broker.channel.declare_queue("", exclusive=True, auto_delete=True)
            await queue.bind(broker.declared.exchanges[exchange])
            await queue.consume(callback, no_ack=True)
            listeners.append(queue)
        self._listeners = listeners
        self.pacing.listening(time.monotonic())
        # The shipping consumers are not robust (the pace loop decides when to consume):
        # after a reconnection they are gone, and the pace loop starts them again if it should.
        broker.connection.reconnect_callbacks.add(self._on_reconnected)
        self._wake()

    async def stop(self) -> None:
        """Stop consuming, let shipments in flight finish (bounded), then release the rest."""
        self._stopping = True
        for gate in (self.pacing.may_send, *(lane.may_send for lane in self.lanes.values())):
            gate.set()  # photos still waiting for their turn are released at once
        for lane in self.lanes.values():
            if self.broker.is_ready:
                with self._dependency("stopping the consumer"):
                    await self._set_consuming(lane, False)
            lane.consumer_tag = None
        if self._in_flight:
            log.info("stopping: finishing shipments in flight", extra={"in_flight": len(self._in_flight)})
            if not await _wait(self._idle, self.config.shutdown_timeout):
                # Give up on the rest: unacknowledged, they return to the queue when the
                # connection closes, and the next shipper ships them.
                log.warning("stopping with shipments unfinished; they will be redelivered",
                            extra={"in_flight": len(self._in_flight)})
                self.transfer.abort.set()
                if not await _wait(self._idle, ABORT_WAIT_S):
                    log.error("uploads did not stop; exiting anyway", extra={"in_flight": len(self._in_flight)})
        log.info("shipments settled; leaving", extra={"in_flight": len(self._in_flight)})
        # Say goodbye, so the others take over this replica's share now, not after PEER_TTL_S.
        self.pacing.leave()
        if self.broker.is_ready:
            with self._dependency("saying goodbye to the other shippers"):
                await self._publish_heartbeat()
        await self.breaker.close()
        self._threads.close()
        log.info("shipper stopped")

    def state(self) -> str:
        if self._stopping:
            return "stopping"
        if self.breaker.open:
            return "breaker_open"
        if self.pacing.cap <= 0:
            return "paused"
        if all(lane.consumer_tag is None for lane in self.lanes.values()):
            return "starting"
        return "running"

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            replica=self.replica,
            state=self.state(),
            busy=self.pacing.announced_busy,
            cap_bytes_per_s=self.pacing.cap,
            share_bytes_per_s=self.pacing.share,
            egress_bytes_per_s=self.egress,
            fresh_egress_bytes_per_s=self.lanes[FRESH].egress,
            sent_bytes_total=self.limiter.granted,
            shipped_objects_total=self.shipped_objects,
            in_flight=len(self._in_flight),
            concurrency=sum(lane.concurrency.limit for lane in self.lanes.values()),
            link_limited=any(lane.concurrency.link_limited for lane in self.lanes.values()),
            breaker_reason=self.breaker.reason,
        )

    # -- the pace loop ---------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        self._next_control = 0.0
        self._wake()

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        peer = Heartbeat.from_json(message.body)
        if peer is not None and self.pacing.hear(peer, time.monotonic()):
            self._wake()  # re-split the cap now, before the peer starts sending

    def _on_reconnected(self, _connection: object) -> None:
        for lane in self.lanes.values():
            lane.consumer_tag = None
        # Heartbeats sent while the connection was down were not heard: hear a round first.
        self.pacing.listening(time.monotonic())
        self._wake()

    async def _pace(self) -> StepResult:
        """One round: settings, queue depths, busy or not, the shares, consuming, concurrency, heartbeat."""
        now = time.monotonic()
        if now >= self._next_control:
            self._next_control = now + CONTROL_REFRESH_S
            with self._dependency("reading the operator's shipping settings"):
                self.control = await read_control(self.store)
        if (now >= self._next_backlog or (self._ran_dry and not self._in_flight)) and self.broker.is_ready:
            self._ran_dry = False
            self._next_backlog = now + BACKLOG_REFRESH_S
            with self._dependency("reading the shipping queues' depths"):
                depths = await self.broker.queue_depth(*(lane.queue for lane in self.lanes.values()))
                for lane in self.lanes.values():
                    lane.waiting = depths[lane.queue]
        waiting = sum(lane.waiting for lane in self.lanes.values())
        if self.pacing.announce(now, holding=bool(self._in_flight), waiting=waiting):
            self._next_heartbeat = now  # tell the others at once, either way
        moment = datetime.now(UTC)
        share = self.pacing.split(self.control.cap(self.config.schedule, moment), now)
        self.fresh_share = self.control.fresh_share(self.config.schedule, moment)
        self._apply_rates(share)
        with self._dependency("starting or stopping a consumer"):
            for lane in self.lanes.values():
                await self._watch_deliveries(lane, now)
                await self._set_consuming(lane, self._want_to_consume(lane))
        if now >= self._next_concurrency:
            self._next_concurrency = now + CONCURRENCY_WINDOW_S
            for lane in self.lanes.values():
                await self._adapt_concurrency(lane)
        self._account(now)
        if self._just_shipped and self.broker.is_ready:
            with self._dependency("telling the store keeper what shipped"):
                await self._publish_shipped()
        if now >= self._next_heartbeat and self.broker.is_ready:
            self._next_heartbeat = now + HEARTBEAT_EVERY_S
            with self._dependency("publishing the heartbeat"):
                await self._publish_heartbeat()
        # Open the gate on time, not at the next tick.
        return self.pacing.opens_in(time.monotonic())

    def _apply_rates(self, share: float) -> None:
        """The replica's limiter at its share; each lane's at its part while both have work."""
        # While paused, shipments in flight finish at the share they had.
        if share > 0 and share != self.limiter.rate:
            self.limiter.set_rate(share)
        fresh, backlog = self.lanes[FRESH], self.lanes[BACKLOG]
        rates = pacing.split(share, self.fresh_share, fresh_busy=fresh.busy, backlog_busy=backlog.busy)
        fresh.competing = backlog.competing = fresh.busy and backlog.busy
        for lane, rate in ((fresh, rates.fresh), (backlog, rates.backlog)):
            if rate is None:
                lane.may_send.clear()  # uploads under way finish; no new one starts
                continue
            if rate != lane.limiter.rate:
                lane.limiter.set_rate(rate)
            lane.may_send.set()

    @contextlib.contextmanager
    def _dependency(self, what: str) -> Iterator[None]:
        """Carry on without what a dependency could not give this round; say so once a minute."""
        try:
            yield
        except DEPENDENCY_ERRORS as exc:
            now = time.monotonic()
            if now - self._warned.get(what, -QUIET_REPEAT_S) >= QUIET_REPEAT_S:
                self._warned[what] = now
                log.warning("shipping loop: %s failed; carrying on", what, extra={"error": str(exc)})

    def _want_to_consume(self, lane: Lane) -> bool:
        if self._stopping or self.pacing.cap <= 0 or self.breaker.open or not self.broker.is_ready:
            return False
        # With no fresh share, fresh photos wait in their queue (or expire into the backlog)
        # until the backlog is empty: strictly oldest first.
        return not (lane.name == FRESH and self.fresh_share <= 0 and self.lanes[BACKLOG].busy)

    async def _set_consuming(self, lane: Lane, want: bool) -> None:
        if want == (lane.consumer_tag is not None) or self.broker.declared is None:
            return
        queue = self.broker.declared.queues[lane.queue]
        if want:
            assert self.broker.channel is not None
            # The prefetch applies to the consumer started next on the channel.
            prefetch = self._prefetch_limit(lane)
            await bounded(self.broker.channel.set_qos(prefetch_count=prefetch), "setting the prefetch",
                          timeout=CONSUMER_TIMEOUT_S)
            lane.prefetch = prefetch

            async def handle(message: AbstractIncomingMessage) -> None:
                await self._handle(lane, message)

            lane.consumer_tag = await bounded(queue.consume(handle, robust=False), "starting the consumer",
                                              timeout=CONSUMER_TIMEOUT_S)
            log.info("consuming", extra={"queue": lane.queue, "prefetch": prefetch})
        else:
            tag, lane.consumer_tag = lane.consumer_tag, None
            assert tag is not None
            log.info("stopping consuming", extra={"queue": lane.queue, "state": self.state()})
            await bounded(queue.cancel(tag), "stopping the consumer", timeout=CONSUMER_TIMEOUT_S)

    async def _watch_deliveries(self, lane: Lane, now: float) -> None:
        """Start a consumer again when photos wait but none arrive (the broker dropped the
        consumer without telling, or its deliveries were lost): a safety net, not the normal path."""
        starved = lane.consumer_tag is not None and lane.waiting > 0 and lane.in_flight == 0
        if not starved:
            lane.starved_since = None
            return
        if lane.starved_since is None:
            lane.starved_since = now
        elif now - lane.starved_since >= STARVED_AFTER_S:
            log.warning("photos wait in the queue but the broker delivers none; starting the consumer again",
                        extra={"queue": lane.queue, "waiting": lane.waiting, "for_s": round(now - lane.starved_since)})
            lane.starved_since = None
            await self._set_consuming(lane, False)

    async def _adapt_concurrency(self, lane: Lane) -> None:
        """Uploads at once in a lane, adapted to the link, and a prefetch to match."""
        limit = lane.concurrency.evaluate(window_s=CONCURRENCY_WINDOW_S, share=lane.limiter.rate,
                                          backlog=lane.waiting > 0 and lane.consumer_tag is not None)
        if limit != lane.slots.limit:
            await lane.slots.resize(limit)
        wanted = self._prefetch_limit(lane)
        # A consumer keeps the prefetch it started with: start it again (next round). What the old
        # one holds no longer counts against the new one's prefetch, so only once the lane holds no
        # more than the new limit: never more than twice the limit held at once.
        if lane.consumer_tag is not None and wanted != lane.prefetch and lane.in_flight <= wanted:
            with self._dependency("changing the prefetch"):
                await self._set_consuming(lane, False)

    def _prefetch_limit(self, lane: Lane) -> int:
        """As many as the lane uploads at once (the backlog one more, so its pipe never runs dry): what
        waits beyond that stays in the queue, where a fresh photo can still expire into the backlog.
        And no more than ships well inside the broker's consumer timeout at this share: every
        prefetched photo (up to the largest allowed) must be sent within a third of it."""
        wanted = lane.slots.limit + (1 if lane.name == BACKLOG else 0)
        if self.pacing.share <= 0:
            return wanted
        fits = int(self.pacing.share * self.config.consumer_timeout / 3 / self.config.max_image_bytes)
        return max(1, min(wanted, fits))

    def _account(self, now: float) -> None:
        elapsed = max(now - self._last_tick, 1e-3)
        granted = self.limiter.granted
        self.metrics.sent_bytes.inc(granted - self._last_granted)
        self.egress = 0.7 * self.egress + 0.3 * (granted - self._last_granted) / elapsed
        self._last_granted, self._last_tick = granted, now
        for lane in self.lanes.values():
            lane_granted = lane.limiter.granted
            lane.egress = 0.7 * lane.egress + 0.3 * (lane_granted - lane.last_granted) / elapsed
            self.metrics.class_sent_bytes.labels(lane.name).inc(lane_granted - lane.last_granted)
            lane.last_granted = lane_granted
            self.metrics.lane_egress.labels(lane.name).set(lane.egress)
        m = self.metrics
        m.cap.set(self.pacing.cap)
        m.share.set(self.pacing.share)
        m.fresh_share.set(self.fresh_share)
        m.egress.set(self.egress)
        m.breaker_open.set(1 if self.breaker.open else 0)
        m.link_limited.set(1 if any(lane.concurrency.link_limited for lane in self.lanes.values()) else 0)
        m.concurrency.set(sum(lane.concurrency.limit for lane in self.lanes.values()))
        m.in_flight.set(len(self._in_flight))

    async def _publish_heartbeat(self) -> None:
        message = aio_pika.Message(self.heartbeat().to_json(), content_type="application/json",
                                   expiration=int(HEARTBEAT_EVERY_S * 6))
        await self.broker.publish(topology.STATUS_EXCHANGE, "", message, timeout=HEARTBEAT_TIMEOUT_S,
                                  mandatory=False)

    async def _publish_shipped(self) -> None:
        """One notice per round for the photos marked shipped since the last (lost ones: the sweep corrects)."""
        batch, self._just_shipped = self._just_shipped[:SHIPPED_BATCH], self._just_shipped[SHIPPED_BATCH:]
        message = aio_pika.Message(ShippedNotice(self.replica, batch).to_json(), content_type="application/json",
                                   expiration=60)
        await self.broker.publish(topology.SHIPPED_EXCHANGE, "", message, timeout=HEARTBEAT_TIMEOUT_S,
                                  mandatory=False)

    async def _probe(self) -> None:
        await self._threads.run(self.transfer.probe)

    # -- one message ---------------------------------------------------------------------

    async def _handle(self, lane: Lane, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        lane.in_flight += 1
        self._idle.clear()
        if lane.in_flight == 1 or not self.pacing.announced_busy or not lane.may_send.is_set():
            # Announce now, and split the share between the lanes, rather than at the next tick:
            # a photo that started at the whole share could finish before the tick ever saw it.
            self._wake()
        try:
            await self.pacing.may_send.wait()
            await lane.may_send.wait()
            async with lane.slots.hold():
                if lane.name == FRESH and await self._demoted(message):
                    return
                await self._ship(lane, message)
        finally:
            self._in_flight.discard(task)
            lane.in_flight -= 1
            if not lane.in_flight:
                # The other lane may take the whole share now: the pace loop re-splits it at once,
                # and looks whether more waits.
                self._ran_dry = True
                self._wake()
            if not self._in_flight:
                self._idle.set()

    async def _demoted(self, message: AbstractIncomingMessage) -> bool:
        """Move a fresh photo that waited here past its window to the backlog, as its TTL would
        have in the queue (a prefetched message does not expire); True when it was moved."""
        try:
            job = photos.PhotoMessage.from_json(message.body)
            received = datetime.fromisoformat(job.received_at)
        except ValueError:
            return False  # shipping it parks it, with the reason
        if (datetime.now(UTC) - received).total_seconds() < self.config.fresh_window:
            return False
        demoted = messages.shipping_message(message.body, origin=messages.DEMOTED,
                                            attempt=messages.attempt_of(message.headers))
        try:
            await self.broker.publish(topology.PHOTOS_EXCHANGE, topology.SHIP_ROUTING_KEY, demoted,
                                      timeout=BROKER_TIMEOUT_S)
        except BrokerUnavailable as exc:
            log.warning("could not move a late fresh photo to the backlog; returning the message",
                        extra={"photo_id": job.id, "error": str(exc)})
            await self._release(message)
            return True
        log.info("fresh photo joined the backlog", extra={"photo_id": job.id, "window_s": self.config.fresh_window})
        await self._ack(message)
        return True

    async def _ship(self, lane: Lane, message: AbstractIncomingMessage) -> None:
        """Try the photo once and carry out what the policy decides."""
        attempt = messages.attempt_of(message.headers)
        job: photos.PhotoMessage | None = None
        shipment: Shipment | None = None
        outcome: BaseException | None = None
        started = time.monotonic()
        try:
            if self._stopping:
                raise Aborted("the shipper is stopping")
            job = _parse(message)
            async with self._photo_locks.hold(job.id):
                pace = Pace(self.limiter, lane.limiter, lambda: lane.competing)
                shipment = await self._ship_job(job, pace, maybe_there=_maybe_there(message, attempt))
        except Exception as exc:
            outcome = exc
            if not isinstance(exc, TransferError | policy.Malformed | policy.DeliveredTooOften | StoreUnavailable):
                log.exception("unexpected failure while shipping a photo; it will be retried",
                              extra={"photo_id": job.id if job else None})
        decision = policy.decide(outcome, attempt=attempt, max_attempts=self.config.max_attempts)
        await self._carry_out(message, job, decision)
        if outcome is None and job is not None:
            self._count_shipped(lane, job, shipment, attempt, time.monotonic() - started)

    async def _ship_job(self, job: photos.PhotoMessage, pace: Pace, *, maybe_there: bool) -> Shipment | None:
        """Copy the photo and mark it shipped; None when its marker says it was shipped before."""
        if await self.store.exists(photos.shipped_marker_key(job.id)):
            return None
        shipment = await self._threads.run(functools.partial(self.transfer.ship, job, pace,
                                                             maybe_there=maybe_there))
        await self._mark_shipped(job, shipment)
        return shipment

    async def _mark_shipped(self, job: photos.PhotoMessage, shipment: Shipment) -> None:
        await self.store.put(
            photos.shipped_marker_key(job.id),
            b"",
            metadata={
                "Content-Type": job.content_type,
                "sha256": job.sha256,
                "size": str(job.size),
                "device-id": job.device_id,
                "captured-at": job.captured_at,
                "received-at": job.received_at,
                "shipped-at": photos.canonical_time(datetime.now(UTC)),
                "remote-key": shipment.remote_key,
            },
        )

    def _count_shipped(self, lane: Lane, job: photos.PhotoMessage, shipment: Shipment | None, attempt: int,
                       duration_s: float) -> None:
        self.breaker.record_success()
        uploaded = shipment is not None and shipment.uploaded
        if shipment is not None:
            lag = max(0.0, (datetime.now(UTC) - datetime.fromisoformat(job.received_at)).total_seconds())
            self._just_shipped.append((job.id, job.size, round(lag, 3), lane.name))
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

    async def _carry_out(self, message: AbstractIncomingMessage, job: photos.PhotoMessage | None,
                         decision: Decision) -> None:
        if decision.trip_breaker:
            self.breaker.trip(decision.reason)
        elif decision.transient:
            self.breaker.record_transient(decision.reason)
        if decision.throttled:
            for lane in self.lanes.values():
                lane.concurrency.record_throttled()
        match decision.action:
            case Action.ACK:
                await self._ack(message)
            case Action.RETRY:
                await self._retry(message, decision)
            case Action.PARK:
                await self._park(message, job.id if job else None, decision)
            case Action.RELEASE:
                log.info("upload abandoned at stop; the message will be redelivered",
                         extra={"photo_id": job.id if job else None})
                await self._release(message)

    async def _retry(self, message: AbstractIncomingMessage, decision: Decision) -> None:
        """Send a new copy through a delay queue, then acknowledge this delivery."""
        delay = topology.RETRY_DELAYS_S[min(max(decision.attempt, 1), len(topology.RETRY_DELAYS_S)) - 1]
        retry = messages.shipping_message(message.body, origin=messages.RETRY, attempt=decision.attempt,
                                          last_error=decision.reason)
        try:
            await self.broker.publish(topology.RETRY_EXCHANGE, topology.retry_queue(delay), retry,
                                      timeout=BROKER_TIMEOUT_S)
        except BrokerUnavailable as exc:
            log.warning("could not schedule a retry; returning the message", extra={"error": str(exc)})
            await self._release(message)
            return
        self.metrics.retries.labels(decision.kind).inc()
        log.info("shipment will be retried", extra={"kind": decision.kind, "delay_s": delay,
                                                     "attempt": decision.attempt, "error": decision.reason})
        await self._ack(message)

    async def _park(self, message: AbstractIncomingMessage, photo_id: str | None, decision: Decision) -> None:
        try:
            await parking.park(self.broker, self.store, message.body, photo_id=photo_id, reason=decision.reason,
                               attempts=decision.attempt)
        except (BrokerUnavailable, StoreUnavailable) as exc:
            log.warning("could not park a photo; returning the message", extra={"error": str(exc)})
            await self._release(message)
            return
        self.metrics.parked.inc()
        await self._ack(message)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await bounded(message.ack(), "acknowledging", timeout=ACK_TIMEOUT_S)
        except BrokerUnavailable as exc:
            # The channel broke: the broker redelivers, and the marker makes that harmless.
            log.warning("acknowledgement lost; the message will be redelivered", extra={"error": str(exc)})

    async def _release(self, message: AbstractIncomingMessage) -> None:
        try:
            await bounded(message.nack(requeue=True), "returning a message", timeout=ACK_TIMEOUT_S)
        except BrokerUnavailable as exc:
            log.warning("could not return a message; the broker will", extra={"error": str(exc)})


def _maybe_there(message: AbstractIncomingMessage, attempt: int) -> bool:
    """Whether the photo may be in S3 already: anything but a first upload's first delivery
    (after the move to the backlog too: either way the conditional PUT finds a copy that is there)."""
    origin = (message.headers or {}).get(messages.ORIGIN_HEADER)
    return bool(message.redelivered) or attempt > 0 or origin not in (messages.UPLOAD, messages.DEMOTED)


def _parse(message: AbstractIncomingMessage) -> photos.PhotoMessage:
    """The photo a message asks to ship; raise what the policy parks."""
    try:
        job = photos.PhotoMessage.from_json(message.body)
    except ValueError as exc:
        raise policy.Malformed(f"not a shipping message: {exc}") from None
    deliveries = messages.delivery_count(message.headers)
    if deliveries >= topology.SHIP_DELIVERY_LIMIT - 1:
        raise policy.DeliveredTooOften(f"delivered {deliveries + 1} times without an acknowledgement "
                                       "(a shipper may crash on it)")
    return job


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; whether it came."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
