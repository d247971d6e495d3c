"""The shipping loop: consume, ship once, acknowledge only what is in S3.

For each message: skip it if the photo is already marked shipped; otherwise copy
it (``Transfer.ship``, which also skips a photo S3 already holds), write the
``shipped/`` marker, and only then acknowledge. What fails goes back through the
broker: a delayed retry (a TTL queue that returns it to the shipping queue), or
the parking queue with a reason. The shipper never requeues a message itself, so
the broker's delivery count only grows when a shipper dies holding it.

One loop keeps the pace: the site-wide cap (operator settings, else the
schedule), this replica's share of it, the upload concurrency, and a heartbeat.

The cap is global. Every replica announces in its heartbeat whether it is busy
(has photos in hand), hears the others', and takes cap / busy replicas: an idle
replica leaves its part to the others instead of wasting it. A replica that
turns busy waits until the others have heard so (JOIN_DELAY_S) before it sends,
so the shares never add up to more than the cap; while photos wait in the queue
it stays busy for BUSY_GRACE_S after its last one, so a steady stream does not
pay that wait, and when none wait it turns idle at once.

Messages for one photo can arrive together (a device retrying a photo that is
still queued queues it again): a replica ships them one after the other, so the
later ones find the photo marked shipped instead of uploading it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from services.common import parking, photos, topology
from services.common.broker import Broker, BrokerUnavailable
from services.common.config import ShipperConfig
from services.common.localstore import LocalStore, StoreUnavailable
from services.common.shipping import HEARTBEAT_EVERY_S, PEER_TTL_S, Heartbeat, ShippingControl, read_control
from services.shipper.breaker import Breaker
from services.shipper.concurrency import ConcurrencyController
from services.shipper.metrics import ShipperMetrics
from services.shipper.transfer import (
    Aborted,
    LocalCorrupt,
    LocalMissing,
    LocalUnavailable,
    Rejected,
    Shipment,
    Systemic,
    Transfer,
    Transient,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

TICK_S = 1.0
BACKLOG_REFRESH_S = 2.0  # how often the queue depth is read
CONTROL_REFRESH_S = 5.0
CONCURRENCY_WINDOW_S = 5.0
JOIN_DELAY_S = 0.25  # heartbeats cross the broker in milliseconds and peers re-split on receipt
BUSY_GRACE_S = 2.0
BROKER_TIMEOUT_S = 10.0
ABORT_WAIT_S = 5.0  # after the shutdown timeout, how long aborted uploads get to unwind


class PhotoLocks:
    """One lock per photo id, kept only while a message holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, photo_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(photo_id, (asyncio.Lock(), 0))
        self._locks[photo_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[photo_id]
            if users == 1:
                del self._locks[photo_id]
            else:
                self._locks[photo_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


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
        self.limiter = transfer.limiter
        self.breaker = Breaker(probe=self._probe, on_change=self._wake)
        self.concurrency = ConcurrencyController(initial=min(4, config.max_concurrency),
                                                 maximum=config.max_concurrency)
        self.control = ShippingControl()
        self.cap = 0.0
        self.share = 0.0
        self.busy_replicas = 1
        self.backlog = 0
        self.egress = 0.0
        self.shipped_objects = 0
        self._executor = ThreadPoolExecutor(max_workers=config.max_concurrency + 1, thread_name_prefix="transfer")
        self._consumer_tag: str | None = None
        self._control_queue: AbstractQueue | None = None
        self._status_queue: AbstractQueue | None = None
        self._peers: dict[str, tuple[bool, float]] = {}  # replica -> (busy, when heard)
        self._busy_until = 0.0  # announced busy until then (BUSY_GRACE_S after the last photo)
        self._announced_busy = False
        self._busy_announced_at = 0.0
        self._may_send = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._photo_locks = PhotoLocks()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._poll_channel: Any = None
        self._next_control = 0.0
        self._next_heartbeat = 0.0
        self._prefetch = 0
        self._ran_dry = False
        self._leaving = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._pace(), name="shipper-pace")

    async def on_broker_ready(self, broker: Broker) -> None:
        """Listen for operator controls (the shipping consumer is started by the pace loop)."""
        assert broker.channel is not None and broker.declared is not None and broker.connection is not None
        # Passive declares get a channel of their own: a failing one closes its channel.
        self._poll_channel = await broker.connection.channel(publisher_confirms=False)
        self._control_queue = await broker.channel.declare_queue("", exclusive=True, auto_delete=True)
        await self._control_queue.bind(broker.declared.exchanges[topology.CONTROL_EXCHANGE])
        await self._control_queue.consume(self._on_control, no_ack=True)
        self._status_queue = await broker.channel.declare_queue("", exclusive=True, auto_delete=True)
        await self._status_queue.bind(broker.declared.exchanges[topology.STATUS_EXCHANGE])
        await self._status_queue.consume(self._on_heartbeat, no_ack=True)
        self._wake()

    async def stop(self) -> None:
        """Stop consuming, let shipments in flight finish (bounded), then release the rest."""
        self._stopping = True
        await self._set_consuming(False)
        if self._in_flight:
            log.info("stopping: finishing shipments in flight", extra={"in_flight": len(self._in_flight)})
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.shutdown_timeout)
            except TimeoutError:
                # Give up on the rest: unacknowledged, they return to the queue when the
                # connection closes, and the next shipper ships them.
                log.warning("stopping with shipments unfinished; they will be redelivered",
                            extra={"in_flight": len(self._in_flight)})
                self.transfer.abort.set()
                try:
                    await asyncio.wait_for(self._idle.wait(), ABORT_WAIT_S)
                except TimeoutError:
                    log.error("uploads did not stop; exiting anyway", extra={"in_flight": len(self._in_flight)})
        log.info("shipments settled; leaving", extra={"in_flight": len(self._in_flight)})
        if self._loop_task is not None:
            # A flag, not cancel(): Python 3.11's wait_for can swallow a cancellation that
            # arrives as the awaited event fires, and the loop would never end.
            self._leaving = True
            self._wake()
            await self._loop_task
        # Say goodbye, so the others take over this replica's share now, not after PEER_TTL_S.
        self._announced_busy = False
        try:
            await self._publish_heartbeat()
        except (BrokerUnavailable, *CONNECTION_EXCEPTIONS) as exc:
            log.info("could not say goodbye to the other shippers", extra={"error": str(exc)})
        await self.breaker.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("shipper stopped")

    def state(self) -> str:
        if self._stopping:
            return "stopping"
        if self.breaker.open:
            return "breaker_open"
        if self.cap <= 0:
            return "paused"
        if self._consumer_tag is None:
            return "starting"
        return "running"

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            replica=self.replica,
            state=self.state(),
            busy=self._announced_busy,
            cap_bytes_per_s=self.cap,
            share_bytes_per_s=self.share,
            egress_bytes_per_s=self.egress,
            sent_bytes_total=self.limiter.granted,
            shipped_objects_total=self.shipped_objects,
            in_flight=len(self._in_flight),
            concurrency=self.concurrency.limit,
            link_limited=self.concurrency.link_limited,
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
        if peer is None or peer.replica == self.replica:
            return
        was_busy = self._peers.get(peer.replica, (False, 0.0))[0]
        self._peers[peer.replica] = (peer.busy, time.monotonic())
        if peer.busy != was_busy:
            self._wake()  # re-split the cap now, before the peer starts sending

    async def _pace(self) -> None:
        next_backlog = next_concurrency = 0.0
        last_granted, last_tick = self.limiter.granted, time.monotonic()
        while not self._leaving:
            now = time.monotonic()
            try:
                if now >= self._next_control:
                    self.control = await read_control(self.store)
                    self._next_control = now + CONTROL_REFRESH_S
                if now >= next_backlog or (self._ran_dry and not self._in_flight):
                    self._ran_dry = False
                    await self._refresh_backlog()
                    next_backlog = now + BACKLOG_REFRESH_S
                self._announce(now)
                self._apply_cap(now)
                await self._set_consuming(self._want_to_consume())
                if now >= next_concurrency:
                    await self._adapt_concurrency()
                    next_concurrency = now + CONCURRENCY_WINDOW_S
                granted = self.limiter.granted
                self.metrics.sent_bytes.inc(granted - last_granted)
                self.egress = 0.7 * self.egress + 0.3 * (granted - last_granted) / max(now - last_tick, 1e-3)
                last_granted, last_tick = granted, now
                self._export_gauges()
                if now >= self._next_heartbeat:
                    self._next_heartbeat = now + HEARTBEAT_EVERY_S
                    await self._publish_heartbeat()
            except (StoreUnavailable, BrokerUnavailable, *CONNECTION_EXCEPTIONS) as exc:
                log.warning("shipping control loop could not reach a dependency", extra={"error": str(exc)})
            except Exception:
                # The loop keeps the cap and the consumer right; it must outlive a bug.
                log.exception("shipping control loop failed; continuing")
            self._wakeup.clear()
            wait = TICK_S
            if self._announced_busy and not self._may_send.is_set():
                # Open the gate on time, not at the next tick.
                wait = max(0.01, self._busy_announced_at + JOIN_DELAY_S - time.monotonic())
            try:
                async with asyncio.timeout(min(wait, TICK_S)):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    def _announce(self, now: float) -> None:
        """Decide whether this replica is busy, and when it may send at its share."""
        if self._in_flight:
            self._busy_until = now + BUSY_GRACE_S
        elif self.backlog == 0:
            self._busy_until = min(self._busy_until, now)  # nothing waits: leave the cap to the others now
        busy = now < self._busy_until
        if busy != self._announced_busy:
            self._next_heartbeat = now  # tell the others at once, either way
            if busy:
                self._busy_announced_at = now
        self._announced_busy = busy
        if busy and now - self._busy_announced_at >= JOIN_DELAY_S:
            self._may_send.set()
        elif not busy:
            self._may_send.clear()

    def _apply_cap(self, now: float) -> None:
        self.cap = self.control.cap(self.config.schedule, datetime.now(UTC))
        busy_peers = sum(1 for busy, heard in self._peers.values() if busy and now - heard < PEER_TTL_S)
        self.busy_replicas = busy_peers + 1  # this replica's share, were it busy
        self.share = self.cap / self.busy_replicas if self.cap > 0 else 0.0
        # While paused, shipments in flight finish at the share they had.
        if self.share > 0 and self.share != self.limiter.rate:
            self.limiter.set_rate(self.share)

    async def _refresh_backlog(self) -> None:
        if not self.broker.is_ready or self._poll_channel is None:
            return
        channel = await self._poll_channel.get_underlay_channel()
        declared = await channel.queue_declare(topology.SHIP_QUEUE, passive=True)
        self.backlog = int(declared.message_count or 0)

    def _want_to_consume(self) -> bool:
        return not self._stopping and self.cap > 0 and not self.breaker.open and self.broker.is_ready

    async def _set_consuming(self, want: bool) -> None:
        if want == (self._consumer_tag is not None) or self.broker.declared is None:
            return
        queue = self.broker.declared.queues[topology.SHIP_QUEUE]
        if want:
            assert self.broker.channel is not None
            self._prefetch = self._prefetch_limit(self.concurrency.limit)
            await self.broker.channel.set_qos(prefetch_count=self._prefetch)
            self._consumer_tag = await queue.consume(self._handle)
            log.info("consuming the shipping queue", extra={"prefetch": self._prefetch})
        else:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await queue.cancel(tag)
            except CONNECTION_EXCEPTIONS as exc:
                log.warning("could not cancel the consumer", extra={"error": str(exc)})
            log.info("stopped consuming", extra={"state": self.state()})

    async def _adapt_concurrency(self) -> None:
        limit = self._prefetch_limit(self.concurrency.evaluate(
            window_s=CONCURRENCY_WINDOW_S, share=self.share,
            backlog=self.backlog > 0 and self._consumer_tag is not None))
        if self.broker.channel is not None and self._consumer_tag is not None and limit != self._prefetch:
            await self.broker.channel.set_qos(prefetch_count=limit)
        self._prefetch = limit

    def _prefetch_limit(self, wanted: int) -> int:
        """Prefetch no more than ships well inside the broker's consumer timeout at this share:
        every prefetched photo (up to the largest allowed) must be sent within a third of it."""
        if self.share <= 0:
            return wanted
        fits = int(self.share * self.config.consumer_timeout / 3 / self.config.max_image_bytes)
        return max(1, min(wanted, fits))

    async def _publish_heartbeat(self) -> None:
        message = aio_pika.Message(self.heartbeat().to_json(), content_type="application/json",
                                   expiration=int(HEARTBEAT_EVERY_S * 6))
        await self.broker.publish(topology.STATUS_EXCHANGE, "", message, timeout=BROKER_TIMEOUT_S,
                                  mandatory=False)

    def _export_gauges(self) -> None:
        m = self.metrics
        m.cap.set(self.cap)
        m.share.set(self.share)
        m.egress.set(self.egress)
        m.breaker_open.set(1 if self.breaker.open else 0)
        m.link_limited.set(1 if self.concurrency.link_limited else 0)
        m.concurrency.set(self.concurrency.limit)
        m.in_flight.set(len(self._in_flight))

    async def _probe(self) -> None:
        await self._in_thread(self.transfer.probe)

    # -- one message ---------------------------------------------------------------------

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        if not self._announced_busy:
            self._wake()  # announce now rather than at the next tick
        try:
            await self._may_send.wait()
            await self._ship(message)
        finally:
            self._in_flight.discard(task)
            if not self._in_flight:
                self._idle.set()
                self._ran_dry = True  # is more waiting? the pace loop looks at once
                self._wake()

    async def _ship(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        attempt = int(headers.get(parking.ATTEMPT_HEADER, 0) or 0)
        try:
            job = photos.PhotoMessage.from_json(message.body)
        except ValueError as exc:
            await self._park(message, None, f"not a shipping message: {exc}", attempt)
            return
        deliveries = int(headers.get("x-delivery-count", 0) or 0)
        if deliveries >= topology.SHIP_DELIVERY_LIMIT - 1:
            await self._park(message, job.id, f"delivered {deliveries + 1} times without an acknowledgement "
                             "(a shipper may crash on it)", attempt)
            return
        async with self._photo_locks.hold(job.id):
            await self._ship_job(message, job, attempt)

    async def _ship_job(self, message: AbstractIncomingMessage, job: photos.PhotoMessage, attempt: int) -> None:
        started = time.monotonic()
        try:
            if await self.store.exists(photos.shipped_marker_key(job.id)):
                self.metrics.duplicates.inc()
                await self._ack(message)
                return
            shipment = await self._in_thread(self.transfer.ship, job)
            await self._mark_shipped(job, shipment)
        except Aborted:
            log.info("upload abandoned at stop; the message will be redelivered", extra={"photo_id": job.id})
        except LocalMissing as exc:
            await self._park(message, job.id, str(exc), attempt)
        except LocalCorrupt as exc:
            # Retried once (a bad read), then parked: the local copy itself is wrong.
            if attempt >= 1:
                await self._park(message, job.id, str(exc), attempt)
            else:
                await self._retry(message, attempt + 1, str(exc), kind="local_corrupt")
        except Rejected as exc:
            await self._park(message, job.id, f"S3 refused the photo: {exc}", attempt)
        except Systemic as exc:
            self.breaker.trip(str(exc))
            await self._retry(message, attempt, str(exc), kind="systemic")
        except Transient as exc:
            self.breaker.record_transient(str(exc))
            if exc.throttled:
                self.concurrency.record_throttled()
            if attempt + 1 >= self.config.max_attempts:
                await self._park(message, job.id, f"gave up after {attempt + 1} attempts: {exc}", attempt + 1)
            else:
                await self._retry(message, attempt + 1, str(exc), kind="transient")
        except (LocalUnavailable, StoreUnavailable) as exc:
            # The site's own store is down: not the photo's fault, so no attempt is counted.
            await self._retry(message, attempt, str(exc), kind="local_store")
        else:
            self.breaker.record_success()
            await self._ack(message)
            self.shipped_objects += 1
            self.concurrency.record_sent(shipment.body_bytes)
            lag = max(0.0, (datetime.now(UTC) - datetime.fromisoformat(job.received_at)).total_seconds())
            self.metrics.lag.observe(lag)
            log.info("photo shipped" if shipment.uploaded else "photo already in S3",
                     extra={"photo_id": job.id, "size": job.size, "remote_key": shipment.remote_key,
                            "duration_ms": round((time.monotonic() - started) * 1000), "lag_s": round(lag, 1),
                            "attempt": attempt})
            if shipment.uploaded:
                self.metrics.shipped_objects.inc()
                self.metrics.shipped_bytes.inc(shipment.body_bytes)
            else:
                self.metrics.duplicates.inc()

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

    async def _retry(self, message: AbstractIncomingMessage, attempt: int, error: str, *, kind: str) -> None:
        """Send the message back through a delay queue, then acknowledge this delivery."""
        delay = topology.RETRY_DELAYS_S[min(max(attempt, 1), len(topology.RETRY_DELAYS_S)) - 1]
        headers = {**(message.headers or {}), parking.ATTEMPT_HEADER: attempt,
                   parking.LAST_ERROR_HEADER: error[:500]}
        headers.pop("x-delivery-count", None)
        retry = aio_pika.Message(message.body, content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers)
        try:
            await self.broker.publish(topology.RETRY_EXCHANGE, topology.retry_queue(delay), retry,
                                      timeout=BROKER_TIMEOUT_S)
        except BrokerUnavailable as exc:
            log.warning("could not schedule a retry; returning the message", extra={"error": str(exc)})
            await self._release(message)
            return
        self.metrics.retries.labels(kind).inc()
        log.info("shipment will be retried", extra={"kind": kind, "delay_s": delay, "attempt": attempt,
                                                     "error": error})
        await self._ack(message)

    async def _park(self, message: AbstractIncomingMessage, photo_id: str | None, reason: str, attempts: int) -> None:
        try:
            await parking.park(self.broker, self.store, message.body, photo_id=photo_id, reason=reason,
                               attempts=attempts)
        except (BrokerUnavailable, StoreUnavailable) as exc:
            log.warning("could not park a photo; returning the message", extra={"error": str(exc)})
            await self._release(message)
            return
        self.metrics.parked.inc()
        await self._ack(message)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except CONNECTION_EXCEPTIONS as exc:
            # The channel broke: the broker redelivers, and the marker makes that harmless.
            log.warning("acknowledgement lost; the message will be redelivered", extra={"error": str(exc)})

    async def _release(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.nack(requeue=True)
        except CONNECTION_EXCEPTIONS as exc:
            log.warning("could not return a message; the broker will", extra={"error": str(exc)})

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        # The copy of the context carries the trace into the worker thread.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(context.run, function, *args)
        )
