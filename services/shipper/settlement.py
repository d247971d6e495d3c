"""How a delivery is settled with the broker, whatever became of it.

- ``ack``: done with (shipped, already there, parked, or copied elsewhere).
- ``retry``: a new copy through a delay queue, then the ack.
- ``park``: the photo's marker and a copy on the parking queue, then the ack.
- ``give_back``: a copy on the queue it came from, then the ack. Used for every
  delivery the shipper hands back without a verdict: not started when its lane
  was gated or the shipper stopped, or abandoned mid-upload at a stop.
- ``demote``: a fresh photo past its window becomes a backlog photo (a copy on the
  backlog queue, then the ack), as its TTL would have moved it had it waited in
  the queue (a delivered message never expires).

Copies, never ``nack(requeue=True)``: before RabbitMQ 4.0 a quorum queue counts
every return towards the queue's ``x-delivery-limit`` (a nack, a cancelled
consumer, a closed channel alike), and a shipper that restarts often would park
healthy photos. A copy is published (and confirmed) before the original is
acknowledged, so a crash between the two leaves a duplicate message, which the
shipped marker makes harmless, never a lost one. Only when no copy can be
published (the broker away, or blocking publishers under a resource alarm) is a
delivery returned with a nack.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from services.common import messages, parking, photos, topology
from services.common.broker import Broker, BrokerUnavailable, bounded
from services.common.localstore import LocalStore, StoreUnavailable
from services.shipper.metrics import ShipperMetrics
from services.shipper.policy import Decision

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 10.0  # a copy for a retry, the parking queue, the backlog or the queue it came from
ACK_TIMEOUT_S = 5.0


def maybe_there(message: AbstractIncomingMessage) -> bool:
    """Whether the photo may be in S3 already: anything but a photo never tried before
    (a first upload's first delivery, a move to the backlog, a delivery given back unstarted);
    either way the conditional PUT finds a copy that is there."""
    origin = (message.headers or {}).get(messages.ORIGIN_HEADER)
    return (bool(message.redelivered) or messages.attempt_of(message.headers) > 0
            or origin not in (messages.UPLOAD, messages.DEMOTED, messages.GIVEN_BACK))


class Settlement:
    def __init__(self, *, publisher: Broker, store: LocalStore, metrics: ShipperMetrics, fresh_window: float) -> None:
        self._publisher = publisher
        self._store = store
        self._metrics = metrics
        self._fresh_window = fresh_window

    async def ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await bounded(message.ack(), "acknowledging", timeout=ACK_TIMEOUT_S)
        except BrokerUnavailable as exc:
            # The channel broke: the broker redelivers, and the marker makes that harmless.
            log.warning("acknowledgement lost; the message will be redelivered", extra={"error": str(exc)})

    async def retry(self, message: AbstractIncomingMessage, decision: Decision) -> None:
        """Send a new copy through a delay queue, then acknowledge this delivery."""
        delay = topology.RETRY_DELAYS_S[min(max(decision.attempt, 1), len(topology.RETRY_DELAYS_S)) - 1]
        retry = messages.shipping_message(message.body, origin=messages.RETRY, attempt=decision.attempt,
                                          last_error=decision.reason)
        if not await self._copy(message, topology.RETRY_EXCHANGE, topology.retry_queue(delay), retry,
                                what="schedule a retry"):
            return
        self._metrics.retries.labels(decision.kind).inc()
        log.info("shipment will be retried", extra={"kind": decision.kind, "delay_s": delay,
                                                     "attempt": decision.attempt, "error": decision.reason})
        await self.ack(message)

    async def park(self, message: AbstractIncomingMessage, photo_id: str | None, decision: Decision) -> None:
        try:
            await parking.park(self._publisher, self._store, message.body, photo_id=photo_id,
                               reason=decision.reason, attempts=decision.attempt)
        except (BrokerUnavailable, StoreUnavailable) as exc:
            log.warning("could not park a photo; returning the message", extra={"error": str(exc)})
            await self._return(message)
            return
        self._metrics.parked.inc()
        await self.ack(message)

    async def give_back(self, message: AbstractIncomingMessage, *, fresh: bool) -> None:
        """Put a copy back on the queue the delivery came from (a fresh photo past its window: the
        backlog), then acknowledge it: the broker does not count it as a delivery."""
        if _orphaned(message):
            return  # its channel is gone: the broker has taken it back already
        headers = message.headers or {}
        origin = messages.REDELIVERED if maybe_there(message) else messages.GIVEN_BACK
        last_error = headers.get(messages.LAST_ERROR_HEADER)
        routing_key, expires_in = topology.SHIP_ROUTING_KEY, None
        left = self._fresh_left(message) if fresh else None
        if left is not None and left > 0:
            routing_key, expires_in = topology.FRESH_ROUTING_KEY, left
        copy = messages.shipping_message(message.body, origin=origin, attempt=messages.attempt_of(headers),
                                         last_error=last_error if isinstance(last_error, str) else None,
                                         expires_in=expires_in)
        if await self._copy(message, topology.PHOTOS_EXCHANGE, routing_key, copy, what="give a message back"):
            await self.ack(message)

    async def demote(self, message: AbstractIncomingMessage) -> bool:
        """Move a fresh photo past its window to the backlog; False (nothing done) when it is still
        fresh, or when the broker takes no copy now (then it ships as fresh rather than wait)."""
        left = self._fresh_left(message)
        if left is None or left > 0:
            return False
        demoted = messages.shipping_message(message.body, origin=messages.DEMOTED,
                                            attempt=messages.attempt_of(message.headers))
        try:
            await self._publisher.publish(topology.PHOTOS_EXCHANGE, topology.SHIP_ROUTING_KEY, demoted,
                                          timeout=PUBLISH_TIMEOUT_S)
        except BrokerUnavailable as exc:
            log.info("a late fresh photo ships as fresh: the broker takes no copy for the backlog now",
                     extra={"error": str(exc)})
            return False
        log.info("fresh photo joined the backlog", extra={"window_s": self._fresh_window})
        await self.ack(message)
        return True

    def _fresh_left(self, message: AbstractIncomingMessage) -> float | None:
        """Seconds left in a fresh photo's window (None when its message cannot be read)."""
        try:
            received = datetime.fromisoformat(photos.PhotoMessage.from_json(message.body).received_at)
        except ValueError:
            return None
        return self._fresh_window - (datetime.now(UTC) - received).total_seconds()

    async def _copy(self, message: AbstractIncomingMessage, exchange: str, routing_key: str,
                    copy: aio_pika.Message, *, what: str) -> bool:
        """Publish ``copy``; on failure return ``message`` with a nack instead. True when published."""
        try:
            await self._publisher.publish(exchange, routing_key, copy, timeout=PUBLISH_TIMEOUT_S)
        except BrokerUnavailable as exc:
            log.warning("could not %s; returning the message with a nack (the broker counts it as a delivery)",
                        what, extra={"error": str(exc)})
            await self._return(message)
            return False
        return True

    async def _return(self, message: AbstractIncomingMessage) -> None:
        if _orphaned(message):
            return
        try:
            await bounded(message.nack(requeue=True), "returning a message", timeout=ACK_TIMEOUT_S)
        except BrokerUnavailable as exc:
            log.warning("could not return a message; the broker will", extra={"error": str(exc)})


def _orphaned(message: AbstractIncomingMessage) -> bool:
    """Whether the channel the message came on is closed (it can no longer be settled)."""
    channel = getattr(message, "channel", None)
    return bool(getattr(channel, "is_closed", False))
