"""The two classes of shipping work, each a lane of its own.

A lane is one queue (``photoferry.fresh`` or the backlog, ``photoferry.ship``)
consumed on a channel of its own on the shipper's consuming connection, with its
prefetch, its uploads at once (``slots``), its limiter (its part of the share
while the other lane has work too) and its gate. The pace loop decides when a
lane consumes, at what prefetch, and whether it may start uploads; a delivery
waits for its lane's turn (``Lane.turn``), and a lane that must not hold
deliveries (paused, gated, stopping) has them given back (``give_back``).

A consumer keeps the prefetch it started with, so changing the prefetch means
starting the consumer again, on the same channel and in the same round: the
deliveries the old one holds stay valid and are settled as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel

from services.common.broker import Broker, BrokerUnavailable, bounded
from services.shipper.concurrency import ConcurrencyController
from services.shipper.limiter import RateLimiter

FRESH, BACKLOG = "fresh", "backlog"
CONSUMER_TIMEOUT_S = 3.0  # opening a channel, setting the prefetch, starting or stopping a consumer
TURN_RECHECK_S = 1.0  # a delivery waiting for its turn looks again at least this often


class Signal:
    """Wakes everyone waiting, each time it is raised (an Event would need clearing, and lose wake-ups)."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def raise_(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None

    async def wait(self, timeout: float) -> None:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._future)
        except TimeoutError:
            pass


@dataclass
class Lane:
    """One class of work: its queue, its consumer, its uploads and its gate."""

    name: str
    queue: str
    limiter: RateLimiter
    concurrency: ConcurrencyController
    slots: int  # uploads at once
    taken: int = 0
    may_send: bool = False  # its part of the share is above zero
    give_back: bool = False  # deliveries waiting for their turn go back to the queue instead
    changed: Signal = field(default_factory=Signal)
    channel: AbstractRobustChannel | None = None
    consumer_tag: str | None = None
    prefetch: int = 0  # of the running consumer
    in_flight: int = 0  # deliveries in hand: waiting for a turn, or shipping
    waiting: int = 0  # ready on its queue, at the last count
    competing: bool = False  # the other lane has work too: this one keeps to its part
    egress: float = 0.0
    last_granted: int = 0
    starved_since: float | None = None

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.waiting > 0

    @property
    def consuming(self) -> bool:
        return self.consumer_tag is not None

    async def turn(self, replica_may_send: asyncio.Event, *, stopping: Callable[[], bool]) -> bool:
        """Wait until an upload of this lane may start, and take a slot: True. False when the
        delivery must be given back instead (the lane is gated, or the shipper stops)."""
        while True:
            if self.give_back or stopping():
                return False
            if replica_may_send.is_set() and self.may_send and self.taken < self.slots:
                self.taken += 1
                return True
            await self.changed.wait(TURN_RECHECK_S)

    def release(self) -> None:
        """An upload of this lane ended: its slot is free."""
        self.taken -= 1
        self.changed.raise_()

    async def consume(self, broker: Broker, prefetch: int,
                      on_message: Callable[[AbstractIncomingMessage], Awaitable[None]]) -> None:
        """Start consuming at ``prefetch`` (stopping a running consumer first)."""
        if self.consumer_tag is not None:
            await self.stop_consuming()
        if broker.connection is None:
            raise BrokerUnavailable(f"broker {broker.readiness()}")
        if self.channel is None or self.channel.is_closed:
            self.channel = await bounded(broker.connection.channel(publisher_confirms=False),
                                         "opening a channel", timeout=CONSUMER_TIMEOUT_S)
        channel = self.channel
        # The prefetch applies to the consumers started after it, on this lane's channel only.
        await bounded(channel.set_qos(prefetch_count=prefetch), "setting the prefetch", timeout=CONSUMER_TIMEOUT_S)
        queue = await bounded(channel.get_queue(self.queue, ensure=False), "finding the queue",
                              timeout=CONSUMER_TIMEOUT_S)
        self.consumer_tag = await bounded(queue.consume(on_message, robust=False), "starting the consumer",
                                          timeout=CONSUMER_TIMEOUT_S)
        self.prefetch = prefetch

    async def stop_consuming(self) -> None:
        """Stop the consumer; deliveries it handed over stay valid and are settled as usual."""
        tag, self.consumer_tag = self.consumer_tag, None
        if tag is None or self.channel is None or self.channel.is_closed:
            return
        queue = await bounded(self.channel.get_queue(self.queue, ensure=False), "finding the queue",
                              timeout=CONSUMER_TIMEOUT_S)
        await bounded(queue.cancel(tag), "stopping the consumer", timeout=CONSUMER_TIMEOUT_S)

    def forget_consumer(self) -> None:
        """The connection was lost: the consumer is gone (deliveries in hand are void)."""
        self.consumer_tag = None
