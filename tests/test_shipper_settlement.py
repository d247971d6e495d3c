"""Deliveries the shipper hands back are copies, never returns the broker counts.

Before RabbitMQ 4.0 a quorum queue counts every return of a message (a nack with
requeue, a cancelled consumer, a closed channel) towards its delivery limit, and
the shipper parks a photo delivered that often. A shipper that restarts often, or
pauses for long, must therefore never return what it holds: it gives back a copy
and acknowledges the original.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from devtools.servers import ServiceProcess, wait_until
from services.common import photos, topology
from services.common.config import ShipperConfig
from services.common.shipping import ShippingControl
from services.common.supervise import Supervisor
from services.shipper.app import build_shipper
from services.shipper.metrics import ShipperMetrics
from tests.conftest import start_service, stop_cleanly
from tests.helpers import Site, remote_keys, set_control, upload_many

pytestmark = pytest.mark.servers

SLOW = 20_000  # bytes per second: no photo of the backlog completes between two restarts


@pytest.fixture(scope="module")
def env(site: Site) -> dict[str, str]:
    return site.env(PHOTOFERRY_SHIP_RATE=str(SLOW), PHOTOFERRY_SHUTDOWN_TIMEOUT="1s")


@pytest.fixture(scope="module")
def gateway(env: dict[str, str], logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("gateway", env, logs)
    yield service
    stop_cleanly(service)


def held(site: Site) -> int:
    """Deliveries the shippers hold (unacknowledged) on both shipping queues."""
    return site.shipping_messages("messages_unacknowledged")


def assert_all_shipped_once_and_nothing_parked(site: Site, ids: list[str], device: str) -> None:
    expected = sorted(f"site-test/{photos.object_key(i)}" for i in ids)

    def remote() -> list[str]:
        return sorted(k for k in remote_keys(site) if device in k)

    # In S3 (a photo may wait out a retry delay first: queues alone do not say it is done).
    wait_until(lambda: remote() == expected, timeout=120, what="every photo in S3", interval=0.5)
    wait_until(lambda: site.shipping_messages() == 0, timeout=30, what="both shipping queues empty")
    assert site.queue_figure(topology.PARKED_QUEUE) == 0
    assert site.local_keys(photos.PARKED_PREFIX) == []


def test_twelve_restarts_of_a_shipper_holding_a_photo_park_nothing(
    site: Site, gateway: ServiceProcess, env: dict[str, str], logs: Path
) -> None:
    # One photo, so that every restart finds the same message at the head of its queue.
    ids = list(upload_many(gateway.url, 1, device="cam-restarts", size=60_000))
    config = ShipperConfig.from_env(env)

    async def restart_twelve_times() -> None:
        for _ in range(12):
            shipper = build_shipper(config, ShipperMetrics())
            supervisor = Supervisor(CollectorRegistry())
            shipper.links.start(supervisor)
            shipper.start(supervisor)
            try:
                async with asyncio.timeout(20):
                    await shipper.links.connected()
                    # It holds the photo, and is told to stop before it could send it.
                    while not shipper.handler.in_flight:  # noqa: ASYNC110 (the handler's own state, polled)
                        await asyncio.sleep(0.01)
            finally:
                await shipper.stop()
                await supervisor.stop()
                await shipper.links.close()

    asyncio.run(restart_twelve_times())
    fast = start_service("shipper", {**env, "PHOTOFERRY_SHIP_RATE": "10MB"}, logs)
    try:
        assert_all_shipped_once_and_nothing_parked(site, ids, "cam-restarts")
    finally:
        stop_cleanly(fast)


def test_a_pause_holds_nothing_so_no_consumer_timeout_can_fire(
    site: Site, gateway: ServiceProcess, env: dict[str, str], logs: Path
) -> None:
    shipper = start_service("shipper", env, logs)
    try:
        ids = list(upload_many(gateway.url, 8, device="cam-long-pause", size=60_000))
        wait_until(lambda: held(site) >= 1, timeout=30, what="the shipper holding a photo")
        set_control(site, ShippingControl(paused=True))
        # Paused, it holds nothing that the broker's consumer timeout could take back from it
        # (uploads under way finish first: at most one photo at this rate).
        wait_until(lambda: held(site) == 0, timeout=15, what="nothing held while paused")
        set_control(site, ShippingControl(rate_override=10_000_000))
        assert_all_shipped_once_and_nothing_parked(site, ids, "cam-long-pause")
    finally:
        set_control(site, ShippingControl())
        stop_cleanly(shipper)

