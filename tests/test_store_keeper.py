"""The store keeper against real servers: reconciling, retention, figures, and the operator API."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import aio_pika
import pytest
import requests
from PIL import Image
from playwright.sync_api import sync_playwright

from devtools.servers import ServiceProcess, wait_until
from services.common import messages, parking, photos, topology
from services.common.broker import Broker
from services.common.config import StoreKeeperConfig
from services.common.localstore import LocalStore
from services.store import api
from services.store.app import create_app
from tests.conftest import EITHER_STORE, start_service, stop_cleanly
from tests.helpers import (
    ADMIN_TOKEN,
    Site,
    assert_problem,
    auth,
    drain_queue,
    jpeg,
    metric_value,
    photo,
    store_settings,
    upload,
    upload_many,
)

pytestmark = [pytest.mark.servers, EITHER_STORE]

OPERATOR = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def env(site: Site) -> dict[str, str]:
    return site.env(PHOTOFERRY_SHIP_RATE="4MB", PHOTOFERRY_RECONCILE_EVERY="3s", PHOTOFERRY_RETAIN="3s")


@pytest.fixture(scope="module")
def keeper(env: dict[str, str], logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("store", env, logs)
    yield service
    stop_cleanly(service)


@pytest.fixture(scope="module")
def gateway(env: dict[str, str], logs: Path, keeper: ServiceProcess) -> Iterator[ServiceProcess]:
    service = start_service("gateway", env, logs)
    yield service
    stop_cleanly(service)


@pytest.fixture(scope="module")
def shipper(env: dict[str, str], logs: Path, keeper: ServiceProcess) -> Iterator[ServiceProcess]:
    service = start_service("shipper", env, logs)
    yield service
    stop_cleanly(service)


def operator(keeper: ServiceProcess, method: str, path: str, body: object = None) -> requests.Response:
    return requests.request(method, f"{keeper.url}{path}", json=body, headers=OPERATOR, timeout=30)


def status(keeper: ServiceProcess) -> dict:  # type: ignore[type-arg]
    response = operator(keeper, "GET", "/api/status")
    assert response.status_code == 200, response.text
    return response.json()


def sweep(keeper: ServiceProcess) -> dict:  # type: ignore[type-arg]
    response = operator(keeper, "POST", "/api/sweep")
    assert response.status_code == 200, response.text
    return response.json()


def ship_queue_depth(site: Site) -> int:
    return site.shipping_messages()


@pytest.fixture
def paused(keeper: ServiceProcess, shipper: ServiceProcess) -> Iterator[None]:
    """Shipping paused for the test, resumed after it."""
    assert operator(keeper, "POST", "/api/shipping/pause").status_code == 200
    yield
    assert operator(keeper, "POST", "/api/shipping/resume").status_code == 200


@pytest.mark.s3_store_only
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/status"), ("GET", "/api/history"), ("POST", "/api/shipping/pause"),
     ("POST", "/api/shipping/resume"), ("PUT", "/api/shipping/rate"), ("GET", "/api/parked"),
     ("POST", "/api/parked/replay"), ("POST", "/api/sweep")],
)
def test_the_operator_api_needs_the_operator_token(keeper: ServiceProcess, method: str, path: str) -> None:
    assert_problem(requests.request(method, f"{keeper.url}{path}", timeout=10), 401, "token")
    wrong = {"Authorization": "Bearer not-the-token"}
    assert_problem(requests.request(method, f"{keeper.url}{path}", headers=wrong, timeout=10), 401, "not valid")
    device = auth("cam-001")  # a device token is not an operator token
    assert requests.request(method, f"{keeper.url}{path}", headers=device, timeout=10).status_code == 401


@pytest.mark.s3_store_only
@pytest.mark.parametrize(
    ("path", "body", "word"),
    [("/api/shipping/rate", {"rate": "fast"}, "rate"), ("/api/shipping/rate", {"rate": 0}, "above zero"),
     ("/api/shipping/rate", {"speed": "40Mbit"}, "rate"), ("/api/shipping/rate", [1], "object"),
     ("/api/shipping/rate", {"ceiling": "fast"}, "ceiling"), ("/api/shipping/rate", {"ceiling": 0}, "ceiling"),
     ("/api/shipping/rate", {"ceiling": True}, "ceiling"),
     ("/api/shipping/rate", {"rate": "5MB", "ceiling": "4MB"}, "must be above the rate"),
     ("/api/shipping/pause", {"until": "2001-01-01T00:00:00Z"}, "future"),
     ("/api/shipping/pause", {"until": "tomorrow"}, "RFC 3339"),
     ("/api/shipping/pause", {"until": "2999-01-01T00:00:00"}, "offset")],
)
def test_bad_operator_input_is_refused_and_changes_nothing(keeper: ServiceProcess, path: str, body: object,
                                                           word: str) -> None:
    before = status(keeper)["control"]
    method = "PUT" if path.endswith("rate") else "POST"
    assert_problem(operator(keeper, method, path, body), 400, word)
    assert status(keeper)["control"] == before


@pytest.mark.s3_store_only
def test_rate_and_pause_reach_the_shippers(keeper: ServiceProcess, shipper: ServiceProcess) -> None:
    def shipper_cap() -> float:
        return float(requests.get(f"{shipper.url}/status", timeout=10).json()["cap_bytes_per_s"])

    try:
        assert operator(keeper, "PUT", "/api/shipping/rate", {"rate": "16Mbit"}).json()["cap_bytes_per_s"] == 2e6
        wait_until(lambda: shipper_cap() == 2e6, timeout=10, what="the override at the shipper")
        until = "2999-01-01T00:00:00+00:00"
        assert operator(keeper, "POST", "/api/shipping/pause", {"until": until}).json()["paused"] is True
        wait_until(lambda: requests.get(f"{shipper.url}/status", timeout=10).json()["state"] == "paused",
                   timeout=10, what="the pause at the shipper")
        assert status(keeper)["shipping"] == "paused"
    finally:
        operator(keeper, "POST", "/api/shipping/resume")
        operator(keeper, "PUT", "/api/shipping/rate", {"rate": None})
    wait_until(lambda: shipper_cap() == 4e6, timeout=10, what="back to the schedule")


def test_the_ceiling_of_the_band_above_the_cap_reaches_the_shippers(keeper: ServiceProcess,
                                                                    shipper: ServiceProcess) -> None:
    def shipper_ceiling() -> float:
        return float(requests.get(f"{shipper.url}/status", timeout=10).json()["ceiling_bytes_per_s"])

    band = status(keeper)["scavenging"]
    assert band["state"] == "off" and band["ceiling_bytes_per_s"] is None and band["floor_bytes_per_s"] == 4e6
    try:
        answer = operator(keeper, "PUT", "/api/shipping/rate", {"ceiling": "64Mbit"}).json()
        assert (answer["ceiling_override"], answer["ceiling_bytes_per_s"]) == (8e6, 8e6)
        wait_until(lambda: shipper_ceiling() == 8e6, timeout=10, what="the ceiling at the shipper")
        band = status(keeper)["scavenging"]
        assert band["ceiling_bytes_per_s"] == 8e6 and band["state"] != "off"
        assert band["state"] in ("idle", "measuring", "using_idle_uplink", "yielding", "unmeasured")
        assert status(keeper)["text"]["scavenging"]
        # Above a rate override the band stands on it; at or under it there is none.
        assert operator(keeper, "PUT", "/api/shipping/rate", {"rate": "9MB"}).json()["ceiling_bytes_per_s"] is None
        wait_until(lambda: shipper_ceiling() == 0, timeout=10, what="no band under the cap")
        operator(keeper, "PUT", "/api/shipping/rate", {"rate": None})
        off = operator(keeper, "PUT", "/api/shipping/rate", {"ceiling": "off"}).json()
        assert (off["ceiling_override"], off["ceiling_bytes_per_s"]) == (0, None)
        assert status(keeper)["scavenging"]["state"] == "off"
    finally:
        operator(keeper, "PUT", "/api/shipping/rate", {"rate": None, "ceiling": None})
    wait_until(lambda: shipper_ceiling() == 0, timeout=10, what="back to the schedule: no band")


def test_status_figures_match_a_known_scenario(keeper: ServiceProcess, gateway: ServiceProcess, site: Site,
                                               paused: None) -> None:
    sweep(keeper)
    before = status(keeper)
    sizes = [100_000, 200_000, 300_000, 400_000]
    first_upload = time.time()
    upload_many(gateway.url, len(sizes), device="cam-figures", size=sizes)
    sweep(keeper)
    figures = status(keeper)
    assert figures["backlog_objects"] - before["backlog_objects"] == 4
    assert figures["backlog_bytes"] - before["backlog_bytes"] == sum(sizes)
    assert 0 <= figures["oldest_unshipped_age_s"] <= time.time() - first_upload + 2
    # The ingest rate is over the last minute: these uploads alone make sum/60.
    assert figures["ingest_bytes_per_s"] >= sum(sizes) / 60
    assert figures["shipping"] == "paused" and figures["cap_bytes_per_s"] == 0
    assert figures["eta_drain_s"] is None  # paused: it does not drain
    assert figures["devices"] >= 1 and "cam-figures" not in figures["silent_devices"]
    assert figures["store_used_bytes"] >= sum(sizes)
    assert figures["store_capacity_bytes"] == 10**12
    assert figures["admission"]["open"] is True

    assert operator(keeper, "POST", "/api/shipping/resume").status_code == 200
    resumed = status(keeper)
    # Draining at the 4 MB/s cap less what arrives (the last minute's ingest).
    expected = resumed["backlog_bytes"] / (4e6 - resumed["ingest_bytes_per_s"])
    assert resumed["eta_drain_s"] == pytest.approx(expected, abs=0.2)


def test_an_object_stored_without_a_message_is_shipped_by_the_reconciler(
    keeper: ServiceProcess, shipper: ServiceProcess, site: Site
) -> None:
    image = jpeg(30_000)
    sha = hashlib.sha256(image).hexdigest()
    photo_id = photos.photo_id("cam-orphan", datetime.now(UTC), sha)
    # As a gateway that died between its write and its publish leaves it.
    site.put_local(photos.object_key(photo_id), image,
                   metadata={"sha256": sha, "device-id": "cam-orphan", "captured-at": "2026-01-01T00:00:00.000000Z",
                             "received-at": "2026-01-01T00:00:00.000000Z"})
    # Sweeps run every 3 s on their own: the photo reaches S3 within a few of them.
    wait_until(lambda: _in_remote(site, photo_id), timeout=30, what="the orphan in S3", interval=1)


def test_a_purged_queue_is_refilled_but_a_healthy_backlog_is_not_duplicated(
    keeper: ServiceProcess, gateway: ServiceProcess, shipper: ServiceProcess, site: Site
) -> None:
    assert operator(keeper, "POST", "/api/shipping/pause").status_code == 200
    try:
        expected = upload_many(gateway.url, 12, device="cam-purge", size=20_000)
        wait_until(lambda: ship_queue_depth(site) == 12, timeout=10, what="12 queued")
        for _ in range(2):  # a healthy backlog: sweeps add nothing
            sweep(keeper)
        assert ship_queue_depth(site) == 12

        reconciled = metric_value(keeper.url, "photoferry_store_reconciled_total")
        for queue in (topology.FRESH_QUEUE, topology.SHIP_QUEUE):  # synchronous
            site.rabbit.management("DELETE", f"queues/{site.name}/{queue}/contents")
        wait_until(lambda: metric_value(keeper.url, "photoferry_store_reconciled_total") >= reconciled + 12,
                   timeout=20, what="the backlog re-enqueued", interval=1)
        sweep(keeper)
        assert metric_value(keeper.url, "photoferry_store_reconciled_total") == reconciled + 12
        wait_until(lambda: ship_queue_depth(site) == 12, timeout=10, what="the queue refilled")
    finally:
        assert operator(keeper, "POST", "/api/shipping/resume").status_code == 200
    wait_until(lambda: all(_in_remote(site, i) for i in expected), timeout=60, what="all shipped", interval=1)


def test_photos_parked_with_a_reason_do_not_hide_photos_without_a_message(
    keeper: ServiceProcess, shipper: ServiceProcess, site: Site, paused: None
) -> None:
    """Parked photos are not counted as unshipped, so their messages must not be counted as queued."""

    def store_photo(device: str) -> tuple[str, bytes]:
        image = jpeg(10_000)
        sha = hashlib.sha256(image).hexdigest()
        photo_id = photos.photo_id(device, datetime.now(UTC), sha)
        site.put_local(photos.object_key(photo_id), image,
                       metadata={"sha256": sha, "device-id": device, "captured-at": "2026-03-03T00:00:00.000000Z",
                                 "received-at": "2026-03-03T00:00:00.000000Z"})
        return photo_id, image

    async def park(parked: list[tuple[str, bytes]]) -> None:
        broker = Broker(site.amqp_url, name="test-park")
        broker.start()
        try:
            await asyncio.wait_for(broker.connected(), 20)
            for photo_id, image in parked:
                body = photos.PhotoMessage(
                    id=photo_id, key=photos.object_key(photo_id), size=len(image),
                    sha256=hashlib.sha256(image).hexdigest(), content_type="image/jpeg",
                    device_id=photos.owner_of(photo_id), captured_at="2026-03-03T00:00:00.000000Z",
                    received_at="2026-03-03T00:00:00.000000Z").to_json()
                await parking.park(broker, LocalStore(store_settings(site)), body, photo_id=photo_id,
                                   reason="test: parked by hand", attempts=8)
        finally:
            await broker.close()

    sweep(keeper)
    reconciled = metric_value(keeper.url, "photoferry_store_reconciled_total")
    asyncio.run(park([store_photo(f"cam-parked-{i}") for i in range(3)]))
    orphans = [store_photo(f"cam-nomessage-{i}")[0] for i in range(3)]
    # Candidates once stored for a sweep interval (3 s); sweeps run every 3 s on their own.
    wait_until(lambda: metric_value(keeper.url, "photoferry_store_reconciled_total") >= reconciled + 3,
               timeout=30, what="the three photos without a message re-enqueued", interval=1)
    sweep(keeper)
    assert metric_value(keeper.url, "photoferry_store_reconciled_total") == reconciled + 3
    queued = [photos.PhotoMessage.from_json(m.body).id for m in site.drain()]
    assert sorted(i for i in queued if i in orphans) == sorted(orphans)
    assert operator(keeper, "POST", "/api/parked/replay").status_code == 200


def test_retention_deletes_only_shipped_copies_older_than_the_retention(
    keeper: ServiceProcess, gateway: ServiceProcess, shipper: ServiceProcess, site: Site
) -> None:
    shipped = upload_many(gateway.url, 2, device="cam-retained", size=20_000)
    wait_until(lambda: all(_in_remote(site, i) for i in shipped), timeout=30, what="shipped", interval=1)
    assert operator(keeper, "POST", "/api/shipping/pause").status_code == 200
    try:
        waiting = upload_many(gateway.url, 2, device="cam-waiting", size=20_000)
        # Retention is 3 s and sweeps run every 3 s.
        wait_until(lambda: not any(_local(site, i) for i in shipped), timeout=30,
                   what="shipped copies deleted after the retention", interval=1)
        assert all(_local(site, i) for i in waiting), "an unshipped copy was deleted"
        state = requests.get(f"{gateway.url}/v1/photos/{next(iter(shipped))}", headers=auth("cam-retained"),
                             timeout=10).json()
        assert state["status"] == "shipped"  # the marker remembers
    finally:
        assert operator(keeper, "POST", "/api/shipping/resume").status_code == 200


def test_parked_photos_are_listed_with_reasons_and_replayed(keeper: ServiceProcess, shipper: ServiceProcess,
                                                             site: Site) -> None:
    photo_id = photos.photo_id("cam-gone", datetime(2026, 2, 2, tzinfo=UTC), "1" * 64)
    message = photos.PhotoMessage(
        id=photo_id, key=photos.object_key(photo_id), size=10, sha256="1" * 64, content_type="image/jpeg",
        device_id="cam-gone", captured_at="2026-02-02T00:00:00.000000Z", received_at="2026-02-02T00:00:00.000000Z")

    async def publish() -> None:
        connection = await aio_pika.connect(site.amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(topology.PHOTOS_EXCHANGE)
            await exchange.publish(aio_pika.Message(message.to_json()), topology.SHIP_ROUTING_KEY)

    asyncio.run(publish())

    def listed() -> list:  # type: ignore[type-arg]
        return [p for p in operator(keeper, "GET", "/api/parked").json()["parked"] if p["id"] == message.id]

    wait_until(lambda: listed(), timeout=30, what="the parked photo listed")
    assert "no local object" in listed()[0]["reason"]
    assert operator(keeper, "POST", "/api/parked/replay").json()["replayed"] >= 1
    # Still no local object: it is parked again, with its reason.
    wait_until(lambda: listed(), timeout=30, what="parked again")


def test_gateways_refuse_uploads_past_the_high_watermark_and_take_them_under_the_low(
    site: Site, logs: Path
) -> None:
    # A site of its own (vhost and bucket) with a store of 2 MB: uploads stop at 1 MB
    # used and resume under 0.5 MB.
    site.rabbit.add_vhost(f"{site.name}-full")
    site.ensure_local_bucket(f"{site.store_bucket}-full")
    env = site.env(PHOTOFERRY_AMQP_URL=site.rabbit.url_for(f"{site.name}-full"),
                   PHOTOFERRY_STORE_BUCKET=f"{site.store_bucket}-full", PHOTOFERRY_STORE_CAPACITY="2MB",
                   PHOTOFERRY_STORE_HIGH_WATERMARK="0.5", PHOTOFERRY_STORE_LOW_WATERMARK="0.25",
                   PHOTOFERRY_RECONCILE_EVERY="2s", PHOTOFERRY_RETAIN="1h", PHOTOFERRY_SHIP_RATE="10MB")
    keeper = start_service("store", env, logs)
    gateway = start_service("gateway", env, logs)
    shipper = start_service("shipper", env, logs)
    try:
        assert operator(keeper, "POST", "/api/shipping/pause").status_code == 200
        accepted: list[str] = []

        def refused() -> bool:
            response = upload(gateway.url, photo("cam-full", jpeg(100_000)))
            if response.status_code == 201:
                accepted.append(response.json()["id"])
                return False
            assert_problem(response, 503, "full")
            assert int(response.headers["Retry-After"]) > 0
            return True

        wait_until(refused, timeout=60, what="uploads refused", interval=0.3)
        assert len(accepted) >= 9
        # The gateway refuses once its share of the room is spent; the keeper closes on its next decision.
        wait_until(lambda: status(keeper)["admission"]["open"] is False, timeout=10, what="admission closed")

        # Shipping again: shipped copies are evicted early, usage falls under the low watermark.
        assert operator(keeper, "POST", "/api/shipping/resume").status_code == 200
        wait_until(lambda: upload(gateway.url, photo("cam-full", jpeg(50_000))).status_code == 201,
                   timeout=90, what="uploads taken again", interval=1)
        wait_until(lambda: all(_in_remote(site, i) for i in accepted), timeout=60, what="nothing lost", interval=1)
    finally:
        for service in (shipper, gateway, keeper):
            stop_cleanly(service)


def test_the_high_watermark_holds_at_a_high_rate(site: Site, logs: Path) -> None:
    """Usage passes the high watermark by at most one photo per gateway, however fast photos arrive."""
    site.rabbit.add_vhost(f"{site.name}-rate")
    site.ensure_local_bucket(f"{site.store_bucket}-rate")
    env = site.env(PHOTOFERRY_AMQP_URL=site.rabbit.url_for(f"{site.name}-rate"),
                   PHOTOFERRY_STORE_BUCKET=f"{site.store_bucket}-rate", PHOTOFERRY_STORE_CAPACITY="8MB",
                   PHOTOFERRY_STORE_HIGH_WATERMARK="0.5", PHOTOFERRY_STORE_LOW_WATERMARK="0.25",
                   PHOTOFERRY_RECONCILE_EVERY="5s", PHOTOFERRY_RETAIN="1h")
    keeper = start_service("store", env, logs)
    gateway = start_service("gateway", env, logs)
    size, high = 40_000, 4_000_000
    try:
        wait_until(lambda: status(keeper)["swept_at"] is not None, timeout=20, what="a first sweep")
        refusals = 0

        def send(device: int) -> int:
            nonlocal refusals
            accepted = 0
            while refusals < 20:
                # A device of its own per thread: one device may have only two uploads in flight.
                response = upload(gateway.url, photo(f"cam-rate-{device}", jpeg(size)))
                if response.status_code == 201:
                    accepted += 1
                elif response.status_code == 503:
                    refusals += 1
                else:
                    raise AssertionError(response.text)
            return accepted

        with ThreadPoolExecutor(8) as pool:
            accepted = sum(pool.map(send, range(8)))
        stored = sweep(keeper)
        assert stored["photos"] == accepted
        assert accepted * size > high * 0.9, "refused long before the watermark"
        assert accepted * size <= high + size, f"{accepted * size} bytes stored past the {high} high watermark"
    finally:
        for service in (gateway, keeper):
            stop_cleanly(service)


class MinioMetricsStandIn:
    """MinIO's cluster metrics page with figures the test sets (MinIO itself cannot run here)."""

    TOKEN = "minio-metrics-token"

    def __init__(self) -> None:
        self.total, self.free = 1_000_000_000, 500_000_000
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Bearer {stand_in.TOKEN}":
                    self.send_response(403)
                    self.end_headers()
                    return
                body = (f"# TYPE minio_cluster_capacity_usable_total_bytes gauge\n"
                        f'minio_cluster_capacity_usable_total_bytes{{server="minio:9000"}} {stand_in.total}\n'
                        f"# TYPE minio_cluster_capacity_usable_free_bytes gauge\n"
                        f'minio_cluster_capacity_usable_free_bytes{{server="minio:9000"}} {stand_in.free}\n').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/minio/v2/metrics/cluster"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.s3_store_only  # MinIO's metrics: the embedded store reads its own file system instead
def test_a_disk_filling_for_other_reasons_closes_admission_too(site: Site, logs: Path) -> None:
    # The photo budget is roomy (1 TB); the disk under the store is what fills.
    minio = MinioMetricsStandIn()
    site.rabbit.add_vhost(f"{site.name}-disk")
    site.ensure_local_bucket(f"{site.store_bucket}-disk")
    env = site.env(PHOTOFERRY_AMQP_URL=site.rabbit.url_for(f"{site.name}-disk"),
                   PHOTOFERRY_STORE_BUCKET=f"{site.store_bucket}-disk", PHOTOFERRY_STORE_CAPACITY="1TB",
                   PHOTOFERRY_STORE_METRICS_URL=minio.url, PHOTOFERRY_STORE_METRICS_TOKEN=minio.TOKEN,
                   PHOTOFERRY_RECONCILE_EVERY="2s")
    keeper = start_service("store", env, logs)
    gateway = start_service("gateway", env, logs)
    try:
        wait_until(lambda: status(keeper)["store_disk_free_bytes"] == 500_000_000, timeout=20, what="disk read")
        assert status(keeper)["store_fill"] == pytest.approx(0.5)
        first = upload(gateway.url, photo("cam-disk", jpeg(20_000)))
        assert first.status_code == 201, first.text

        minio.free = 50_000_000  # 95% used, past the 90% high watermark

        def refused() -> bool:
            response = upload(gateway.url, photo("cam-disk", jpeg(20_000)))
            if response.status_code == 201:
                return False
            assert_problem(response, 503, "full", "disk")
            return True
        wait_until(refused, timeout=40, what="uploads refused on a full disk", interval=0.5)
        figures = status(keeper)
        assert figures["admission"]["open"] is False and figures["store_disk_free_bytes"] == 50_000_000

        minio.free = 150_000_000  # 85%: under the high watermark but not the low one (80%)
        wait_until(lambda: status(keeper)["store_disk_free_bytes"] == 150_000_000, timeout=20, what="disk re-read")
        assert status(keeper)["admission"]["open"] is False  # decided with that reading: hysteresis
        minio.free = 300_000_000  # 70%
        wait_until(lambda: upload(gateway.url, photo("cam-disk", jpeg(20_000))).status_code == 201,
                   timeout=40, what="uploads taken again", interval=0.5)
        key = photos.object_key(first.json()["id"])
        assert site.local_keys(key, bucket=f"{site.store_bucket}-disk") == [key]
    finally:
        for service in (gateway, keeper):
            stop_cleanly(service)
        minio.close()


@pytest.mark.s3_store_only
def test_the_operator_page_shows_live_figures_and_charts(keeper: ServiceProcess, gateway: ServiceProcess,
                                                         tmp_path: Path) -> None:
    upload_many(gateway.url, 2, device="cam-page", size=20_000)
    sweep(keeper)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            refused: list[str] = []
            page.on("console", lambda message: refused.append(message.text)
                    if "Content Security Policy" in message.text else None)
            answer = page.goto(f"{keeper.url}/#token={ADMIN_TOKEN}")
            assert answer is not None
            policy = answer.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
            assert "unsafe-inline" not in policy
            assert answer.headers["x-content-type-options"] == "nosniff" and answer.headers["x-frame-options"] == "DENY"
            assert answer.headers["referrer-policy"] == "no-referrer"
            # Waits by selector, not wait_for_function: the policy forbids the eval that one polls with.
            page.wait_for_selector("body[data-loaded=yes]", timeout=20_000)
            assert int(page.inner_text("#devices")) >= 1
            assert page.inner_text("#shipping") in ("running", "paused", "breaker open")
            assert page.inner_text("#scavenging") == "off"  # no ceiling set: shipping at the cap only
            assert page.inner_text("#scavenging-detail").startswith("off")
            # Charts: the page adds a point every refresh (5 s); wait for a line of two.
            cap_line = page.locator("#egress-chart polyline[data-series=cap]")
            wait_until(lambda: cap_line.count() == 1 and len((cap_line.get_attribute("points") or "").split()) >= 2,
                       timeout=30, what="a cap line of two points", interval=0.5)
            shot = page.locator("#egress-chart").screenshot(path=str(tmp_path / "egress-chart.png"))
            raw = Image.open(BytesIO(shot)).convert("RGB").tobytes()
            cap_colour = (0xC7, 0x77, 0x00)
            drawn = sum(1 for pixel in zip(raw[0::3], raw[1::3], raw[2::3], strict=True)
                        if all(abs(a - b) < 40 for a, b in zip(pixel, cap_colour, strict=True)))
            assert drawn > 50, "the cap line was not drawn"
            # The token stays out of the address bar once read.
            assert "token" not in page.url
            # The figures a newcomer found wrong: one time tick per end and the middle, no "1 B" on an
            # empty axis, the axis label clear of the highest line, nothing waiting said once.
            labels = page.eval_on_selector_all("#egress-chart text", "nodes => nodes.map(n => n.textContent)")
            assert len(labels) == 5 and "1 B" not in labels, labels
            highest = page.eval_on_selector_all(
                "#egress-chart polyline", "lines => Math.min(...lines.flatMap(l => l.getAttribute('points')"
                ".split(' ').map(p => Number(p.split(',')[1]))))")
            assert highest > 30, "a line runs through the axis label"
            assert page.inner_text("#oldest") == "nothing waiting" or page.inner_text("#oldest").startswith("oldest ")
            assert refused == [], refused
            # "updated" reads on the header's background (WCAG AA: a contrast of 4.5 at least).
            colours = page.eval_on_selector("#updated", "e => [getComputedStyle(e).color, "
                                            "getComputedStyle(e.parentElement).backgroundColor]")
            assert contrast(*colours) >= 4.5, colours
        finally:
            browser.close()
    api = requests.get(f"{keeper.url}/api/status", headers=OPERATOR, timeout=10)
    assert api.headers["Cache-Control"] == "no-store" and api.headers["X-Content-Type-Options"] == "nosniff"


def contrast(foreground: str, background: str) -> float:
    """WCAG contrast ratio of two CSS rgb() colours."""

    def luminance(colour: str) -> float:
        channels = [int(c) / 255 for c in colour[colour.index("(") + 1:colour.index(")")].split(",")[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    lighter, darker = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def _in_remote(site: Site, photo_id: str) -> bool:
    client = site.remote_client()
    try:
        client.head_object(Bucket=site.remote_bucket, Key="site-test/" + photos.object_key(photo_id))
    except client.exceptions.ClientError:
        return False
    return True


def _local(site: Site, photo_id: str) -> bool:
    return bool(site.local_keys(photos.object_key(photo_id)))


def photoferry(keeper: ServiceProcess, *args: str, token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PHOTOFERRY_STORE_URL": keeper.url}
    env.pop("PHOTOFERRY_ADMIN_TOKEN", None)
    if token is not None:
        env["PHOTOFERRY_ADMIN_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.s3_store_only
def test_the_operator_command_line(keeper: ServiceProcess, shipper: ServiceProcess) -> None:
    shown = photoferry(keeper, "status")
    assert shown.returncode == 0, shown.stderr
    assert "backlog" in shown.stdout and "shipping" in shown.stdout
    assert json.loads(photoferry(keeper, "status", "--json").stdout)["store_capacity_bytes"] == 10**12
    try:
        assert "2.0 MB/s" in photoferry(keeper, "rate", "16Mbit").stdout
        assert status(keeper)["cap_bytes_per_s"] == 2e6
        assert photoferry(keeper, "pause", "--until", "2999-01-01T00:00:00Z").returncode == 0
        assert status(keeper)["shipping"] == "paused"
        assert photoferry(keeper, "resume").returncode == 0
        assert photoferry(keeper, "rate", "--schedule").returncode == 0
        assert status(keeper)["cap_bytes_per_s"] == 4e6
        assert "on idle uplink up to 8.0 MB/s (override)" in photoferry(keeper, "rate", "--ceiling", "64Mbit").stdout
        assert "idle uplink" in photoferry(keeper, "status").stdout
        assert "no shipping on idle uplink" in photoferry(keeper, "rate", "--ceiling", "off").stdout
        assert photoferry(keeper, "rate", "--ceiling", "schedule").returncode == 0
        assert status(keeper)["control"]["ceiling_override"] is None
    finally:
        operator(keeper, "POST", "/api/shipping/resume")
        operator(keeper, "PUT", "/api/shipping/rate", {"rate": None, "ceiling": None})
    assert photoferry(keeper, "parked").returncode == 0
    refused = photoferry(keeper, "rate", "lots")
    assert refused.returncode == 2 and "400" in refused.stderr
    anonymous = photoferry(keeper, "status", token=None)
    assert anonymous.returncode == 2 and "PHOTOFERRY_ADMIN_TOKEN" in anonymous.stderr
    wrong = photoferry(keeper, "status", token="wrong")
    assert wrong.returncode == 2 and "401" in wrong.stderr


@pytest.mark.s3_store_only
def test_a_token_with_bytes_that_are_not_utf8_is_refused_not_an_error(keeper: ServiceProcess) -> None:
    import socket

    sock = socket.create_connection(("127.0.0.1", keeper.port), timeout=10)
    try:
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3(\r\n\r\n")
        head = sock.recv(4096)
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 401"), head[:80]


def test_a_photo_without_a_message_is_found_although_another_photo_has_several(site: Site, logs: Path) -> None:
    """A device retrying a queued photo queues it again: more messages than photos must not hide a
    photo whose message was lost (the fresh queue moves photos to the backlog at most once)."""
    vhost = f"{site.name}-moves"
    site.rabbit.add_vhost(vhost)
    site.ensure_local_bucket(f"{site.store_bucket}-moves")
    env = site.env(PHOTOFERRY_AMQP_URL=site.rabbit.url_for(vhost), PHOTOFERRY_STORE_BUCKET=f"{site.store_bucket}-moves",
                   PHOTOFERRY_RECONCILE_EVERY="2s", PHOTOFERRY_SHIP_FRESH_WINDOW="2s")
    keeper = start_service("store", env, logs)
    gateway = start_service("gateway", env, logs)

    def depth(queue: str) -> int:
        return int(site.rabbit.management("GET", f"queues/{vhost}/{queue}").get("messages", 0))  # type: ignore[union-attr]

    try:
        wait_until(lambda: status(keeper)["swept_at"] is not None, timeout=20, what="a first sweep")
        retried = photo("cam-retry", jpeg(20_000))
        statuses = [upload(gateway.url, retried).status_code for _ in range(4)]  # a device retrying
        assert statuses == [201, 200, 200, 200]
        wait_until(lambda: depth(topology.SHIP_QUEUE) == 4, timeout=20, what="four messages for one photo")
        # A photo whose message is gone (as a lost move leaves it): two photos, four messages.
        image = jpeg(20_000)
        lost = photos.photo_id("cam-lost", datetime.now(UTC), hashlib.sha256(image).hexdigest())
        site.put_local(photos.object_key(lost), image, bucket=f"{site.store_bucket}-moves",
                       metadata={"sha256": hashlib.sha256(image).hexdigest(), "device-id": "cam-lost",
                                 "captured-at": "2026-01-01T00:00:00.000000Z",
                                 "received-at": "2026-01-01T00:00:00.000000Z"})
        wait_until(lambda: depth(topology.SHIP_QUEUE) >= 5, timeout=30, what="the photo without a message queued",
                   interval=1)
        queued = [photos.PhotoMessage.from_json(m.body).id
                  for m in drain_queue(site.rabbit.url_for(vhost), topology.SHIP_QUEUE)]
        assert lost in queued
    finally:
        for service in (gateway, keeper):
            stop_cleanly(service)


def test_a_sweep_whose_reconcile_fails_commits_its_counts_whole(site: Site) -> None:
    """Reconciling fails after the walk (the broker refuses a publish): the sweep's counts still replace
    the estimates together, so usage neither loses what arrived since the last sweep nor doubles it."""
    vhost = f"{site.name}-commit"
    site.rabbit.add_vhost(vhost)
    bucket = f"{site.store_bucket}-commit"
    site.ensure_local_bucket(bucket)
    config = StoreKeeperConfig.from_env(site.env(PHOTOFERRY_AMQP_URL=site.rabbit.url_for(vhost),
                                                 PHOTOFERRY_STORE_BUCKET=bucket, PHOTOFERRY_RECONCILE_EVERY="1s"))
    keeper = create_app(config)[api.KEEPER]
    sizes = [30_000, 40_000, 50_000]

    async def scenario() -> tuple[int, int]:
        keeper.links.start()
        try:
            await asyncio.wait_for(keeper.links.connected(), 30)
            await keeper.run_sweep()  # the store empty
            for i, size in enumerate(sizes):  # stored and queued, as a gateway does
                image = jpeg(size)
                sha = hashlib.sha256(image).hexdigest()
                photo_id = photos.photo_id(f"cam-commit-{i}", datetime.now(UTC), sha)
                metadata = {"sha256": sha, "device-id": f"cam-commit-{i}", "captured-at": "2026-01-01T00:00:00.000000Z",
                            "received-at": "2026-01-01T00:00:00.000000Z"}
                assert await keeper.store.create(photos.object_key(photo_id), image, content_type="image/jpeg",
                                                 metadata=metadata)
                message = photos.PhotoMessage(
                    id=photo_id, key=photos.object_key(photo_id), size=size, sha256=sha, content_type="image/jpeg",
                    device_id=f"cam-commit-{i}", captured_at=metadata["captured-at"],
                    received_at=metadata["received-at"])
                await keeper.broker.publish(topology.PHOTOS_EXCHANGE, topology.FRESH_ROUTING_KEY,
                                            messages.shipping_message(message.to_json(), origin=messages.UPLOAD),
                                            timeout=10)
            async with asyncio.timeout(10):  # the keeper hears the photos queued (its loop must run meanwhile)
                while keeper.status()["store_used_bytes"] != sum(sizes):  # noqa: ASYNC110 (the keeper's own state)
                    await asyncio.sleep(0.1)
            # Their messages lost, and the exchange a reconcile publishes to gone: reconciling will fail.
            site.rabbit.management("DELETE", f"queues/{vhost}/{topology.FRESH_QUEUE}/contents")
            await asyncio.sleep(1.1)  # the orphan grace is the sweep interval: 1 s (a wait for age, not a state)
            site.rabbit.management("DELETE", f"exchanges/{vhost}/{topology.PHOTOS_EXCHANGE}")
            try:
                await keeper.run_sweep()
            except Exception:
                pass
            return keeper.status()["store_used_bytes"], keeper.status()["backlog_objects"]
        finally:
            await keeper.links.close()

    used, backlog = asyncio.run(scenario())
    assert used == sum(sizes) and backlog == len(sizes)
