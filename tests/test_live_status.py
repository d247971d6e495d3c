"""The operator's figures follow uploads and shipments within seconds, not at the next sweep."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.servers import ServiceProcess, wait_until
from tests.conftest import start_service, stop_cleanly
from tests.helpers import ADMIN_TOKEN, Site, jpeg, photo, upload, upload_many

pytestmark = pytest.mark.servers

OPERATOR = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def env(site: Site) -> dict[str, str]:
    # Sweeps every ten minutes: whatever moves the figures in this module is the live path.
    return site.env(PHOTOFERRY_RECONCILE_EVERY="10m", PHOTOFERRY_SHIP_RATE="10MB")


@pytest.fixture(scope="module")
def services(env: dict[str, str], logs: Path) -> Iterator[dict[str, ServiceProcess]]:
    started = {name: start_service(name, env, logs) for name in ("store", "gateway", "shipper")}
    yield started
    for service in started.values():
        stop_cleanly(service)


def status(keeper: ServiceProcess) -> dict:  # type: ignore[type-arg]
    return requests.get(f"{keeper.url}/api/status", headers=OPERATOR, timeout=10).json()


def test_the_backlog_follows_uploads_and_shipments_within_seconds(services: dict[str, ServiceProcess]) -> None:
    keeper, gateway = services["store"], services["gateway"]
    wait_until(lambda: status(keeper)["swept_at"] is not None, timeout=30, what="the keeper's first sweep")
    swept_at = status(keeper)["swept_at"]
    assert requests.post(f"{keeper.url}/api/shipping/pause", headers=OPERATOR, timeout=10).status_code == 200
    try:
        fields = photo("cam-live", jpeg(40_000))
        first = upload(gateway.url, fields)
        assert first.status_code == 201
        others = upload_many(gateway.url, 5, device="cam-live", size=40_000)
        wait_until(lambda: status(keeper)["backlog_objects"] == 6, timeout=5, what="six photos in the backlog")
        figures = status(keeper)
        assert figures["backlog_bytes"] == 6 * 40_000
        assert figures["oldest_unshipped_age_s"] is not None
        assert figures["text"]["eta_drain"] == "never at current rates"  # paused
        ingest = figures["ingest_photos_per_s"]
        # A device's retry is the same photo: not new ingest, not a second entry in the backlog.
        # The keeper hears messages in order: once the new photo after it counts, so has the retry.
        assert upload(gateway.url, fields).status_code == 200
        others |= upload_many(gateway.url, 1, device="cam-live", size=40_000)
        wait_until(lambda: status(keeper)["backlog_objects"] >= 7, timeout=5, what="the seventh photo")
        again = status(keeper)
        assert again["backlog_objects"] == 7
        assert again["ingest_photos_per_s"] == pytest.approx(ingest + 1 / 60, abs=1e-3)
    finally:
        assert requests.post(f"{keeper.url}/api/shipping/resume", headers=OPERATOR, timeout=10).status_code == 200
    wait_until(lambda: status(keeper)["backlog_objects"] == 0, timeout=20, what="the backlog shipped")
    drained = status(keeper)
    assert drained["backlog_bytes"] == 0 and drained["oldest_unshipped_age_s"] is None
    assert drained["text"]["eta_drain"] == "drained" and drained["text"]["oldest_unshipped_age"] == "nothing waiting"
    assert drained["swept_at"] == swept_at, "a sweep ran: the test proves nothing about the live figures"
    assert len(others) == 6
