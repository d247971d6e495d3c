"""The reference device client against the real gateway: retries that are harmless and patient."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.servers import ServiceProcess, free_port
from services.common.tokens import device_token
from services.devices.client import Backoff, DeviceClient, Photo, should_retry
from services.devices.fleet import Fleet, FleetPlan
from services.devices.jpegs import JpegMaker
from tests.conftest import start_service, stop_cleanly
from tests.helpers import DEVICE_SECRET, Site, now_rfc3339

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def gateway(site: Site, logs: Path) -> Iterator[ServiceProcess]:
    # Two uploads in flight at most, so a handful of devices at once meets 503s.
    service = start_service("gateway", site.env(PHOTOFERRY_GATEWAY_MAX_INFLIGHT="2", PHOTOFERRY_RETRY_AFTER="1"),
                            logs)
    yield service
    stop_cleanly(service)


def client(url: str, device: str, fmt: str = "json", **kwargs: object) -> DeviceClient:
    return DeviceClient(url, device, device_token(DEVICE_SECRET, device), fmt=fmt,
                        backoff=Backoff(base_s=0.2, cap_s=2), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_an_upload_and_its_retry_are_one_photo(gateway: ServiceProcess, site: Site, fmt: str) -> None:
    device = client(gateway.url, f"cam-ref-{fmt}", fmt)
    image = JpegMaker(20_000).make()
    photo = Photo(image=image, captured_at=now_rfc3339(), content_type="image/jpeg",
                  sha256=hashlib.sha256(image).hexdigest(), labels={"pen": "3"})
    first = device.upload(photo)
    again = device.upload(photo)  # the same photo sent again: a device that never saw the answer
    assert (first.accepted, first.status) == (True, 201)
    assert (again.accepted, again.status, again.photo_id) == (True, 200, first.photo_id)
    site.drain()


def test_a_crowd_meeting_503s_gets_every_photo_in(gateway: ServiceProcess, site: Site) -> None:
    site.drain()
    results = []

    def send(i: int) -> None:
        results.append(client(gateway.url, f"cam-crowd-{i}").upload(
            Photo(image=JpegMaker(300_000).make(), captured_at=now_rfc3339()), max_attempts=30))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 12 and all(r.accepted for r in results), [r.detail for r in results]
    assert any(r.attempts > 1 for r in results), "no device met a 503: the test proves nothing"
    assert len({r.photo_id for r in results}) == 12
    assert len(site.drain()) == 12


def test_a_gateway_restarting_mid_upload_gets_the_photo_on_a_later_attempt(site: Site, logs: Path) -> None:
    port = free_port()
    env = {**site.env(), "PHOTOFERRY_GATEWAY_PORT": str(port)}
    first = ServiceProcess("gateway", env, port=port, logfile=logs / "restart-1.log")
    first.start()
    device = client(first.url, "cam-restart")
    assert device.upload(Photo(image=JpegMaker(10_000).make(), captured_at=now_rfc3339())).accepted
    first.stop()  # the device's kept-alive connection now leads nowhere
    outcome = []
    sending = threading.Thread(target=lambda: outcome.append(device.upload(
        Photo(image=JpegMaker(10_000).make(), captured_at=now_rfc3339()), max_attempts=60)))
    sending.start()
    second = ServiceProcess("gateway", env, port=port, logfile=logs / "restart-2.log")
    second.start()
    try:
        sending.join(timeout=60)
    finally:
        stop_cleanly(second)
    assert outcome and outcome[0].accepted, outcome
    assert outcome[0].attempts > 1
    site.drain()


def test_a_refusal_that_retrying_cannot_fix_is_not_retried(gateway: ServiceProcess) -> None:
    wrong = DeviceClient(gateway.url, "cam-wrong", device_token(DEVICE_SECRET, "cam-other"))
    result = wrong.upload(Photo(image=JpegMaker(10_000).make(), captured_at=now_rfc3339()))
    assert (result.accepted, result.status, result.attempts) == (False, 403, 1)
    assert "does not authorise" in result.detail
    bad_time = client(gateway.url, "cam-badtime").upload(Photo(image=JpegMaker(10_000).make(), captured_at="noon"))
    assert (bad_time.status, bad_time.attempts) == (400, 1)


def test_backoff_is_jittered_capped_and_never_sooner_than_asked() -> None:
    low, high = Backoff(base_s=1, cap_s=60, rng=lambda: 0.0), Backoff(base_s=1, cap_s=60, rng=lambda: 0.999)
    assert low.delay(1) == 0 and high.delay(1) < 1
    assert high.delay(4) == pytest.approx(8, rel=0.01)  # base * 2**(attempt - 1)
    assert high.delay(30) <= 60
    assert low.delay(5, retry_after=7) == 7 and high.delay(5, retry_after=7) <= 60
    assert [s for s in (0, 200, 201, 400, 401, 403, 408, 413, 415, 422, 429, 500, 503) if should_retry(s)] == [
        0, 408, 429, 500, 503]


def test_a_device_past_its_limits_waits_as_told_and_gets_every_photo_in(site: Site, logs: Path) -> None:
    # One photo a second, no burst: a device sending faster meets 429 with Retry-After.
    limited = start_service("gateway", site.env(PHOTOFERRY_DEVICE_PHOTOS_PER_MINUTE="60", PHOTOFERRY_DEVICE_BURST="1"),
                            logs)
    try:
        waits: list[float] = []

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            time.sleep(seconds)

        device = client(limited.url, "cam-eager")
        results = [device.upload(Photo(image=JpegMaker(10_000).make(), captured_at=now_rfc3339()), sleep=sleep)
                   for _ in range(3)]
        assert all(r.accepted for r in results), [r.detail for r in results]
        assert sum(r.attempts for r in results) > 3, "no 429 was met: the test proves nothing"
        assert waits and min(waits) >= 1, "never sooner than the gateway's Retry-After"

        plan = FleetPlan(gateway=limited.url, devices=2, per_minute=240, duration_s=3, size=10_000, seed=11,
                         max_backoff_s=2, device_prefix="eager")
        report = Fleet(plan, secret=DEVICE_SECRET).run()
        assert report["statuses"].get("429", 0) > 0, report["statuses"]
        assert report["failed"] == 0 and report["accepted"] == report["sent"], report["statuses"]
    finally:
        stop_cleanly(limited)
    site.drain()
