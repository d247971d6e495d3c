"""The shipper: consume, ship once, acknowledge only what is in S3, within this replica's part of the cap.

It wires the parts, each in its own module:

- ``lanes``: the two classes of work (fresh photos, the backlog), each a queue
  consumed on a channel of its own, with its prefetch, slots and gate;
- ``handling``: one delivery from its arrival to its settlement;
- ``settlement``: ack, retry, park, give back, demote (copies, never requeues);
- ``peers``: heartbeats and shipped notices, and what the others say;
- ``pacing``: this replica's part of the site-wide cap, and the lanes' split of it;
- ``scavenger``: the band above the cap, used only while the uplink is idle, on the
  delays ``delayprobe`` measures;
- ``accounting``: egress figures and metrics.

Two connections to the broker: one publishes (heartbeats, notices, copies of
messages), one consumes (deliveries, their acks, the others' heartbeats, the
operator's nudges). A resource alarm blocks only the first, so acknowledgements
keep flowing and the queue keeps draining while the broker takes no new message.

One supervised loop keeps the pace: the operator's settings (else the schedule),
the queues' depths, busy or not, the shares, which lanes consume and at what
prefetch, the uploads at once. Every call it makes to the broker is bounded, so
it keeps going (and a stop stays prompt) through an outage. While a band above the
cap is in force and there is work, a second one (``shipper-delay``) measures the
path's delay ten times a second and re-splits with the rate the band allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from services.common import topology
from services.common.broker import Broker, BrokerLinks
from services.common.config import ShipperConfig
from services.common.errors import DEPENDENCY_ERRORS
from services.common.localstore import LocalStore
from services.common.shipping import (
    HEARTBEAT_EVERY_S,
    SCAVENGING_IDLE,
    SCAVENGING_OFF,
    SCAVENGING_STATES,
    Heartbeat,
    ShippingControl,
    read_control,
)
from services.common.supervise import StepResult, Supervisor
from services.shipper import pacing
from services.shipper.accounting import Accounting
from services.shipper.breaker import Breaker
from services.shipper.concurrency import ConcurrencyController
from services.shipper.delayprobe import PROBE_BYTES, DelayProbe
from services.shipper.handling import Handler
from services.shipper.lanes import BACKLOG, FRESH, Lane
from services.shipper.limiter import RateLimiter
from services.shipper.metrics import ShipperMetrics
from services.shipper.pacing import CapShare
from services.shipper.peers import Peers
from services.shipper.scavenger import Scavenger
from services.shipper.settlement import Settlement
from services.shipper.threads import Threads
from services.shipper.transfer import Transfer

log = logging.getLogger(__name__)

TICK_S = 1.0
BACKLOG_REFRESH_S = 2.0  # how often the queues' depths are read
CONTROL_REFRESH_S = 5.0
CONCURRENCY_WINDOW_S = 5.0
ABORT_WAIT_S = 5.0  # after the shutdown timeout, how long aborted uploads get to unwind
GOODBYE_TIMEOUT_S = 3.0
QUIET_REPEAT_S = 60.0  # the same dependency warning, at most this often
STARVED_AFTER_S = 30.0  # photos wait, yet nothing is delivered: the consumer is started again
PROBE_EVERY_S = 0.1  # delay samples while the band is in use: a queue is seen within a few
BAND_RECHECK_S = 1.0  # with no band to use, the delay loop looks again this often (or when woken)


class Shipper:
    def __init__(
        self,
        config: ShipperConfig,
        *,
        links: BrokerLinks,
        store: LocalStore,
        transfer: Transfer,
        metrics: ShipperMetrics,
        replica: str,
        delay_probe: DelayProbe,
    ) -> None:
        self.config = config
        self.links = links
        self.publisher = links.publishing
        self.consumer = links.consuming
        self.store = store
        self.transfer = transfer
        self.metrics = metrics
        self.replica = replica
        self.limiter = transfer.limiter  # the replica's: it holds the cap
        self.pacing = CapShare(replica)
        self.delay_probe = delay_probe
        self.scavenger = Scavenger(config.delay_target)
        self.ceiling = 0.0  # site-wide, of the band above the cap; 0: no band
        self.allowed = 0.0  # this replica's rate now: its share, and what the band adds
        self.breaker = Breaker(probe=self._probe, on_change=self._wake)
        rate = self.limiter.rate
        # A few uploads at once to start with, to fill the link with small photos; each lane adapts.
        initial = min(4, config.max_concurrency)
        self.lanes = {
            name: Lane(name, queue, RateLimiter(rate),
                       ConcurrencyController(initial=initial, maximum=config.max_concurrency), initial)
            for name, queue in ((FRESH, topology.FRESH_QUEUE), (BACKLOG, topology.SHIP_QUEUE))
        }
        self.control = ShippingControl()
        self.fresh_share = config.schedule.fresh_share
        self._threads = Threads(2 * config.max_concurrency + 1)
        self.accounting = Accounting(metrics, self.limiter, self.lanes.values())
        self.settlement = Settlement(publisher=self.publisher, store=store, metrics=metrics,
                                     fresh_window=config.fresh_window)
        self.peers = Peers(replica=replica, publisher=self.publisher, pacing=self.pacing, accounting=self.accounting,
                           heartbeat=self.heartbeat, on_change=self._resplit)
        self.handler = Handler(config, store=store, transfer=transfer, limiter=self.limiter, pacing=self.pacing,
                               settlement=self.settlement, accounting=self.accounting, breaker=self.breaker,
                               threads=self._threads, lanes=self.lanes, wake=self._wake, ran_dry=self._on_ran_dry)
        self._listeners: list[AbstractQueue] = []  # robust channels restore only what is referenced
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._ran_dry = False
        self._next_control = self._next_backlog = self._next_concurrency = 0.0
        self._warned: dict[str, float] = {}
        self._resplit_later: asyncio.TimerHandle | None = None
        self._band_wake = asyncio.Event()
        self._measuring = False  # the delay loop samples (else it only looks now and then)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, supervisor: Supervisor) -> None:
        supervisor.start("shipper-pace", self._pace, every=TICK_S, wake=self._wakeup)
        supervisor.start("shipper-peers", self.peers.step, every=HEARTBEAT_EVERY_S, wake=self.peers.wake)
        supervisor.start("shipper-delay", self._measure_delay, every=PROBE_EVERY_S, wake=self._band_wake)

    async def on_consumer_ready(self, broker: Broker) -> None:
        """Listen for operator controls and the other replicas' heartbeats."""
        assert broker.channel is not None and broker.declared is not None and broker.connection is not None
        listeners = []
        for exchange, callback in ((topology.CONTROL_EXCHANGE, self._on_control),
                                   (topology.STATUS_EXCHANGE, self.peers.on_heartbeat)):
            queue = await broker.channel.declare_queue("", exclusive=True, auto_delete=True)
            await queue.bind(broker.declared.exchanges[exchange])
            await queue.consume(callback, no_ack=True)
            listeners.append(queue)
        self._listeners = listeners
        self.pacing.listening(time.monotonic())
        # The shipping consumers are not robust (the pace loop decides when to consume):
        # after a reconnection they are gone, and the pace loop starts them again if it should.
        broker.connection.reconnect_callbacks.add(self._on_reconnected)
        self._wake()

    async def stop(self) -> None:
        """Stop consuming, give back what waits, let shipments in flight finish (bounded), abort the rest."""
        self._stopping = self.handler.stopping = True
        for lane in self.lanes.values():
            if self.consumer.is_ready:
                with self._dependency("stopping the consumer"):
                    await lane.stop_consuming()
            lane.forget_consumer()
            lane.give_back = True
            lane.changed.raise_()
        if self.handler.in_flight:
            log.info("stopping: finishing shipments in flight", extra={"in_flight": len(self.handler.in_flight)})
            if not await _wait(self.handler.idle, self.config.shutdown_timeout):
                log.warning("stopping with shipments unfinished; they go back to their queue",
                            extra={"in_flight": len(self.handler.in_flight)})
                self.transfer.abort.set()
                self.limiter.resume()
                if not await _wait(self.handler.idle, ABORT_WAIT_S):
                    log.error("uploads did not stop; exiting anyway",
                              extra={"in_flight": len(self.handler.in_flight)})
        log.info("shipments settled; leaving", extra={"in_flight": len(self.handler.in_flight)})
        # Say goodbye, so the others take over this replica's share now, not after PEER_TTL_S.
        if self.publisher.is_ready:
            with self._dependency("saying goodbye to the other shippers"):
                async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                    await self.peers.say_goodbye()
        await self.breaker.close()
        self._threads.close()
        log.info("shipper stopped")

    def state(self) -> str:
        if self._stopping:
            return "stopping"
        if self.breaker.open:
            return "breaker_open"
        if self.pacing.cap <= 0:
            return "paused"
        if not any(lane.consuming for lane in self.lanes.values()):
            return "starting"
        return "running"

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            replica=self.replica,
            state=self.state(),
            busy=self.pacing.announced_busy,
            cap_bytes_per_s=self.pacing.cap,
            share_bytes_per_s=self.pacing.share,
            egress_bytes_per_s=self.accounting.egress,
            fresh_egress_bytes_per_s=self.lanes[FRESH].egress,
            sent_bytes_total=self.limiter.granted,
            shipped_objects_total=self.accounting.shipped_objects,
            in_flight=len(self.handler.in_flight),
            concurrency=sum(lane.concurrency.limit for lane in self.lanes.values()),
            link_limited=any(lane.concurrency.link_limited for lane in self.lanes.values()),
            breaker_reason=self.breaker.reason,
            ceiling_bytes_per_s=self.ceiling,
            allowed_bytes_per_s=self.allowed,
            scavenging=self.scavenging(),
            queueing_delay_s=self.scavenger.queueing_delay_s if self._band_in_use() else None,
            base_delay_s=self.scavenger.base_delay_s,
            delay_target_s=self.scavenger.target_s,
        )

    def scavenging(self) -> str:
        """What the band above the cap is doing: ``off`` (none in force), ``idle`` (nothing to
        ship), or the controller's state (measuring, using_idle_uplink, yielding, unmeasured)."""
        if self.ceiling <= 0:
            return SCAVENGING_OFF
        return self.scavenger.state if self._band_in_use() else SCAVENGING_IDLE

    # -- the pace loop ---------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    def _on_ran_dry(self) -> None:
        """A lane has nothing in hand: look at the queues now, and re-split."""
        self._ran_dry = True
        self._wake()

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        self._next_control = 0.0
        self._wake()

    def _on_reconnected(self, _connection: object) -> None:
        for lane in self.lanes.values():
            lane.forget_consumer()
        # Heartbeats sent while the connection was down were not heard: hear a round first.
        self.pacing.listening(time.monotonic())
        self._wake()

    async def _pace(self) -> StepResult:
        """One round: settings, queue depths, busy or not, the shares, consuming, concurrency."""
        now = time.monotonic()
        if now >= self._next_control:
            self._next_control = now + CONTROL_REFRESH_S
            with self._dependency("reading the operator's shipping settings"):
                self.control = await read_control(self.store)
        if (now >= self._next_backlog or (self._ran_dry and not self.handler.in_flight)) and self.consumer.is_ready:
            self._ran_dry = False
            self._next_backlog = now + BACKLOG_REFRESH_S
            with self._dependency("reading the shipping queues' depths"):
                depths = await self.consumer.queue_depth(*(lane.queue for lane in self.lanes.values()))
                for lane in self.lanes.values():
                    lane.waiting = depths[lane.queue]
        waiting = sum(lane.waiting for lane in self.lanes.values())
        if self.pacing.announce(now, holding=bool(self.handler.in_flight), waiting=waiting):
            self.peers.announce_now()  # tell the others at once, either way
        self._resplit()
        for lane in self.lanes.values():
            with self._dependency("starting or stopping a consumer"):
                await self._manage_consumer(lane, now)
        if now >= self._next_concurrency:
            self._next_concurrency = now + CONCURRENCY_WINDOW_S
            for lane in self.lanes.values():
                self._adapt_concurrency(lane)
        self.accounting.tick(now)
        self._report()
        return None

    def _resplit(self) -> None:
        """This replica's share now, each lane's part of it, and the gates: at once, whenever
        something it depends on changes (a peer's heartbeat, a confirmation, a lane getting work)."""
        now = time.monotonic()
        moment = datetime.now(UTC)
        share = self.pacing.split(self.control.cap(self.config.schedule, moment), now)
        self.fresh_share = self.control.fresh_share(self.config.schedule, moment)
        # The band above the share: without one (the default) the rate is the share, as ever.
        self.ceiling = self.control.ceiling(self.config.schedule, moment)
        rate = self.scavenger.step(now, moment.timestamp(), floor=share, ceiling=self.pacing.part(self.ceiling))
        self.allowed = rate
        if self._band_in_use() and not self._measuring:
            self._band_wake.set()  # a band to use: start measuring now, not at the next look
        # While paused, shipments in flight finish at the rate they had.
        if rate > 0 and rate != self.limiter.rate:
            self.limiter.set_rate(rate)
        fresh, backlog = self.lanes[FRESH], self.lanes[BACKLOG]
        rates = pacing.split(rate, self.fresh_share, fresh_busy=fresh.busy, backlog_busy=backlog.busy)
        fresh.competing = backlog.competing = fresh.busy and backlog.busy
        for lane, rate in ((fresh, rates.fresh), (backlog, rates.backlog)):
            lane.may_send = rate is not None
            if rate is not None and rate != lane.limiter.rate:
                lane.limiter.set_rate(rate)
        # Cut off from the others (they no longer count this replica): uploads under way hold still.
        if self.pacing.cut_off and not self._stopping and self.handler.in_flight:
            self.limiter.suspend()
        else:
            self.limiter.resume()
        for lane in self.lanes.values():
            lane.changed.raise_()
        # Waiting for the announcement to travel: split again the moment it has.
        if self._resplit_later is not None:
            self._resplit_later.cancel()
            self._resplit_later = None
        opens_in = self.pacing.opens_in(now)
        if opens_in is not None:
            self._resplit_later = asyncio.get_running_loop().call_later(opens_in, self._resplit)

    # -- the band above the cap --------------------------------------------------------------

    def _band_in_use(self) -> bool:
        """A band is in force and this replica has work for it."""
        return (self.ceiling > 0 and self.pacing.announced_busy and not self._stopping
                and not self.breaker.open)

    async def _measure_delay(self) -> StepResult:
        """One delay sample while the band is in use, then a re-split at the rate it allows."""
        self._measuring = self._band_in_use()
        if not self._measuring:
            return BAND_RECHECK_S
        started = time.monotonic()
        try:
            delay = await self.delay_probe.round_trip()
        except OSError as exc:
            self.metrics.delay_probes.labels("failed").inc()
            self._quiet_warning("delay probe", "the delay probe to the S3 endpoint failed; shipping at the cap "
                                "only until it answers", host=self.delay_probe.host, port=self.delay_probe.port,
                                error=str(exc))
        else:
            self.metrics.delay_probes.labels("answered" if delay < self.delay_probe.timeout else "timed_out").inc()
            self.scavenger.sample(delay, time.monotonic())
        self.limiter.charge(PROBE_BYTES)  # the probe's packets count towards the cap too
        self._resplit()
        return max(0.0, started + PROBE_EVERY_S - time.monotonic())  # a sample every 100 ms, however long each took

    @contextlib.contextmanager
    def _dependency(self, what: str) -> Iterator[None]:
        """Carry on without what a dependency could not give this round; say so once a minute."""
        try:
            yield
        except DEPENDENCY_ERRORS as exc:
            self._quiet_warning(what, f"shipping loop: {what} failed; carrying on", error=str(exc))

    def _quiet_warning(self, what: str, message: str, **extra: object) -> None:
        """Log ``message`` about ``what`` at most once a minute."""
        now = time.monotonic()
        if now - self._warned.get(what, -QUIET_REPEAT_S) >= QUIET_REPEAT_S:
            self._warned[what] = now
            log.warning(message, extra=extra)

    def _want_to_consume(self, lane: Lane) -> bool:
        if self._stopping or self.pacing.cap <= 0 or self.breaker.open or not self.consumer.is_ready:
            return False
        # A lane that would get no part of the share holds no deliveries: with no fresh share,
        # fresh photos wait in their queue (or expire into the backlog) until the backlog is
        # empty, strictly oldest first.
        fresh, backlog = self.lanes[FRESH], self.lanes[BACKLOG]
        rates = pacing.split(self.pacing.share, self.fresh_share, fresh_busy=fresh.busy or lane is fresh,
                             backlog_busy=backlog.busy or lane is backlog)
        return (rates.fresh if lane is fresh else rates.backlog) is not None

    async def _manage_consumer(self, lane: Lane, now: float) -> None:
        """Consume or not, at the prefetch the lane needs; a lane that must not consume gives back
        what it holds and has not started (it would wait without a deadline: past the broker's
        consumer timeout the channel is closed under it)."""
        if not self._want_to_consume(lane):
            if lane.consuming:
                log.info("stopping consuming", extra={"queue": lane.queue, "state": self.state()})
                await lane.stop_consuming()
            if not lane.give_back:
                lane.give_back = True
                lane.changed.raise_()
            return
        lane.give_back = False
        if self._starved(lane, now):
            await lane.stop_consuming()
        wanted = self._prefetch_limit(lane)
        # A consumer keeps the prefetch it started with: start it again at once. What the old one
        # holds no longer counts against the new one's prefetch, so only once the lane holds no
        # more than the new limit: never more than twice the limit held at once.
        if lane.consuming and (wanted == lane.prefetch or lane.in_flight > wanted):
            return

        async def handle(message: AbstractIncomingMessage) -> None:
            await self.handler.handle(lane, message)

        await lane.consume(self.consumer, wanted, handle)
        log.info("consuming", extra={"queue": lane.queue, "prefetch": wanted})

    def _starved(self, lane: Lane, now: float) -> bool:
        """Photos wait but none arrive (the broker dropped the consumer without telling, or its
        deliveries were lost): start the consumer again. A safety net, not the normal path."""
        if not (lane.consuming and lane.waiting > 0 and lane.in_flight == 0):
            lane.starved_since = None
            return False
        if lane.starved_since is None:
            lane.starved_since = now
            return False
        if now - lane.starved_since < STARVED_AFTER_S:
            return False
        log.warning("photos wait in the queue but the broker delivers none; starting the consumer again",
                    extra={"queue": lane.queue, "waiting": lane.waiting, "for_s": round(now - lane.starved_since)})
        lane.starved_since = None
        return True

    def _adapt_concurrency(self, lane: Lane) -> None:
        """Uploads at once in a lane, adapted to the link (the prefetch follows in the next round)."""
        lane.slots = lane.concurrency.evaluate(window_s=CONCURRENCY_WINDOW_S, share=lane.limiter.rate,
                                               backlog=lane.waiting > 0 and lane.consuming)
        lane.changed.raise_()

    def _prefetch_limit(self, lane: Lane) -> int:
        """As many as the lane uploads at once (the backlog one more, so its pipe never runs dry): what
        waits beyond that stays in the queue, where a fresh photo can still expire into the backlog.
        And no more than ships well inside the broker's consumer timeout at this share: every
        prefetched photo (up to the largest allowed) must be sent within a third of it."""
        wanted = lane.slots + (1 if lane.name == BACKLOG else 0)
        if self.pacing.share <= 0:
            return wanted
        fits = int(self.pacing.share * self.config.consumer_timeout / 3 / self.config.max_image_bytes)
        return max(1, min(wanted, fits))

    def _report(self) -> None:
        m = self.metrics
        m.cap.set(self.pacing.cap)
        m.share.set(self.pacing.share)
        m.ceiling.set(self.ceiling)
        m.allowed.set(self.allowed)
        scavenging = self.scavenging()
        for state in SCAVENGING_STATES:
            m.scavenging.labels(state).set(1 if state == scavenging else 0)
        delay = self.scavenger.queueing_delay_s if self._band_in_use() else None
        m.queueing_delay.set(delay if delay is not None else float("nan"))
        base = self.scavenger.base_delay_s
        m.base_delay.set(base if base is not None else float("nan"))
        m.fresh_share.set(self.fresh_share)
        m.breaker_open.set(1 if self.breaker.open else 0)
        m.publishing_blocked.set(1 if self.pacing.blocked else 0)
        m.link_limited.set(1 if any(lane.concurrency.link_limited for lane in self.lanes.values()) else 0)
        m.concurrency.set(sum(lane.concurrency.limit for lane in self.lanes.values()))
        m.in_flight.set(len(self.handler.in_flight))

    async def _probe(self) -> None:
        await self._threads.run(self.transfer.probe)


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; whether it came."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
