"""Reconciling: every unshipped photo has a shipping message somewhere.

Two kinds of repair, after each sweep of the store:

- **By set**: photos the keeper heard queued on the fresh queue that never moved on
  (to the backlog, a retry, parking) nor shipped, long after their window. The fresh
  queue's overflow moves photos to the backlog at most once; a move the broker lost
  leaves such a photo, and no count would show it while another photo has two
  messages (a device's retry queues a photo again).
- **By count**: the unshipped photos against the messages the broker holds (ready,
  in retry, parked, and in the shippers' hands). Only a deficit is re-enqueued, so
  a long healthy backlog (one the keeper knows nothing of after its restart) gets
  no duplicates: photos that never had a message as far as the keeper knows first,
  then the oldest.
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
    def __init__(self, *, store: LocalStore, broker: Broker, tap: Tap, metrics: KeeperMetrics,
                 fresh_window: float, reconcile_every: float) -> None:
        self.store = store
        self.broker = broker
        self.tap = tap
        self.metrics = metrics
        # A fresh photo moves on within its window; the rest is slack for a queue's head
        # and a shipper holding it when the window ends.
        self.lost_after_s = 2 * fresh_window + reconcile_every
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
        deficit = result.unshipped - self.queued
        self.metrics.unaccounted.set(max(0, deficit))
        lost = self.tap.lost_fresh(older_than_s=self.lost_after_s, unshipped=result.unshipped_ids)
        candidates = list(lost)
        if deficit > 0:
            taken = set(lost)
            candidates += [o.id for o in result.orphans if o.id not in taken][:deficit]
        reconciled = 0
        for photo_id in candidates[:RECONCILE_BATCH]:
            if await self.store.exists(photos.shipped_marker_key(photo_id)):
                self.tap.forget(photo_id)
                continue  # shipped while the sweep ran
            message = await self._message_for(photo_id)
            if message is None:
                self.tap.forget(photo_id)
                continue
            await self.broker.publish(
                topology.PHOTOS_EXCHANGE, topology.SHIP_ROUTING_KEY,
                messages.shipping_message(message.to_json(), origin=messages.RECONCILE),
                timeout=BROKER_TIMEOUT_S,
            )
            self.tap.saw(photo_id)
            self.tap.forget(photo_id)
            reconciled += 1
        if reconciled:
            log.warning("re-enqueued photos that had no shipping message",
                        extra={"count": reconciled, "lost_moves": len(lost), "unshipped": result.unshipped,
                               "queued": self.queued})
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
