"""Parked photos: shipments that cannot succeed by retrying, kept for an operator.

Parking writes a marker object (``parked/...``, a small JSON with the reason) and
puts the shipping message on the parking queue. Operators list the markers and
replay the queue: each parked message goes back to the shipping queue and its
marker is removed. Messages the broker dead-letters itself (past the delivery
limit) arrive on the parking queue without a marker; replay takes them too.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import orjson

from services.common import messages, photos, topology
from services.common.broker import Broker, BrokerUnavailable, bounded
from services.common.localstore import LocalStore, StoreUnavailable

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ParkedPhoto:
    id: str
    reason: str
    parked_at: str
    attempts: int


async def park(
    broker: Broker, store: LocalStore, body: bytes, *, photo_id: str | None, reason: str, attempts: int
) -> None:
    """Record why a photo is parked and move its message to the parking queue."""
    parked = ParkedPhoto(id=photo_id or "", reason=reason, parked_at=datetime.now(UTC).isoformat(),
                         attempts=attempts)
    if photo_id is not None:
        await store.put(photos.parked_marker_key(photo_id), orjson.dumps(asdict(parked)),
                        metadata={"Content-Type": "application/json"})
    message = messages.shipping_message(body, origin=messages.PARKED, attempt=attempts, park_reason=reason)
    await broker.publish(topology.PARKING_EXCHANGE, "", message, timeout=PUBLISH_TIMEOUT_S)
    log.warning("photo parked", extra={"photo_id": photo_id, "reason": reason, "attempts": attempts})


async def list_parked(store: LocalStore, *, limit: int = 1000) -> list[ParkedPhoto]:
    """The parked photos an operator should look at, oldest capture first."""
    found: list[ParkedPhoto] = []
    async for page in store.list(photos.PARKED_PREFIX):
        for item in page:
            body = await store.read(item["path"])
            if body is None:
                continue  # replayed meanwhile
            try:
                found.append(ParkedPhoto(**orjson.loads(body)))
            except (ValueError, TypeError) as exc:
                log.error("unreadable parked marker", extra={"key": item["path"], "error": str(exc)})
            if len(found) >= limit:
                return found
    return found


async def replay(broker: Broker, store: LocalStore) -> int:
    """Send the photos parked now back to the shipping queue; return how many.

    Only the messages on the parking queue when the replay starts are taken: a photo
    that parks again at once waits for the next replay instead of looping. Markers
    that were there at the start and have no message (the parking queue was purged)
    are removed too: their photos are then unshipped photos without a message, which
    the store keeper's reconciler queues again at its next sweep.
    """
    if broker.declared is None or not broker.is_ready:
        raise BrokerUnavailable(f"broker {broker.readiness()}")
    started = datetime.now(UTC)
    markers = [item["path"] async for page in store.list(photos.PARKED_PREFIX) for item in page]
    parked_now = (await broker.queue_depth(topology.PARKED_QUEUE))[topology.PARKED_QUEUE]
    queue = broker.declared.queues[topology.PARKED_QUEUE]
    replayed: set[str] = set()
    count = 0
    for _ in range(parked_now):
        message = await bounded(queue.get(no_ack=False, fail=False, timeout=PUBLISH_TIMEOUT_S),
                                "taking a parked message", timeout=PUBLISH_TIMEOUT_S * 2)
        if message is None:
            break
        # A new message: its attempts and the broker's delivery count start again.
        fresh = messages.shipping_message(message.body, origin=messages.REPLAY)
        try:
            await broker.publish(topology.PHOTOS_EXCHANGE, topology.SHIP_ROUTING_KEY, fresh,
                                 timeout=PUBLISH_TIMEOUT_S)
        except BrokerUnavailable:
            with contextlib.suppress(BrokerUnavailable):
                await bounded(message.nack(requeue=True), "returning a parked message")
            raise
        try:
            photo_id = photos.PhotoMessage.from_json(message.body).id
        except ValueError:
            photo_id = None
        try:
            if photo_id is not None:
                replayed.add(photo_id)
                await store.delete(photos.parked_marker_key(photo_id))
        except StoreUnavailable as exc:
            log.warning("a replayed photo's parked marker could not be removed; it is listed until the next replay",
                        extra={"photo_id": photo_id, "error": str(exc)})
        finally:
            # Once its copy is on the shipping queue the parked message is done with, whatever else failed.
            await bounded(message.ack(), "acknowledging a replayed message")
        count += 1
    leftover = [key for key in markers if key.rsplit("/", 1)[-1] not in replayed
                and await _parked_before(store, key, started)]
    await store.delete_many(leftover)
    log.info("parked photos replayed", extra={"count": count, "markers_without_message": len(leftover)})
    return count


async def _parked_before(store: LocalStore, key: str, moment: datetime) -> bool:
    """Whether the marker at ``key`` is still the one written before ``moment`` (not a new parking)."""
    body = await store.read(key)
    if body is None:
        return False
    try:
        return datetime.fromisoformat(orjson.loads(body)["parked_at"]) < moment
    except (ValueError, TypeError, KeyError):
        return True  # unreadable: nothing would ever read it
