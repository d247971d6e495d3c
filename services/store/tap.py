"""What the store keeper hears on the broker: photos being queued, and shipper heartbeats.

A queue of its own, bound like the shipping queues (and to the retry and parking
exchanges), gets a copy of every shipping message: first publishes give the ingest
rate, each device's last upload and the gateways publishing; every message tells
that a photo has (had) a message, which the reconciler uses to prefer photos that
never had one; and copies that are a photo's second message (a device's retry, a
reconcile) tell how many messages are duplicates, which a count must not take for
photos. Heartbeats give the shippers' state, egress and
shipments in flight. The queues are temporary: what is missed while the keeper is
down is made up by the next sweep of the store.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from services.common import messages, photos, topology
from services.common.broker import Broker
from services.common.shipping import PEER_TTL_S, Heartbeat, ShippedNotice

log = logging.getLogger(__name__)


def id_hash(photo_id: str) -> int:
    """8 bytes per photo id: the seen-set holds a backlog's worth of them."""
    return int.from_bytes(hashlib.blake2b(photo_id.encode(), digest_size=8).digest(), "big")


class RateWindow:
    """Events per second over the last ``span_s`` seconds, in one-second buckets."""

    def __init__(self, span_s: int = 60) -> None:
        self._span = span_s
        self._buckets: deque[list[float]] = deque()  # [second, amount]
        self.total = 0.0

    def add(self, amount: float, now: float | None = None) -> None:
        second = int(now if now is not None else time.time())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += amount
        else:
            self._buckets.append([second, amount])
        self.total += amount

    def rate(self, now: float | None = None) -> float:
        cutoff = (now if now is not None else time.time()) - self._span
        while self._buckets and self._buckets[0][0] < cutoff:
            self._buckets.popleft()
        return sum(amount for _, amount in self._buckets) / self._span


class Tap:
    def __init__(self) -> None:
        self.ingest_bytes = RateWindow(60)
        self.ingest_photos = RateWindow(60)
        self.device_seen: dict[str, float] = {}  # device -> time of its last upload (epoch s)
        self.seen: set[int] = set()  # id hashes of photos that had a message since the keeper started
        self._fresh: set[int] = set()  # ... of which heard since the current sweep began
        # Unshipped photos with more than one message: id hash -> how many more (published while
        # one may still be queued: a device's retry, a reconcile). Moves between queues are not copies.
        self.extra: dict[int, int] = {}
        # Gateway replica -> (its last first publish, epoch s; the bytes it said it had stored by then).
        self.publishers: dict[str, tuple[float, int]] = {}
        self.stored_heard = 0  # bytes the gateways stored, as far as heard (a counter for usage between sweeps)
        self._shippers: dict[str, tuple[Heartbeat, float]] = {}
        self._queues: list[AbstractQueue] = []
        # Set by the keeper: told of every first publish and every shipment, for the live backlog.
        self.on_queued: Callable[[str, int, float], None] | None = None
        self.on_shipped: Callable[[str, int, float, str], None] | None = None

    async def attach(self, broker: Broker) -> None:
        """Bind temporary queues to the photos and status exchanges (on broker ready)."""
        assert broker.channel is not None and broker.declared is not None
        copies = await broker.channel.declare_queue("", exclusive=True, auto_delete=True)
        for routing_key in (topology.FRESH_ROUTING_KEY, topology.SHIP_ROUTING_KEY):
            await copies.bind(broker.declared.exchanges[topology.PHOTOS_EXCHANGE], routing_key)
        for delay in topology.RETRY_DELAYS_S:
            await copies.bind(broker.declared.exchanges[topology.RETRY_EXCHANGE], topology.retry_queue(delay))
        await copies.bind(broker.declared.exchanges[topology.PARKING_EXCHANGE])
        await copies.consume(self._on_photo, no_ack=True)
        heartbeats = await broker.channel.declare_queue("", exclusive=True, auto_delete=True)
        await heartbeats.bind(broker.declared.exchanges[topology.STATUS_EXCHANGE])
        await heartbeats.consume(self._on_heartbeat, no_ack=True)
        shipped = await broker.channel.declare_queue("", exclusive=True, auto_delete=True)
        await shipped.bind(broker.declared.exchanges[topology.SHIPPED_EXCHANGE])
        await shipped.consume(self._on_shipped, no_ack=True)
        self._queues = [copies, heartbeats, shipped]  # robust channels restore only what is referenced

    async def _on_photo(self, message: AbstractIncomingMessage) -> None:
        try:
            job = photos.PhotoMessage.from_json(message.body)
        except ValueError:
            return  # the shipper parks what is not a shipping message
        self.saw(job.id)
        now = time.time()
        if (message.headers or {}).get(messages.ORIGIN_HEADER) in (messages.DEVICE_RETRY, messages.RECONCILE) and (
                "x-death" not in (message.headers or {})):
            digest = id_hash(job.id)
            self.extra[digest] = self.extra.get(digest, 0) + 1
        if not messages.is_first_publish(message.headers):
            return
        self.ingest_bytes.add(job.size)
        self.ingest_photos.add(1)
        self.device_seen[job.device_id] = now
        headers = message.headers or {}
        publisher, stored = headers.get(messages.PUBLISHER_HEADER), headers.get(messages.PUBLISHER_BYTES_HEADER)
        if isinstance(publisher, str) and isinstance(stored, int) and not isinstance(stored, bool):
            previous = self.publishers.get(publisher)
            # A gateway's running total also covers photos it stored but could not queue.
            self.stored_heard += job.size if previous is None else max(0, stored - previous[1])
            self.publishers[publisher] = (now, max(stored, previous[1] if previous else 0))
        else:
            self.stored_heard += job.size  # a gateway that sends no total
        if self.on_queued is not None:
            self.on_queued(job.id, job.size, now)

    async def _on_shipped(self, message: AbstractIncomingMessage) -> None:
        notice = ShippedNotice.from_json(message.body)
        if notice is None:
            return
        for photo_id, size, lag, kind in notice.photos:
            self.extra.pop(id_hash(photo_id), None)
            if self.on_shipped is not None:
                self.on_shipped(photo_id, size, lag, kind)

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        beat = Heartbeat.from_json(message.body)
        if beat is not None:
            self._shippers[beat.replica] = (beat, time.monotonic())

    def saw(self, photo_id: str) -> None:
        digest = id_hash(photo_id)
        self.seen.add(digest)
        self._fresh.add(digest)

    def begin_sweep(self) -> None:
        self._fresh = set()

    def prune(self, unshipped: set[int]) -> None:
        """Forget photos that shipped: keep those still unshipped and those heard during the sweep."""
        self.seen = (self.seen & unshipped) | self._fresh
        self.extra = {h: n for h, n in self.extra.items() if h in unshipped or h in self._fresh}

    def has_extra(self, photo_id: str) -> bool:
        """Whether a photo had a second message (so it has one, whatever happened to the first)."""
        return id_hash(photo_id) in self.extra

    def gateways(self, within_s: float = 60.0) -> dict[str, int]:
        """Gateway replicas that stored a photo lately, with the bytes each said it had stored."""
        cutoff = time.time() - within_s
        for publisher, (at, _) in list(self.publishers.items()):
            if at < cutoff:
                del self.publishers[publisher]
        return {publisher: stored for publisher, (_, stored) in self.publishers.items()}

    def has_seen(self, photo_id: str) -> bool:
        return id_hash(photo_id) in self.seen

    def shippers(self) -> list[Heartbeat]:
        """Replicas heard from lately (a replica that said goodbye is not busy and drops out later)."""
        now = time.monotonic()
        for replica, (_, heard) in list(self._shippers.items()):
            if now - heard > PEER_TTL_S * 3:
                del self._shippers[replica]
        return [beat for beat, heard in self._shippers.values() if now - heard <= PEER_TTL_S]
