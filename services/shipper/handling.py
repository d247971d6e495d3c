"""One delivery, from its arrival to its settlement.

A fresh photo already past its window is moved to the backlog at once, before
it waits for anything. Every other delivery waits for its lane's turn (the
replica may send, the lane is not gated, a slot is free); a lane told to give
its deliveries back returns the ones still waiting. Then, under the photo's
lock (copies of one photo ship one after another): skip it if the photo is
marked shipped, else copy it (``Transfer.ship``, which also skips a photo S3
already holds) and mark it shipped. How the attempt ended decides, through the
pure ``policy.decide``, how the delivery is settled. Every path settles it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from services.common import messages, photos, topology
from services.common.config import ShipperConfig
from services.common.localstore import LocalStore, StoreUnavailable
from services.shipper import policy
from services.shipper.accounting import Accounting
from services.shipper.breaker import Breaker
from services.shipper.failures import Aborted, TransferError
from services.shipper.lanes import BACKLOG, FRESH, Lane
from services.shipper.limiter import Pace, RateLimiter
from services.shipper.locks import PhotoLocks
from services.shipper.pacing import CapShare
from services.shipper.policy import Action, Decision
from services.shipper.settlement import Settlement, maybe_there
from services.shipper.threads import Threads
from services.shipper.transfer import Shipment, Transfer

log = logging.getLogger(__name__)


class Handler:
    def __init__(self, config: ShipperConfig, *, store: LocalStore, transfer: Transfer, limiter: RateLimiter,
                 pacing: CapShare, settlement: Settlement, accounting: Accounting, breaker: Breaker,
                 threads: Threads, lanes: dict[str, Lane], wake: Callable[[], None],
                 ran_dry: Callable[[], None]) -> None:
        self.config = config
        self.store = store
        self.transfer = transfer
        self.limiter = limiter
        self.pacing = pacing
        self.settlement = settlement
        self.accounting = accounting
        self.breaker = breaker
        self.threads = threads
        self.lanes = lanes
        self._wake = wake
        self._ran_dry = ran_dry
        self.in_flight: set[asyncio.Task[Any]] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopping = False
        self._locks = PhotoLocks()

    async def handle(self, lane: Lane, message: AbstractIncomingMessage) -> None:
        """Carry one delivery of ``lane`` through to its settlement."""
        task = asyncio.current_task()
        assert task is not None
        self.in_flight.add(task)
        lane.in_flight += 1
        self.idle.clear()
        if lane.in_flight == 1 or not self.pacing.announced_busy:
            # Announce now and split the share between the lanes, rather than at the next tick:
            # a photo that started at the whole share could finish before the tick ever saw it.
            self._wake()
        try:
            if lane.name == FRESH and await self.settlement.demote(message):
                return
            if not await lane.turn(self.pacing.may_send, stopping=lambda: self.stopping):
                await self.settlement.give_back(message, fresh=lane.name == FRESH)
                return
            try:
                await self._ship(lane, message)
            finally:
                lane.release()
        finally:
            self.in_flight.discard(task)
            lane.in_flight -= 1
            if not lane.in_flight:
                # The other lane may take the whole share now: the pace loop re-splits it at once,
                # and looks whether more waits.
                self._ran_dry()
            if not self.in_flight:
                self.idle.set()

    async def _ship(self, lane: Lane, message: AbstractIncomingMessage) -> None:
        """Try the photo once and carry out what the policy decides."""
        attempt = messages.attempt_of(message.headers)
        job: photos.PhotoMessage | None = None
        shipment: Shipment | None = None
        outcome: BaseException | None = None
        started = time.monotonic()
        try:
            if self.stopping:
                raise Aborted("the shipper is stopping")
            job = _parse(message)
            async with self._locks.hold(job.id):
                # Fresh photos' bytes count against the backlog's part too: it takes only what they leave.
                backlog = self.lanes[BACKLOG].limiter if lane.name == FRESH else None
                pace = Pace(self.limiter, lane.limiter, lambda: lane.competing, charge=backlog)
                shipment = await self._ship_job(job, pace, maybe_there=maybe_there(message))
        except Exception as exc:
            outcome = exc
            if not isinstance(exc, TransferError | policy.Malformed | policy.DeliveredTooOften | StoreUnavailable):
                log.exception("unexpected failure while shipping a photo; it will be retried",
                              extra={"photo_id": job.id if job else None})
        decision = policy.decide(outcome, attempt=attempt, max_attempts=self.config.max_attempts)
        await self._carry_out(lane, message, job, decision)
        if outcome is None and job is not None:
            self.breaker.record_success()
            self.accounting.shipped(lane, job, shipment, attempt=attempt, duration_s=time.monotonic() - started)

    async def _ship_job(self, job: photos.PhotoMessage, pace: Pace, *, maybe_there: bool) -> Shipment | None:
        """Copy the photo and mark it shipped; None when its marker says it was shipped before."""
        if await self.store.exists(photos.shipped_marker_key(job.id)):
            return None
        shipment = await self.threads.run(functools.partial(self.transfer.ship, job, pace,
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

    async def _carry_out(self, lane: Lane, message: AbstractIncomingMessage, job: photos.PhotoMessage | None,
                         decision: Decision) -> None:
        if decision.trip_breaker:
            self.breaker.trip(decision.reason)
        elif decision.transient:
            self.breaker.record_transient(decision.reason)
        if decision.throttled:
            for each in self.lanes.values():
                each.concurrency.record_throttled()
        match decision.action:
            case Action.ACK:
                await self.settlement.ack(message)
            case Action.RETRY:
                await self.settlement.retry(message, decision)
            case Action.PARK:
                await self.settlement.park(message, job.id if job else None, decision)
            case Action.RELEASE:
                log.info("upload abandoned at stop; the message goes back to its queue",
                         extra={"photo_id": job.id if job else None})
                await self.settlement.give_back(message, fresh=lane.name == FRESH)


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
