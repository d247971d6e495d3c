"""A shipper whose upload fails in a way nobody foresaw: the delivery is settled, never left hanging.

The shipper runs in this process with a transfer that raises a plain bug, against
the real broker and store: the message must not stay unacknowledged (it would
hold a prefetch slot until the broker's consumer timeout).
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from devtools.servers import wait_until
from services.common import messages, photos, topology
from services.common.broker import Broker
from services.common.config import ShipperConfig
from services.common.localstore import LocalStore
from services.common.supervise import Supervisor
from services.shipper.app import build_shipper
from services.shipper.metrics import ShipperMetrics
from services.shipper.transfer import Shipment
from tests.helpers import Site, jpeg

pytestmark = pytest.mark.servers


class BuggyTransfer:
    """Stands in for the transfer: every upload fails with an exception no handler lists."""

    def __init__(self, real: object) -> None:
        self.limiter = real.limiter  # type: ignore[attr-defined]
        self.abort = real.abort  # type: ignore[attr-defined]
        self.calls = 0

    def ship(self, job: photos.PhotoMessage, *args: object, **kwargs: object) -> Shipment:
        self.calls += 1
        raise KeyError(f"a bug while shipping {job.id}")

    def probe(self) -> None:
        pass


def _queue(site: Site, name: str) -> dict:  # type: ignore[type-arg]
    return site.rabbit.management("GET", f"queues/{site.name}/{name}")  # type: ignore[return-value]


def test_an_unforeseen_exception_is_parked_after_its_attempts_not_left_unacknowledged(site: Site) -> None:
    config = ShipperConfig.from_env(site.env(PHOTOFERRY_SHIP_MAX_ATTEMPTS="1"))
    image = jpeg(20_000)
    sha = hashlib.sha256(image).hexdigest()
    photo_id = photos.photo_id("cam-bug", datetime.now(UTC), sha)
    site.local_client().put_object(Bucket=site.store_bucket, Key=photos.object_key(photo_id), Body=image)
    job = photos.PhotoMessage(id=photo_id, key=photos.object_key(photo_id), size=len(image), sha256=sha,
                              content_type="image/jpeg", device_id="cam-bug",
                              captured_at=photos.canonical_time(datetime.now(UTC)),
                              received_at=photos.canonical_time(datetime.now(UTC)))

    async def scenario() -> int:
        shipper = build_shipper(config, ShipperMetrics())
        buggy = BuggyTransfer(shipper.transfer)
        shipper.transfer = shipper.handler.transfer = buggy  # type: ignore[assignment]
        supervisor = Supervisor(CollectorRegistry())
        shipper.links.start(supervisor)
        shipper.start(supervisor)
        try:
            await asyncio.wait_for(shipper.links.connected(), 20)
            publisher = Broker(site.amqp_url, name="test-publisher")
            publisher.start()
            await asyncio.wait_for(publisher.connected(), 20)
            await publisher.publish(topology.PHOTOS_EXCHANGE, topology.SHIP_ROUTING_KEY,
                                    messages.shipping_message(job.to_json(), origin=messages.UPLOAD), timeout=10)
            await publisher.close()
            store = LocalStore(config.store)
            async with asyncio.timeout(30):
                while not await store.exists(photos.parked_marker_key(photo_id)):  # noqa: ASYNC110 (polls the store)
                    await asyncio.sleep(0.2)
        finally:
            await shipper.stop()
            await supervisor.stop()
            await shipper.links.close()
        return buggy.calls

    assert asyncio.run(scenario()) == 1
    # Settled: nothing on the shipping queue, ready or unacknowledged; the photo waits on the parking queue.
    wait_until(lambda: site.shipping_messages() == 0, timeout=10,
               what="the shipping queue settled")
    wait_until(lambda: _queue(site, topology.PARKED_QUEUE).get("messages") == 1, timeout=10,
               what="the photo on the parking queue")
    marker = site.local_client().get_object(Bucket=site.store_bucket, Key=photos.parked_marker_key(photo_id))
    assert "KeyError" in marker["Body"].read().decode()
