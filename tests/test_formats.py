"""Upgrades without a flag day: the previous release's message and metadata formats (fixtures captured
from that release's code) go through this release's services; a format no release wrote is parked."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import orjson
import pytest
import requests

from devtools.servers import REPO, ServiceProcess, wait_until
from services.common import messages, photos, topology
from tests.conftest import start_service, stop_cleanly
from tests.helpers import Site, auth, drain_queue, encode, jpeg

pytestmark = pytest.mark.servers

FIXTURES = Path(__file__).parent / "fixtures" / "format-1"


@pytest.fixture(scope="module")
def services(site: Site, logs: Path) -> Iterator[dict[str, ServiceProcess]]:
    env = site.env(PHOTOFERRY_RECONCILE_EVERY="2s", PHOTOFERRY_SHIP_RATE="10MB")
    started = {name: start_service(name, env, logs) for name in ("store", "gateway", "shipper")}
    yield started
    for service in reversed(started.values()):
        stop_cleanly(service)


def publish(site: Site, body: bytes, headers: dict[str, object]) -> None:
    async def send() -> None:
        connection = await aio_pika.connect(site.amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(topology.PHOTOS_EXCHANGE)
            message = aio_pika.Message(body, headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, topology.SHIP_ROUTING_KEY)

    asyncio.run(send())


def in_remote(site: Site, photo_id: str) -> str | None:
    """The remote copy's SHA-256, or None when it is not there."""
    client = site.remote_client()
    try:
        body = client.get_object(Bucket=site.remote_bucket, Key="site-test/" + photos.object_key(photo_id))["Body"]
    except client.exceptions.ClientError:
        return None
    return hashlib.sha256(body.read()).hexdigest()


def test_the_previous_formats_ship_and_answer_and_an_unknown_one_is_parked(
        site: Site, services: dict[str, ServiceProcess]) -> None:
    image = (REPO / "devtools" / "sample.jpg").read_bytes()
    old_message = (FIXTURES / "message.json").read_bytes().strip()
    old_metadata = json.loads((FIXTURES / "metadata.json").read_text())
    job = orjson.loads(old_message)
    assert job["v"] == 1 and photos.METADATA_VERSION_KEY not in old_metadata
    # A photo the previous release stored and queued, shipped by this one.
    site.put_local(job["key"], image, metadata=old_metadata)
    publish(site, old_message, {messages.ORIGIN_HEADER: messages.UPLOAD})
    wait_until(lambda: in_remote(site, job["id"]) == job["sha256"], timeout=60, what="the format 1 photo shipped",
               interval=1)
    gateway = services["gateway"].url
    state = requests.get(f"{gateway}/v1/photos/{job['id']}", headers=auth("cam-format-1"), timeout=10).json()
    assert state["status"] == "shipped" and state["captured_at"] == old_metadata["captured-at"]
    assert state["labels"] == {"pen": "north-3"}

    # A photo the previous release stored but never queued: the keeper queues it from its metadata.
    other = jpeg(5_000)
    other_id = photos.photo_id("cam-format-1", datetime(2026, 3, 1, 9, tzinfo=UTC), hashlib.sha256(other).hexdigest())
    site.put_local(photos.object_key(other_id), other,
                   metadata=old_metadata | {"sha256": hashlib.sha256(other).hexdigest(),
                                            "captured-at": "2026-03-01T09:00:00.000000Z"})
    wait_until(lambda: in_remote(site, other_id) is not None, timeout=60, what="the format 1 orphan shipped",
               interval=1)

    # This release writes its own formats.
    fields = {"device_id": "cam-format-2", "captured_at": "2026-03-02T10:00:00Z", "image": jpeg(5_000),
              "labels": {"pen": "south"}}
    headers = {"Content-Type": "application/json", **auth("cam-format-2")}
    created = requests.post(f"{gateway}/v1/photos", data=encode(fields, "json"), headers=headers, timeout=30).json()
    stored = asyncio.run(site.local_store().stat(photos.object_key(created["id"])))
    assert stored is not None and stored.metadata[photos.METADATA_VERSION_KEY] == str(photos.METADATA_VERSION)

    # A format no release wrote is parked, with the reason, not retried for ever.
    unknown = {**job, "v": 99, "id": other_id, "key": photos.object_key(other_id)}
    publish(site, orjson.dumps(unknown), {messages.ORIGIN_HEADER: messages.UPLOAD})

    parked: list[str] = []

    def parked_with_reason() -> bool:
        parked.extend(str((m.headers or {}).get(messages.PARK_REASON_HEADER, ""))
                      for m in drain_queue(site.amqp_url, topology.PARKED_QUEUE)
                      if orjson.loads(m.body).get("v") == 99)
        return bool(parked)

    wait_until(parked_with_reason, timeout=30, what="the unknown format parked", interval=1)
    assert "format version 99" in parked[0], parked
