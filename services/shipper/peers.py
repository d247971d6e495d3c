"""This replica among the others, over the broker: its heartbeat out, theirs in, its shipped notices.

A loop of its own (``step``, supervised as ``shipper-peers``) publishes the
heartbeat every ``HEARTBEAT_EVERY_S`` and at once when this replica turns busy or
idle, and the photos shipped since the last notice, on the publishing
connection. What the broker confirms, and whether it blocks publishing (a
resource alarm), goes to ``CapShare``; a heartbeat heard from another replica
too (``hear``, from the consuming connection). Each of them may change this
replica's share, and ``on_change`` re-splits it at once. Publishing here never
holds up the pace loop or the uploads: a broker that is slow or blocking costs
only heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from services.common import topology
from services.common.broker import Broker, BrokerBlocked, BrokerUnavailable
from services.common.shipping import HEARTBEAT_EVERY_S, Heartbeat, ShippedNotice
from services.common.supervise import StepResult
from services.shipper.accounting import Accounting
from services.shipper.pacing import CapShare

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = 2.0
SHIPPED_BATCH = 5000  # photos in one shipped notice at most
QUIET_REPEAT_S = 60.0


class Peers:
    def __init__(self, *, replica: str, publisher: Broker, pacing: CapShare, accounting: Accounting,
                 heartbeat: Callable[[], Heartbeat], on_change: Callable[[], None]) -> None:
        self.replica = replica
        self._publisher = publisher
        self._pacing = pacing
        self._accounting = accounting
        self._heartbeat = heartbeat
        self._on_change = on_change
        self.wake = asyncio.Event()
        self._next_beat = 0.0
        self._warned_at = -QUIET_REPEAT_S

    def announce_now(self) -> None:
        """This replica turned busy or idle: tell the others now, not at the next beat."""
        self._next_beat = 0.0
        self.wake.set()

    async def on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        peer = Heartbeat.from_json(message.body)
        if peer is not None and self._pacing.hear(peer, time.monotonic()):
            self._on_change()  # re-split now, before the peer starts sending

    async def step(self) -> StepResult:
        """One round: note an alarm (or its end), the heartbeat when due, the shipped notice."""
        now = time.monotonic()
        self._pacing.forget_gone(now)
        if self._publisher.blocked != self._pacing.blocked:
            self._pacing.set_blocked(self._publisher.blocked, now)
            self._on_change()
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT_EVERY_S
            await self._beat()
        await self._notify_shipped()
        return max(0.0, self._next_beat - time.monotonic())

    async def say_goodbye(self) -> None:
        """A last heartbeat saying this replica is idle, so the others take its part now."""
        self._pacing.leave()
        await self._beat()

    async def _beat(self) -> None:
        if not self._publisher.is_ready:
            self._on_change()  # the broker is away: this replica may be cut off from the others now
            return
        beat = self._heartbeat()
        message = aio_pika.Message(beat.to_json(), content_type="application/json",
                                   expiration=int(HEARTBEAT_EVERY_S * 6))
        try:
            await self._publisher.publish(topology.STATUS_EXCHANGE, "", message, timeout=HEARTBEAT_TIMEOUT_S,
                                          mandatory=False)
        except BrokerBlocked:
            if not self._pacing.blocked:
                self._pacing.set_blocked(True, time.monotonic())
                self._on_change()
            return
        except BrokerUnavailable as exc:
            self._warn("publishing the heartbeat", exc)
            self._on_change()  # this replica may be cut off from the others now
            return
        self._pacing.confirmed(time.monotonic(), busy=beat.busy)
        self._on_change()

    async def _notify_shipped(self) -> None:
        """One notice for the photos marked shipped since the last (lost ones: the keeper's sweep corrects)."""
        if self._pacing.blocked or not self._publisher.is_ready:
            return
        batch = self._accounting.take_shipped(SHIPPED_BATCH)
        if not batch:
            return
        message = aio_pika.Message(ShippedNotice(self.replica, batch).to_json(), content_type="application/json",
                                   expiration=60)
        try:
            await self._publisher.publish(topology.SHIPPED_EXCHANGE, "", message, timeout=HEARTBEAT_TIMEOUT_S,
                                          mandatory=False)
        except BrokerUnavailable as exc:
            self._accounting.put_back(batch)
            self._warn("telling the store keeper what shipped", exc)

    def _warn(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= QUIET_REPEAT_S:
            self._warned_at = now
            log.warning("%s failed; carrying on", what, extra={"error": str(exc)})
