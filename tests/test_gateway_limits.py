"""Size limits checked before work, the in-flight budget, and a graceful stop."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.servers import ServiceProcess, wait_until
from services.common import photos
from services.gateway import upload as upload_module
from tests.conftest import start_service, stop_cleanly
from tests.helpers import (
    FORMATS,
    Site,
    assert_problem,
    auth,
    encode,
    jpeg,
    metric_value,
    photo,
    raw_request_start,
    read_status,
    upload,
)

pytestmark = pytest.mark.servers

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def gateway(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = site.env(PHOTOFERRY_MAX_IMAGE_BYTES="64KiB", PHOTOFERRY_GATEWAY_MAX_INFLIGHT="2")
    service = start_service("gateway", env, tmp_path_factory.mktemp("logs"))
    yield service
    stop_cleanly(service)


def _head(port: int, length: int | None, *, device: str = "cam-limits", chunked: bool = False) -> str:
    lines = [
        "POST /v1/photos HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Authorization: {auth(device)['Authorization']}",
    ]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return "\r\n".join(lines) + "\r\n\r\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_over_the_limit_gets_413(gateway: ServiceProcess, site: Site, fmt: str) -> None:
    site.drain()
    assert upload(gateway.url, photo("cam-big", jpeg(LIMIT)), fmt).status_code == 201
    assert_problem(upload(gateway.url, photo("cam-big", jpeg(LIMIT + 1)), fmt), 413, "limit")
    assert len(site.drain()) == 1


def test_content_length_over_the_limit_is_refused_before_the_body_is_read(gateway: ServiceProcess) -> None:
    port = gateway.port
    # Claim 100 MB but send only the head: an answer proves nothing waited for the body.
    sock = raw_request_start(port, _head(port, 100_000_000))
    try:
        assert read_status(sock) == 413
    finally:
        sock.close()


def test_chunked_body_is_cut_at_the_limit(gateway: ServiceProcess) -> None:
    port = gateway.port
    sock = raw_request_start(port, _head(port, None, chunked=True))
    try:
        chunk = b"x" * 65536
        sent = 0
        # The gateway answers 413 once the body passes its limit; it may close the
        # connection while we are still sending.
        try:
            while sent < 10 * LIMIT:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert read_status(sock) == 413
    finally:
        sock.close()


def test_past_the_inflight_budget_uploads_get_503_at_once(gateway: ServiceProcess, site: Site) -> None:
    site.drain()
    bodies = [encode(photo(f"cam-slow-{i}", jpeg(1000)), "json") for i in range(2)]
    held = [raw_request_start(gateway.port, _head(gateway.port, len(b), device=f"cam-slow-{i}"), b[:10])
            for i, b in enumerate(bodies)]
    try:
        wait_until(
            lambda: metric_value(gateway.url, "photoferry_gateway_http_requests_in_flight") >= 3,
            timeout=10, what="two held uploads in flight",  # the /metrics request is the third
        )
        started = time.monotonic()
        refused = upload(gateway.url, photo("cam-third"))
        assert time.monotonic() - started < 2
        assert_problem(refused, 503, "limit")
        assert refused.headers["Retry-After"].isdigit()
        for sock, body in zip(held, bodies, strict=True):
            sock.sendall(body[10:])
        assert [read_status(sock) for sock in held] == [201, 201]
    finally:
        for sock in held:
            sock.close()
    assert len(site.drain()) == 2


def test_sigterm_lets_an_upload_in_flight_finish(site: Site, tmp_path_factory: pytest.TempPathFactory) -> None:
    service = start_service("gateway", site.env(), tmp_path_factory.mktemp("logs"))
    site.drain()
    fields = photo("cam-shutdown", jpeg(5000))
    body = encode(fields, "json")
    sock = raw_request_start(service.port, _head(service.port, len(body), device="cam-shutdown"), body[:100])
    try:
        wait_until(lambda: metric_value(service.url, "photoferry_gateway_http_requests_in_flight") >= 2,
                   timeout=10, what="the held upload in flight")
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)
        # New connections are refused once the gateway stops listening.
        wait_until(lambda: _refused(service.url), timeout=10, what="the gateway to stop listening")
        sock.sendall(body[100:])
        assert read_status(sock) == 201
    finally:
        sock.close()
    assert service.process.wait(timeout=30) == 0
    messages = site.drain()
    assert [photos.PhotoMessage.from_json(m.body).device_id for m in messages] == ["cam-shutdown"]


def _refused(url: str) -> bool:
    try:
        requests.get(f"{url}/healthz", timeout=1)
    except requests.ConnectionError:
        return True
    return False


def test_an_upload_is_counted_as_the_memory_it_holds_not_its_body(site: Site, logs: Path) -> None:
    # Room for one upload of this body counted as it is held (twice the body, and the request's
    # overhead), not for two: counted as its bare body, two would fit.
    fields = photo("cam-held-0", jpeg(40_000))
    length = len(encode(fields, "json"))
    budget = upload_module.held_bytes(length) + length
    service = start_service("gateway", site.env(PHOTOFERRY_GATEWAY_MAX_INFLIGHT_BYTES=str(budget)), logs)
    site.drain()
    held = raw_request_start(service.port, _head(service.port, length, device="cam-held-0"),
                             encode(fields, "json")[:10])
    try:
        wait_until(lambda: metric_value(service.url, "photoferry_gateway_upload_bytes_in_flight") > 0,
                   timeout=10, what="the held upload in flight")
        in_flight = metric_value(service.url, "photoferry_gateway_upload_bytes_in_flight")
        assert in_flight == upload_module.held_bytes(length)
        second = photo("cam-held-1", jpeg(40_000))
        assert_problem(upload(service.url, second), 503, "limit")
        held.sendall(encode(fields, "json")[10:])
        assert read_status(held) == 201
        assert upload(service.url, second).status_code == 201
    finally:
        held.close()
        stop_cleanly(service)
    assert len(site.drain()) == 2


@pytest.mark.parametrize(("headers", "status"), [
    ({"Content-Type": "application/json"}, 401),
    ({"Content-Type": "text/plain", **auth("cam-closed")}, 415),
], ids=["no token", "unsupported type"])
def test_an_upload_refused_before_its_body_is_read_closes_the_connection(gateway: ServiceProcess,
                                                                         headers: dict[str, str], status: int) -> None:
    # Kept alive, the connection would keep the unread body buffered until the device's next request.
    body = encode(photo("cam-closed", jpeg(60_000)), "json")
    head = (f"POST /v1/photos HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n")
    sock = raw_request_start(gateway.port, head, body)
    sock.settimeout(10)
    try:
        answer = b""
        while chunk := sock.recv(65536):  # ends when the server closes the connection
            answer += chunk
    finally:
        sock.close()
    assert int(answer.split(b" ", 2)[1]) == status
    assert b"connection: close" in answer.lower()
