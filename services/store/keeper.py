"""The store keeper: wires its jobs together and runs them as supervised loops.

- ``sweep.py``: one pass over the store (retention, early eviction, counts).
- ``reconcile.py``: every unshipped photo has a shipping message.
- ``capacity.py``: usage, eviction, and the admission decision for gateways.
- ``figures.py``: what operators see, as JSON, metrics and history.

A sweep commits all or nothing: its counts replace the estimates (usage, backlog,
devices) together, in one step, once the walk is complete; reconciling runs after
that commit, so a broker that fails it leaves the figures right and is retried at
the next sweep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common import topology
from services.common.broker import Broker, BrokerLinks, BrokerUnavailable
from services.common.config import StoreKeeperConfig
from services.common.localstore import LocalStore, StoreUnavailable
from services.common.shipping import ShippingControl, read_control
from services.common.supervise import DONE, StepResult, Supervisor
from services.store.capacity import Capacity
from services.store.figures import HISTORY_EVERY_S, Figures
from services.store.metrics import KeeperMetrics
from services.store.reconcile import Reconciler
from services.store.sweep import SweepResult, sweep
from services.store.tap import Tap

log = logging.getLogger(__name__)

CAPACITY_CHECK_S = 1.0  # usage against the watermarks, and a new admission decision
FIGURES_EVERY_S = 5.0  # the operator's figures as metrics, and the queues' depths
STALE_LEFTOVERS_AFTER = timedelta(hours=24)  # incomplete uploads and writes in the local bucket
PROVISION_WAIT_S = 1.0  # a sweep waiting for the bucket looks again this soon
STOP_SAVE_TIMEOUT_S = 5.0


class Keeper:
    def __init__(self, config: StoreKeeperConfig, *, store: LocalStore, links: BrokerLinks, tap: Tap,
                 metrics: KeeperMetrics) -> None:
        self.config = config
        self.store = store
        self.links = links
        self.broker = broker = links.publishing  # reconciling, the operator's nudges, replays, queue figures
        self.tap = tap
        self.metrics = metrics
        self.capacity = Capacity(config, store=store, tap=tap, metrics=metrics)
        self.reconciler = Reconciler(store=store, broker=broker, tap=tap, metrics=metrics)
        self.figures = Figures(config, store=store, broker=broker, tap=tap, capacity=self.capacity,
                               parked_messages=lambda: self.reconciler.parked_messages)
        tap.on_queued = self.figures.heard_queued
        tap.on_shipped = self.figures.heard_shipped
        self._sweep_lock = asyncio.Lock()
        self._sweep_now = asyncio.Event()
        self.provisioned = False

    # What the operator API reads and sets.
    @property
    def control(self) -> ShippingControl:
        return self.figures.control

    @control.setter
    def control(self, control: ShippingControl) -> None:
        self.figures.control = control

    @property
    def history(self) -> Any:
        return self.figures.history

    @property
    def parked_messages(self) -> int:
        return self.reconciler.parked_messages

    @property
    def last_sweep(self) -> SweepResult | None:
        return self.figures.last_sweep

    def status(self) -> dict[str, Any]:
        return self.figures.status() | {"queued_messages": self.reconciler.queued}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, supervisor: Supervisor) -> None:
        """Start the keeper's loops; each waits for what it needs and retries what fails."""
        supervisor.start("keeper-provision", self._provision, every=0)
        supervisor.start("keeper-sweeps", self._sweep_step, every=self.config.reconcile_every, wake=self._sweep_now)
        supervisor.start("keeper-capacity", self._capacity_step, every=CAPACITY_CHECK_S)
        supervisor.start("keeper-history", self._history_step, every=HISTORY_EVERY_S)
        supervisor.start("keeper-figures", self._figures_step, every=FIGURES_EVERY_S)

    async def on_listener_ready(self, broker: Broker) -> None:
        """The listening connection is up: hear the photos queued and shipped, and the shippers."""
        await self.tap.attach(broker)

    async def stop(self) -> None:
        """Save what operators would miss after a restart (loops are stopped by the supervisor)."""
        try:
            async with asyncio.timeout(STOP_SAVE_TIMEOUT_S):
                await self.figures.save_history()
        except TimeoutError:
            log.warning("could not save the history of figures before stopping (store too slow)")
        await self.capacity.close()

    async def _provision(self) -> StepResult:
        """The bucket exists (created if not), leftovers are cleaned up, history and settings are loaded."""
        if await self.store.ensure_bucket():
            log.info("created the local bucket", extra={"bucket": self.config.store.bucket})
        cleaned = await self.store.clean_leftovers(STALE_LEFTOVERS_AFTER)
        if cleaned:
            log.info("removed what interrupted writes left in the local bucket", extra={"count": cleaned})
        await self.figures.load_history()
        self.control = await read_control(self.store)
        self.provisioned = True
        log.info("local bucket ready", extra={"bucket": self.config.store.bucket, "store": self.store.kind})
        self.request_sweep()
        return DONE

    # -- sweeps -------------------------------------------------------------------------------

    def request_sweep(self) -> None:
        self._sweep_now.set()

    async def run_sweep(self) -> SweepResult:
        """Sweep now (one at a time), commit its counts, reconcile, and decide admission."""
        async with self._sweep_lock:
            # A broker still coming up when the sweep began is said quietly, even if it is up by its end.
            broker_starting = self.broker.starting
            queued_before = await self.reconciler.count_queued()  # None while the broker is away
            self.tap.begin_sweep()
            ingest_before = self.tap.stored_heard
            started = time.monotonic()
            # A photo stored a moment ago may be between the gateway's write and its
            # publish: it is a candidate only after a sweep interval (at most a minute).
            grace = timedelta(seconds=min(60.0, self.config.reconcile_every))
            result = await sweep(self.store, now=datetime.now(UTC), retain=timedelta(seconds=self.config.retain),
                                 evict_bytes=self.capacity.evict_bytes, orphan_grace=grace, seen=self.tap.has_seen)
            result.finished_at = datetime.now(UTC)
            # The commit: no await from here to its end, so nothing sees half of it.
            self.tap.prune(result.unshipped_ids)
            self.capacity.swept(result, ingest_before=ingest_before)
            self.figures.swept(result)
            reconciled = await self._reconcile(result, queued_before, quiet=broker_starting)
            self.metrics.observe_sweep(result, time.monotonic() - started, reconciled)
            log.info("store swept", extra={
                "photos": result.photos, "unshipped": result.unshipped, "queued": self.reconciler.queued,
                "reconciled": reconciled, "deleted": result.deleted, "evicted_bytes": result.evicted_bytes,
                "parked": result.parked, "duration_s": round(result.duration_s, 2)})
        await self.capacity.decide(evicting=False)
        return result

    async def _reconcile(self, result: SweepResult, queued_before: int | None, *, quiet: bool) -> int:
        queued_after = await self.reconciler.count_queued()
        if queued_before is None or queued_after is None:
            log.log(logging.INFO if quiet or self.broker.starting else logging.WARNING,
                    "broker unavailable: the sweep cannot tell which photos lack a message; "
                    "reconciling waits for the next sweep")
            return 0
        try:
            return await self.reconciler.reconcile(result, queued_before, queued_after)
        except (BrokerUnavailable, StoreUnavailable) as exc:
            log.warning("reconciling stopped part-way; the next sweep goes on with it", extra={"error": str(exc)})
            return 0

    async def _sweep_step(self) -> StepResult:
        if not self.provisioned:
            return PROVISION_WAIT_S
        self.control = await read_control(self.store)
        await self.run_sweep()
        return None

    # -- capacity ---------------------------------------------------------------------------

    async def _capacity_step(self) -> StepResult:
        await self.capacity.read_disk()
        if self.last_sweep is None:
            return None  # usage is known once the store was swept; until then the last decision stands
        evict = self.capacity.eviction_wanted()
        if evict and not self._sweep_lock.locked():
            self.capacity.evict_bytes = evict
            self.request_sweep()
        await self.capacity.decide(evicting=self.capacity.evict_bytes > 0)
        return None

    # -- figures ----------------------------------------------------------------------------

    async def _figures_step(self) -> StepResult:
        """Export the operator's figures and the queues' depths as metrics."""
        if self.broker.is_ready:
            depths = await self.broker.queue_depth(*topology.PHOTO_QUEUES)
            self.reconciler.parked_messages = depths[topology.PARKED_QUEUE]
            for queue, depth in depths.items():
                self.metrics.queue_messages.labels(queue).set(depth)
        self.metrics.observe_status(self.status())
        return None

    async def _history_step(self) -> StepResult:
        await self.figures.history_step()
        return None
