"""What the store keeper hears on the broker: photos being queued, and shipper heartbeats.

A queue of its own, bound like the shipping queue, gets a copy of every shipping
message: first publishes give the ingest rate and each device's last upload;
every message tells that a photo has (had) a message, which the reconciler uses
to prefer photos that never had one. Heartbeats give the shippers' state, egress
and shipments in flight. The queues are temporary: what is missed while the keeper
is down is made up by the next sweep of the store.
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
        if not messages.is_first_publish(message.headers):
            return
        now = time.time()
        self.ingest_bytes.add(job.size)
        self.ingest_photos.add(1)
        self.device_seen[job.device_id] = now
        if self.on_queued is not None:
            self.on_queued(job.id, job.size, now)

    async def _on_shipped(self, message: AbstractIncomingMessage) -> None:
        notice = ShippedNotice.from_json(message.body)
        if notice is not None and self.on_shipped is not None:
            for photo_id, size, lag, kind in notice.photos:
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

    def has_seen(self, photo_id: str) -> bool:
        return id_hash(photo_id) in self.seen

    def shippers(self) -> list[Heartbeat]:
        """Replicas heard from lately (a replica that said goodbye is not busy and drops out later)."""
        now = time.monotonic()
        for replica, (_, heard) in list(self._shippers.items()):
            if now - heard > PEER_TTL_S * 3:
                del self._shippers[replica]
        return [beat for beat, heard in self._shippers.values() if now - heard <= PEER_TTL_S]
