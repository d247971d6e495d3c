"""Size limits checked before work, the in-flight budget, and a graceful stop."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import requests

from devtools.servers import ServiceProcess, wait_until
from services.common import photos
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
