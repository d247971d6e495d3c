"""Parked photos and their replay, against the real broker and store."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

import pytest

from services.common import parking, photos, topology
from services.common.broker import Broker
from services.common.localstore import LocalStore
from tests.helpers import Site, jpeg, store_settings

pytestmark = pytest.mark.servers


def parked_photo(device: str) -> photos.PhotoMessage:
    image = jpeg(1000)
    sha = hashlib.sha256(image).hexdigest()
    photo_id = photos.photo_id(device, datetime.now(UTC), sha)
    now = photos.canonical_time(datetime.now(UTC))
    return photos.PhotoMessage(id=photo_id, key=photos.object_key(photo_id), size=len(image), sha256=sha,
                               content_type="image/jpeg", device_id=device, captured_at=now, received_at=now)


def test_a_replay_takes_what_was_parked_when_it_started_even_when_photos_park_again_at_once(site: Site) -> None:
    job = parked_photo("cam-reparks")

    async def scenario() -> tuple[int, bool, int]:
        broker = Broker(site.amqp_url, name="test-replay")
        broker.start()
        store = LocalStore(store_settings(site))
        try:
            await asyncio.wait_for(broker.connected(), 20)
            await parking.park(broker, store, job.to_json(), photo_id=job.id, reason="no local object",
                               attempts=1)
            assert broker.declared is not None
            ship = broker.declared.queues[topology.SHIP_QUEUE]

            async def park_again_at_once() -> None:
                # A shipper that parks the photo again as soon as it is replayed (its object is still gone).
                while True:
                    message = await ship.get(no_ack=False, fail=False, timeout=5)
                    if message is None:
                        await asyncio.sleep(0.01)
                        continue
                    await parking.park(broker, store, message.body, photo_id=job.id, reason="no local object",
                                       attempts=1)
                    await message.ack()

            shipper = asyncio.create_task(park_again_at_once())
            try:
                replayed = await asyncio.wait_for(parking.replay(broker, store), 15)
                async with asyncio.timeout(15):
                    while (await broker.queue_depth(topology.PARKED_QUEUE))[topology.PARKED_QUEUE] < 1:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            finally:
                shipper.cancel()
                await asyncio.gather(shipper, return_exceptions=True)
            marker = await store.exists(photos.parked_marker_key(job.id))
            return replayed, marker, (await broker.queue_depth(topology.PARKED_QUEUE))[topology.PARKED_QUEUE]
        finally:
            await broker.close()

    replayed, marker_kept, parked_now = asyncio.run(scenario())
    assert replayed == 1
    # Parked again, and listed as parked: the new marker was not taken for a leftover.
    assert parked_now == 1
    assert marker_kept
