"""Slow, stalled and hostile clients hold a slot for a bounded time only; a real device still gets in.

Also: the gateway's admission watch outlives an admission object it cannot read.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import requests

from devtools.servers import ServiceProcess, wait_until
from services.common.admission import ADMISSION_KEY, Admission
from tests.conftest import start_service, stop_cleanly
from tests.helpers import Site, auth, jpeg, metric_value, photo, raw_request_start, upload

pytestmark = pytest.mark.servers

BODY_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def gateway(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = site.env(PHOTOFERRY_BODY_TIMEOUT=f"{BODY_TIMEOUT_S:g}s", PHOTOFERRY_BODY_MIN_RATE="1KB",
                   PHOTOFERRY_IDLE_TIMEOUT=f"{IDLE_TIMEOUT_S:g}s")
    service = start_service("gateway", env, tmp_path_factory.mktemp("logs"))
    yield service
    stop_cleanly(service)


def _head(port: int, length: int, device: str = "cam-slow") -> str:
    return (f"POST /v1/photos HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: {auth(device)['Authorization']}\r\nContent-Length: {length}\r\n\r\n")


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the rest of the answer (headers and body) read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split(b" ", 2)[1]), rest


def _in_flight(gateway: ServiceProcess) -> float:
    return metric_value(gateway.url, "photoferry_gateway_upload_bytes_in_flight")


def test_a_stalled_body_is_cut_with_408_and_its_slot_freed(gateway: ServiceProcess) -> None:
    sock = raw_request_start(gateway.port, _head(gateway.port, 5_000_000), b"{" + b" " * 499)
    try:
        wait_until(lambda: _in_flight(gateway) >= 5_000_000, timeout=5, what="the stalled upload's reservation")
        started = time.monotonic()
        status, body = _response(sock)
        waited = time.monotonic() - started
    finally:
        sock.close()
    assert status == 408
    assert b"application/problem+json" in body.lower() and b"no bytes arrived" in body
    assert waited < BODY_TIMEOUT_S + 2
    wait_until(lambda: _in_flight(gateway) == 0, timeout=5, what="the slot freed")


def test_a_body_that_crawls_below_the_minimum_rate_is_cut(gateway: ServiceProcess) -> None:
    sock = raw_request_start(gateway.port, _head(gateway.port, 100_000))
    started = time.monotonic()
    try:
        sock.settimeout(0.5)
        status = None
        # A byte every quarter second: never silent for long, but 4 bytes/s against 1 KB/s.
        while time.monotonic() - started < 20:
            try:
                sock.sendall(b" ")
                status, body = _response(sock)
                break
            except TimeoutError:
                continue
    finally:
        sock.close()
    assert status == 408, "a crawling body was not cut"
    assert b"slower than" in body
    assert time.monotonic() - started < BODY_TIMEOUT_S + 3


def test_slow_headers_do_not_keep_a_connection_open(gateway: ServiceProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=1)
    started = time.monotonic()
    closed = False
    try:
        sock.sendall(b"POST /v1/photos HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - started < 20 and not closed:
            try:
                sock.sendall(b"X")  # a header name, one byte at a time
                closed = sock.recv(1024) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
    finally:
        sock.close()
    assert closed
    assert time.monotonic() - started < IDLE_TIMEOUT_S + 3


def test_a_hundred_stalled_bodies_do_not_keep_a_real_device_out(gateway: ServiceProcess, site: Site) -> None:
    site.drain()
    stalled = []
    try:
        for i in range(100):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
            sock.sendall(_head(gateway.port, 5_000_000, f"cam-stall-{i}").encode() + b"{" + b" " * 499)
            stalled.append(sock)
        # Each holds room for twice its 5 MB body: some are held, the rest refused at once.
        wait_until(lambda: metric_value(gateway.url, "photoferry_gateway_http_requests_in_flight") >= 10
                   and metric_value(gateway.url, "photoferry_gateway_uploads_total", outcome="unavailable") >= 1,
                   timeout=10, what="the stalled uploads holding the gateway")
        started = time.monotonic()
        fields = photo("cam-real", jpeg(250_000))
        answer = upload(gateway.url, fields)
        while answer.status_code == 503 and time.monotonic() - started < BODY_TIMEOUT_S + 10:
            time.sleep(0.2)  # a device honouring a short Retry-After
            answer = upload(gateway.url, fields)
        assert answer.status_code == 201, answer.text
        assert time.monotonic() - started < BODY_TIMEOUT_S + 5
        rss_kib = int(next(line.split()[1] for line in open(f"/proc/{gateway.process.pid}/status")  # type: ignore[union-attr]
                           if line.startswith("VmRSS:")))
        assert rss_kib < 300 * 1024, f"the gateway holds {rss_kib} KiB"
    finally:
        for sock in stalled:
            sock.close()
    assert len(site.drain()) == 1


def _admission(site: Site, decision: dict[str, object]) -> None:
    import orjson

    site.local_client().put_object(Bucket=site.store_bucket, Key=ADMISSION_KEY, Body=orjson.dumps(decision),
                                   ContentType="application/json")


def test_the_admission_watch_outlives_an_object_it_cannot_read(gateway: ServiceProcess, site: Site) -> None:
    closed = Admission(open=False, reason="test: full", decided_at=datetime.now(UTC).isoformat())
    try:
        _admission(site, closed.__dict__)
        wait_until(lambda: upload(gateway.url, photo("cam-admit")).status_code == 503, timeout=10,
                   what="admission closed")
        # Written by hand, say, or by a newer keeper: the watch must not die on it.
        _admission(site, {**closed.__dict__, "decided_at": "yesterday"})
        wait_until(lambda: upload(gateway.url, photo("cam-admit")).status_code == 201, timeout=15,
                   what="uploads taken again")
        assert requests.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
    finally:
        site.local_client().delete_object(Bucket=site.store_bucket, Key=ADMISSION_KEY)
    site.drain()
