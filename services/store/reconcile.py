"""Reconciling: every unshipped photo has a shipping message somewhere.

After each sweep, the unshipped photos are compared with the *photos* the broker
holds messages for (ready, in retry, parked, in the shippers' hands): the messages
less the duplicates the keeper heard published (a device retrying a photo still
queued queues it again; so does a reconcile). The fresh queue's overflow moves
photos to the backlog at most once, and a message count alone would let another
photo's duplicate hide such a lost move. Only the deficit is re-enqueued, so a long
healthy backlog (one the keeper knows nothing of after its restart) gets no
duplicates: photos that never had a message as far as the keeper knows first, then
the oldest; never a photo known to have a second message (it has one).
"""

from __future__ import annotations

import hashlib
import logging

from services.common import messages, photos, topology
from services.common.broker import Broker, BrokerUnavailable
from services.common.localstore import LocalStore
from services.store.metrics import KeeperMetrics
from services.store.sweep import SweepResult
from services.store.tap import Tap

log = logging.getLogger(__name__)

RECONCILE_BATCH = 5000  # most re-enqueued per sweep
BROKER_TIMEOUT_S = 10.0


class Reconciler:
    def __init__(self, *, store: LocalStore, broker: Broker, tap: Tap, metrics: KeeperMetrics) -> None:
        self.store = store
        self.broker = broker
        self.tap = tap
        self.metrics = metrics
        self.queued = 0  # shipping messages the broker holds, at the last count
        self.parked_messages = 0

    async def count_queued(self) -> int | None:
        """Messages ready, in retry and in the shippers' hands (None while the broker is away);
        the parking queue's count is kept aside."""
        try:
            depths = await self.broker.queue_depth(*topology.PHOTO_QUEUES)
        except BrokerUnavailable as exc:
            if not self.broker.starting:
                log.warning("could not count queued photos", extra={"error": str(exc)})
            return None
        self.parked_messages = depths.pop(topology.PARKED_QUEUE)
        return sum(depths.values()) + sum(beat.in_flight for beat in self.tap.shippers())

    async def reconcile(self, result: SweepResult, queued_before: int, queued_after: int) -> int:
        """Re-enqueue the photos without a message; return how many. Raises BrokerUnavailable or
        StoreUnavailable when a publish or a read fails (what was re-enqueued stays done)."""
        # Photos parked with a marker are not counted as unshipped, so neither are their
        # messages; those the broker dead-lettered itself (no marker) are.
        self.queued = max(queued_before, queued_after) + max(0, self.parked_messages - result.parked)
        duplicates = sum(self.tap.extra.values())
        deficit = result.unshipped - max(0, self.queued - duplicates)
        self.metrics.unaccounted.set(max(0, deficit))
        if deficit <= 0:
            return 0
        candidates = [o.id for o in result.orphans if not self.tap.has_extra(o.id)][:min(deficit, RECONCILE_BATCH)]
        reconciled = 0
        for photo_id in candidates:
            if await self.store.exists(photos.shipped_marker_key(photo_id)):
                continue  # shipped while the sweep ran
            message = await self._message_for(photo_id)
            if message is None:
                continue
            await self.broker.publish(
                topology.PHOTOS_EXCHANGE, topology.SHIP_ROUTING_KEY,
                messages.shipping_message(message.to_json(), origin=messages.RECONCILE),
                timeout=BROKER_TIMEOUT_S,
            )
            self.tap.saw(photo_id)
            reconciled += 1
        if reconciled:
            log.warning("re-enqueued photos that had no shipping message",
                        extra={"count": reconciled, "unshipped": result.unshipped, "queued": self.queued,
                               "duplicates": duplicates})
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
        try:
            return photos.PhotoMessage.from_metadata(photo_id, size=stored.size, content_type=stored.content_type,
                                                     metadata=stored.metadata, stored_at=stored.last_modified,
                                                     sha256=sha256)
        except ValueError as exc:
            log.error("a stored photo's metadata is of a format this release does not read; "
                      "it is queued when a newer keeper runs", extra={"photo_id": photo_id, "error": str(exc)})
            return None
