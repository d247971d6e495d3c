"""The shipper against real servers: every photo reaches S3 byte-identical, once, whatever happens."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest
import requests
from botocore.exceptions import ClientError

from devtools.proxy import CountingProxy
from devtools.servers import ServiceProcess, wait_until
from services.common import parking, photos, topology
from services.common.broker import Broker
from services.common.localstore import LocalStore
from services.common.shipping import ShippingControl
from tests.conftest import start_service, stop_cleanly
from tests.helpers import (
    Site,
    auth,
    jpeg,
    metric_value,
    photo,
    remote_keys,
    set_control,
    store_settings,
    upload,
    upload_many,
)

pytestmark = pytest.mark.servers

PREFIX = "site-test/"


@pytest.fixture(scope="module")
def env(site: Site, proxy: CountingProxy) -> dict[str, str]:
    return site.env(PHOTOFERRY_S3_ENDPOINT=proxy.endpoint, PHOTOFERRY_SHIP_RATE="8MB")


@pytest.fixture(scope="module")
def gateway(env: dict[str, str], logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("gateway", env, logs)
    yield service
    stop_cleanly(service)


@pytest.fixture(scope="module")
def shipper(env: dict[str, str], logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("shipper", env, logs)
    yield service
    stop_cleanly(service)


def remote_sha256(site: Site, photo_id: str) -> str | None:
    try:
        body = site.remote_client().get_object(Bucket=site.remote_bucket, Key=PREFIX + photos.object_key(photo_id))
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchKey":
            return None
        raise
    return hashlib.sha256(body["Body"].read()).hexdigest()


def wait_all_shipped(site: Site, expected: dict[str, str], timeout: float = 90) -> None:
    missing = dict(expected)

    def done() -> bool:
        for photo_id in list(missing):
            if remote_sha256(site, photo_id) is not None:
                missing.pop(photo_id)
        return not missing

    wait_until(done, timeout=timeout, what=f"{len(missing)} photos in S3", interval=0.5)
    for photo_id, sha in expected.items():
        assert remote_sha256(site, photo_id) == sha, photo_id


def status(shipper: ServiceProcess) -> dict:  # type: ignore[type-arg]
    return requests.get(f"{shipper.url}/status", timeout=10).json()


def test_photos_reach_s3_byte_identical_once(gateway: ServiceProcess, shipper: ServiceProcess, site: Site) -> None:
    # Small photos and one above the multipart threshold (8 MiB).
    expected = upload_many(gateway.url, 12, device="cam-ship", size=[60_000, 250_000, 120_000])
    expected |= upload_many(gateway.url, 1, device="cam-ship", size=9 * 2**20)
    wait_all_shipped(site, expected)
    keys = [k for k in remote_keys(site) if k.split("/")[-1] in expected]
    assert sorted(keys) == sorted(PREFIX + photos.object_key(i) for i in expected)
    assert site.remote_client().list_multipart_uploads(Bucket=site.remote_bucket).get("Uploads", []) == []
    some_id = next(iter(expected))
    state = requests.get(f"{gateway.url}/v1/photos/{some_id}", headers=auth("cam-ship"), timeout=10).json()
    assert state["status"] == "shipped" and state["shipped_at"]


def test_a_duplicate_message_uploads_nothing(gateway: ServiceProcess, shipper: ServiceProcess, site: Site,
                                             proxy: CountingProxy) -> None:
    expected = upload_many(gateway.url, 1, device="cam-dup", size=400_000)
    wait_all_shipped(site, expected)
    photo_id = next(iter(expected))
    local = site.local_client()
    stored = local.head_object(Bucket=site.store_bucket, Key=photos.object_key(photo_id))
    message = photos.PhotoMessage(
        id=photo_id, key=photos.object_key(photo_id), size=stored["ContentLength"], sha256=expected[photo_id],
        content_type="image/jpeg", device_id="cam-dup", captured_at="2026-01-01T00:00:00.000000Z",
        received_at="2026-01-01T00:00:00.000000Z",
    )
    # Once with the shipped marker in place, once without it (S3 itself is then asked). The
    # duplicates counter says the shipper has handled the copy; the proxy, that nothing was uploaded.
    for forget_marker in (False, True):
        if forget_marker:
            local.delete_object(Bucket=site.store_bucket, Key=photos.shipped_marker_key(photo_id))
        duplicates = _duplicates(shipper)
        sent_before = proxy.total()
        publish(site, message.to_json())
        wait_until(lambda before=duplicates: _duplicates(shipper) == before + 1,  # type: ignore[misc]
                   timeout=30, what="the duplicate handled")
        wait_until(lambda: _marked(site, photo_id) and _queue_empty(site), timeout=10, what="acknowledged")
        assert proxy.total() - sent_before < 10_000, "the photo was uploaded a second time"
    assert remote_sha256(site, photo_id) == expected[photo_id]


def test_an_object_in_s3_that_only_claims_to_be_the_photo_is_replaced(shipper: ServiceProcess, site: Site) -> None:
    image = jpeg(120_000)
    sha = hashlib.sha256(image).hexdigest()
    photo_id = photos.photo_id("cam-claims", datetime(2026, 1, 3, tzinfo=UTC), sha)
    key = photos.object_key(photo_id)
    site.local_client().put_object(Bucket=site.store_bucket, Key=key, Body=image, ContentType="image/jpeg",
                                   Metadata={"sha256": sha, "device-id": "cam-claims"})
    # What an upload that went wrong could leave: other bytes, under the metadata written with it.
    site.remote_client().put_object(Bucket=site.remote_bucket, Key=PREFIX + key, Body=jpeg(120_000),
                                    Metadata={"sha256": sha})
    message = photos.PhotoMessage(
        id=photo_id, key=key, size=len(image), sha256=sha, content_type="image/jpeg", device_id="cam-claims",
        captured_at="2026-01-03T00:00:00.000000Z", received_at="2026-01-03T00:00:00.000000Z",
    )
    publish(site, message.to_json())  # a copy that may have shipped before: S3 is asked first
    wait_until(lambda: _marked(site, photo_id), timeout=30, what="the photo handled")
    assert remote_sha256(site, photo_id) == sha


def test_a_multipart_photo_in_s3_is_recognised_by_its_checksum_and_not_sent_again(
    gateway: ServiceProcess, shipper: ServiceProcess, site: Site, proxy: CountingProxy
) -> None:
    expected = upload_many(gateway.url, 1, device="cam-big-dup", size=9 * 2**20)
    wait_all_shipped(site, expected)
    photo_id = next(iter(expected))
    site.local_client().delete_object(Bucket=site.store_bucket, Key=photos.shipped_marker_key(photo_id))
    stored = site.local_client().head_object(Bucket=site.store_bucket, Key=photos.object_key(photo_id))
    message = photos.PhotoMessage(
        id=photo_id, key=photos.object_key(photo_id), size=stored["ContentLength"], sha256=expected[photo_id],
        content_type="image/jpeg", device_id="cam-big-dup", captured_at="2026-01-01T00:00:00.000000Z",
        received_at="2026-01-01T00:00:00.000000Z",
    )
    sent_before = proxy.total()
    publish(site, message.to_json())
    wait_until(lambda: _marked(site, photo_id) and _queue_empty(site), timeout=30, what="the copy handled")
    assert proxy.total() - sent_before < 10_000, "a multipart photo already in S3 was uploaded again"


def test_a_device_retrying_a_queued_photo_gets_it_uploaded_once(gateway: ServiceProcess, shipper: ServiceProcess,
                                                                site: Site, proxy: CountingProxy) -> None:
    # Each retry of a photo not yet shipped queues it again; the copies arrive together.
    image = jpeg(400_000)
    fields = photo("cam-retry", image)
    try:
        set_control(site, ShippingControl(paused=True))
        wait_until(lambda: status(shipper)["state"] == "paused", timeout=10, what="pause")
        answers = [upload(gateway.url, fields) for _ in range(4)]
        assert [a.status_code for a in answers] == [201, 200, 200, 200]
        assert len({a.json()["id"] for a in answers}) == 1
        wait_until(lambda: _ready_messages(site) >= 4, timeout=10, what="four messages for one photo")
        sent_before = proxy.total()
    finally:
        set_control(site, ShippingControl())
    photo_id = answers[0].json()["id"]
    wait_until(lambda: _marked(site, photo_id) and _queue_empty(site), timeout=30, what="photo shipped")
    assert proxy.total() - sent_before < 1.5 * len(image), "the photo was uploaded more than once"
    assert remote_sha256(site, photo_id) == hashlib.sha256(image).hexdigest()


def test_pause_and_rate_override_reach_a_running_shipper(gateway: ServiceProcess, shipper: ServiceProcess,
                                                         site: Site) -> None:
    try:
        set_control(site, ShippingControl(rate_override=3_000_000))
        wait_until(lambda: status(shipper)["cap_bytes_per_s"] == 3_000_000, timeout=10, what="rate override")
        set_control(site, ShippingControl(paused=True))
        wait_until(lambda: status(shipper)["state"] == "paused", timeout=10, what="pause")
        held = upload_many(gateway.url, 3, device="cam-paused", size=50_000)
        wait_until(lambda: _ready_messages(site) >= 3, timeout=10, what="photos queued while paused")
        assert all(remote_sha256(site, i) is None for i in held)
    finally:
        set_control(site, ShippingControl())
    wait_until(lambda: status(shipper)["state"] == "running", timeout=10, what="resume")
    assert status(shipper)["cap_bytes_per_s"] == 8_000_000  # back to the configured rate
    wait_all_shipped(site, held)


def test_a_pause_until_a_time_holds_shipping_then_ends_by_itself(gateway: ServiceProcess, shipper: ServiceProcess,
                                                                  site: Site) -> None:
    until = (datetime.now(UTC) + timedelta(seconds=8)).isoformat()
    try:
        set_control(site, ShippingControl(paused=True, paused_until=until))
        wait_until(lambda: status(shipper)["state"] == "paused", timeout=10, what="pause")
        held = upload_many(gateway.url, 2, device="cam-until", size=50_000)
        # Held while paused: the photos wait on the queue, not in S3.
        wait_until(lambda: _ready_messages(site) >= 2, timeout=5, what="photos queued while paused")
        assert status(shipper)["state"] == "paused"
        assert not any(_marked(site, i) for i in held)
        wait_until(lambda: status(shipper)["state"] == "running", timeout=20, what="the pause to end")
        wait_all_shipped(site, held)
    finally:
        set_control(site, ShippingControl())


def test_missing_local_object_is_parked_with_its_reason_and_replayed(
    shipper: ServiceProcess, site: Site, gateway: ServiceProcess
) -> None:
    image = b"\xff\xd8\xff" + b"late" * 1000
    sha = hashlib.sha256(image).hexdigest()
    photo_id = photos.photo_id("cam-lost", datetime(2026, 1, 1, tzinfo=UTC), sha)
    message = photos.PhotoMessage(
        id=photo_id, key=photos.object_key(photo_id), size=len(image), sha256=sha, content_type="image/jpeg",
        device_id="cam-lost", captured_at="2026-01-01T00:00:00.000000Z", received_at="2026-01-01T00:00:00.000000Z",
    )
    publish(site, message.to_json())
    wait_until(lambda: _exists(site, photos.parked_marker_key(photo_id)), timeout=30, what="parked marker")
    marker = site.local_client().get_object(Bucket=site.store_bucket, Key=photos.parked_marker_key(photo_id))
    assert "no local object" in marker["Body"].read().decode()
    state = requests.get(f"{gateway.url}/v1/photos/{photo_id}", headers=auth("cam-lost"), timeout=10)
    assert state.status_code == 404  # no local copy and not shipped: the device should upload again

    # The photo turns up (say, restored from a backup); an operator replays the parked queue.
    site.local_client().put_object(Bucket=site.store_bucket, Key=photos.object_key(photo_id), Body=image,
                                   ContentType="image/jpeg", Metadata={"sha256": sha, "device-id": "cam-lost"})
    assert replay(site) == 1
    wait_all_shipped(site, {photo_id: sha})
    assert not _exists(site, photos.parked_marker_key(photo_id))


def test_a_local_copy_that_does_not_match_its_checksum_is_parked_not_shipped(
    shipper: ServiceProcess, site: Site
) -> None:
    image = b"\xff\xd8\xff" + b"rot" * 2000
    photo_id = photos.photo_id("cam-rot", datetime(2026, 1, 2, tzinfo=UTC), "0" * 64)
    site.local_client().put_object(Bucket=site.store_bucket, Key=photos.object_key(photo_id), Body=image)
    message = photos.PhotoMessage(
        id=photo_id, key=photos.object_key(photo_id), size=len(image), sha256="0" * 64,
        content_type="image/jpeg", device_id="cam-rot", captured_at="2026-01-02T00:00:00.000000Z",
        received_at="2026-01-02T00:00:00.000000Z",
    )
    publish(site, message.to_json())
    # One retry (after 5 s), then parked.
    wait_until(lambda: _exists(site, photos.parked_marker_key(photo_id)), timeout=40, what="parked marker")
    reason = site.local_client().get_object(Bucket=site.store_bucket, Key=photos.parked_marker_key(photo_id))
    assert "SHA-256" in reason["Body"].read().decode()
    assert remote_sha256(site, photo_id) is None
    assert not site.remote_client().list_multipart_uploads(Bucket=site.remote_bucket).get("Uploads")


def test_kill_9_mid_upload_then_restart_ships_everything_once(
    env: dict[str, str], logs: Path, gateway: ServiceProcess, shipper: ServiceProcess, site: Site
) -> None:
    shipper.stop()  # this test runs its own, slow shipper
    slow = {**env, "PHOTOFERRY_SHIP_RATE": "2MB"}
    expected = upload_many(gateway.url, 4, device="cam-crash", size=[300_000, 9 * 2**20])
    victim = start_service("shipper", slow, logs)
    wait_until(lambda: status(victim)["sent_bytes_total"] > 3_000_000, timeout=30, what="uploads under way")
    victim.kill()
    survivor = start_service("shipper", slow, logs)
    try:
        wait_all_shipped(site, expected, timeout=120)
    finally:
        stop_cleanly(survivor)
        shipper.start()
    keys = [k for k in remote_keys(site) if k.split("/")[-1] in expected]
    assert len(keys) == len(expected)
    assert site.remote_client().list_multipart_uploads(Bucket=site.remote_bucket).get("Uploads", []) == []


# -- helpers --------------------------------------------------------------------------------


def publish(site: Site, body: bytes) -> None:
    async def send() -> None:
        connection = await aio_pika.connect(site.amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(topology.PHOTOS_EXCHANGE)
            await exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                   topology.SHIP_ROUTING_KEY)

    asyncio.run(send())


def replay(site: Site) -> int:
    async def run() -> int:
        broker = Broker(site.amqp_url, name="test-replay")
        broker.start()
        try:
            await asyncio.wait_for(broker.connected(), 20)
            return await parking.replay(broker, LocalStore(store_settings(site)))
        finally:
            await broker.close()

    return asyncio.run(run())


def _duplicates(shipper: ServiceProcess) -> float:
    return metric_value(shipper.url, "photoferry_shipper_duplicates_total")


def _exists(site: Site, key: str) -> bool:
    return bool(site.local_keys(key))


def _marked(site: Site, photo_id: str) -> bool:
    return _exists(site, photos.shipped_marker_key(photo_id))


def _ready_messages(site: Site) -> int:
    return site.shipping_messages("messages_ready")


def _queue_empty(site: Site) -> bool:
    return site.shipping_messages() == 0

