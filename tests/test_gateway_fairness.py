"""One device cannot take the gateway: per-device limits answered 429, and the others do not notice."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.servers import ServiceProcess, wait_until
from services.common.config import DeviceLimits
from services.common.tokens import device_token
from services.devices.client import Backoff, DeviceClient, Photo
from services.gateway.fairness import DeviceLimiter, DeviceSlot, Refusal
from tests.conftest import start_service, stop_cleanly
from tests.helpers import DEVICE_SECRET, Site, assert_problem, auth, encode, jpeg, metric_value, now_rfc3339, photo

LIMITS = DeviceLimits(photos_per_minute=30, burst=60, max_inflight=2)  # the defaults


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_device_gets_its_burst_then_its_rate_and_is_told_when_to_come_back() -> None:
    clock = Clock()
    limiter = DeviceLimiter(LIMITS, clock=clock)
    for _ in range(60):
        slot = limiter.admit("cam")
        assert isinstance(slot, DeviceSlot)
        slot.release()
    refused = limiter.admit("cam")
    assert isinstance(refused, Refusal) and refused.reason == "rate"
    assert refused.retry_after_s == 2  # one photo every 2 s at 30 a minute
    assert refused.warn and "30 photos a minute" in refused.detail
    clock.now += 2
    assert isinstance(limiter.admit("cam"), DeviceSlot)
    assert isinstance(limiter.admit("other"), DeviceSlot), "another device has its own bucket"
    assert limiter.throttled() == 1


def test_uploads_at_once_are_limited_and_given_back() -> None:
    limiter = DeviceLimiter(LIMITS, clock=Clock())
    first, second = limiter.admit("cam"), limiter.admit("cam")
    assert isinstance(first, DeviceSlot) and isinstance(second, DeviceSlot)
    third = limiter.admit("cam")
    assert isinstance(third, Refusal) and third.reason == "in_flight" and third.retry_after_s == 1
    first.release()
    first.release()  # twice is once
    assert isinstance(limiter.admit("cam"), DeviceSlot)
    assert isinstance(limiter.admit("cam"), Refusal)


def test_a_refund_gives_the_photo_back() -> None:
    limiter = DeviceLimiter(DeviceLimits(photos_per_minute=1, burst=1, max_inflight=5), clock=Clock())
    slot = limiter.admit("cam")
    assert isinstance(slot, DeviceSlot)
    slot.refund()
    slot.release()
    assert isinstance(limiter.admit("cam"), DeviceSlot)
    assert isinstance(limiter.admit("cam"), Refusal)


def test_warnings_come_once_a_minute_with_the_count() -> None:
    clock = Clock()
    limiter = DeviceLimiter(DeviceLimits(photos_per_minute=1, burst=1, max_inflight=5), clock=clock)
    assert isinstance(limiter.admit("cam"), DeviceSlot)
    warned = [r.warn for r in (limiter.admit("cam") for _ in range(10)) if isinstance(r, Refusal)]
    assert warned == [True] + [False] * 9
    clock.now += 61
    limiter.admit("cam")  # a photo's worth came back
    again = limiter.admit("cam")
    assert isinstance(again, Refusal) and again.warn and again.refused_since_warned == 10


def test_state_is_bounded_and_idle_devices_are_forgotten() -> None:
    clock = Clock()
    limiter = DeviceLimiter(LIMITS, clock=clock, max_tracked=1000)
    held = limiter.admit("busy")
    for i in range(20_000):  # a client inventing tokens
        slot = limiter.admit(f"invented-{i}")
        assert isinstance(slot, DeviceSlot)
        slot.release()
    assert len(limiter) <= 1000
    assert isinstance(held, DeviceSlot)
    assert isinstance(limiter.admit("busy"), DeviceSlot), "a device with an upload in flight is never forgotten"
    assert isinstance(limiter.admit("busy"), Refusal)
    clock.now += LIMITS.burst / (LIMITS.photos_per_minute / 60) + 61  # every bucket full again
    limiter.admit("newcomer")
    assert len(limiter) == 2  # "busy" (in flight) and the newcomer


# -- on the real stack -------------------------------------------------------------------------

FLOODERS = 8
OTHERS = 10


@pytest.fixture(scope="module")
def gateway(site: Site, logs: Path) -> Iterator[ServiceProcess]:
    env = site.env()
    del env["PHOTOFERRY_DEVICE_BURST"]  # the site's defaults, as a gateway runs them
    service = start_service("gateway", env, logs)
    yield service
    stop_cleanly(service)


def _latencies(url: str, devices: list[str], photos_each: int) -> tuple[list[float], list[int]]:
    """Each device uploads its photos one after another, as a camera does; all devices at once."""
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def camera(device: str) -> None:
        client = DeviceClient(url, device, device_token(DEVICE_SECRET, device), backoff=Backoff(base_s=0.2, cap_s=1))
        for _ in range(photos_each):
            started = time.monotonic()
            result = client.upload(Photo(image=jpeg(20_000), captured_at=now_rfc3339()), max_attempts=1)
            with lock:
                latencies.append(time.monotonic() - started)
                statuses.append(result.status)
        client.close()

    threads = [threading.Thread(target=camera, args=(d,)) for d in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return latencies, statuses


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


@pytest.mark.servers
def test_a_device_flooding_on_eight_connections_is_refused_and_the_others_do_not_notice(
    gateway: ServiceProcess, site: Site
) -> None:
    site.drain()
    others = [f"cam-quiet-{i}" for i in range(OTHERS)]
    quiet, _ = _latencies(gateway.url, others, 3)

    answers: Counter[int] = Counter()
    refusals: list[requests.Response] = []
    lock = threading.Lock()
    stop = threading.Event()

    def flood() -> None:
        session = requests.Session()
        while not stop.is_set():
            response = session.post(f"{gateway.url}/v1/photos", data=encode(photo("cam-flood", jpeg(20_000)), "json"),
                                    headers={"Content-Type": "application/json", **auth("cam-flood")}, timeout=30)
            with lock:
                answers[response.status_code] += 1
                if response.status_code == 429 and len(refusals) < 50:
                    refusals.append(response)

    flooders = [threading.Thread(target=flood) for _ in range(FLOODERS)]
    started = time.monotonic()
    for thread in flooders:
        thread.start()
    try:
        wait_until(lambda: sum(answers.values()) >= 300, timeout=60, what="the flood under way")
        loud, loud_statuses = _latencies(gateway.url, others, 3)
        wait_until(lambda: sum(answers.values()) >= 600, timeout=60, what="600 answers to the flood")
    finally:
        stop.set()
        for thread in flooders:
            thread.join(timeout=60)
    elapsed = time.monotonic() - started
    print(f"flooder: {dict(answers)} in {elapsed:.1f} s; others' p90: quiet {_p90(quiet) * 1000:.0f} ms, "
          f"during the flood {_p90(loud) * 1000:.0f} ms")

    total = sum(answers.values())
    assert set(answers) <= {201, 429}, answers
    assert answers[429] > total / 2, f"most of the flood is refused: {answers}"
    # At most its burst and its rate over the flood, and the uploads in flight when it ended.
    assert answers[201] <= LIMITS.burst + LIMITS.photos_per_minute / 60 * elapsed + LIMITS.max_inflight
    for refused in refusals:
        problem = assert_problem(refused, 429)
        assert "photos a minute" in problem["detail"] or "in flight" in problem["detail"], problem
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.headers["Connection"] == "close"
    assert loud_statuses == [201] * len(loud_statuses), "the other devices were accepted at the first attempt"
    assert len(site.drain()) == answers[201] + 2 * 3 * OTHERS, "nothing refused was stored or queued"
    refused_total = sum(metric_value(gateway.url, "photoferry_gateway_device_refusals_total", reason=reason)
                        for reason in ("rate", "in_flight"))
    assert refused_total == answers[429]
    assert metric_value(gateway.url, "photoferry_gateway_uploads_total", outcome="throttled") == answers[429]
    assert metric_value(gateway.url, "photoferry_gateway_throttled_devices") == 1
    warnings = [json.loads(line) for line in gateway.logfile.read_text().splitlines()
                if "a device sends past its limits" in line]
    assert warnings and warnings[0]["device_id"] == "cam-flood", "the operator is told which device"
