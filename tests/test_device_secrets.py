"""Secrets without a flag day: the previous device secret and operator token overlap the new ones,
and a device is shut out by the operator's deny list, at every gateway, without a restart."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.servers import ServiceProcess, wait_until
from services.common.tokens import device_token
from tests.conftest import start_service, stop_cleanly
from tests.helpers import ADMIN_TOKEN, DEVICE_SECRET, Site, assert_problem, metric_value, photo, upload

pytestmark = pytest.mark.servers

OLD_SECRET = "the-site-secret-before-2026"
OLD_ADMIN_TOKEN = "the-operator-token-before-2026"


@pytest.fixture(scope="module")
def keeper(site: Site, logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("store", site.env(PHOTOFERRY_ADMIN_TOKEN_PREVIOUS=OLD_ADMIN_TOKEN), logs)
    yield service
    stop_cleanly(service)


@pytest.fixture(scope="module")
def gateway(site: Site, logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("gateway", site.env(PHOTOFERRY_DEVICE_SECRET_PREVIOUS=OLD_SECRET), logs)
    yield service
    stop_cleanly(service)


def _upload_with(url: str, device: str, secret: str) -> requests.Response:
    return upload(url, photo(device), headers={"Authorization": f"Bearer {device_token(secret, device)}"})


def test_tokens_of_the_previous_secret_are_accepted_and_counted_until_it_is_removed(
    gateway: ServiceProcess, site: Site, logs: Path
) -> None:
    before = metric_value(gateway.url, "photoferry_gateway_previous_secret_requests_total")
    moved = _upload_with(gateway.url, "cam-moved", DEVICE_SECRET)
    not_yet = _upload_with(gateway.url, "cam-not-yet", OLD_SECRET)
    assert (moved.status_code, not_yet.status_code) == (201, 201), (moved.text, not_yet.text)
    state = requests.get(f"{gateway.url}/v1/photos/{not_yet.json()['id']}", timeout=10,
                         headers={"Authorization": f"Bearer {device_token(OLD_SECRET, 'cam-not-yet')}"})
    assert state.status_code == 200
    assert metric_value(gateway.url, "photoferry_gateway_previous_secret_requests_total") == before + 2
    assert_problem(_upload_with(gateway.url, "cam-forged", "some-other-secret"), 403, "does not authorise")
    lines = [line for line in gateway.logfile.read_text().splitlines() if '"secret":"previous"' in line]
    assert lines and all("cam-not-yet" in line for line in lines), "the log says which devices still use it"

    removed = start_service("gateway", site.env(), logs)  # the operator removed the previous secret
    try:
        assert_problem(_upload_with(removed.url, "cam-not-yet", OLD_SECRET), 403, "does not authorise")
        assert _upload_with(removed.url, "cam-moved", DEVICE_SECRET).status_code == 201
    finally:
        stop_cleanly(removed)
    site.drain()


def photoferry(keeper: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PHOTOFERRY_STORE_URL": keeper.url, "PHOTOFERRY_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_a_denied_device_is_refused_by_every_gateway_within_seconds_and_allowed_again(
    keeper: ServiceProcess, gateway: ServiceProcess, site: Site
) -> None:
    assert upload(gateway.url, photo("cam-stolen")).status_code == 201
    denied = photoferry(keeper, "deny", "cam-stolen", "--reason", "stolen from pen 4 on 2026-05-01")
    assert denied.returncode == 0, denied.stderr

    def refused() -> bool:
        return upload(gateway.url, photo("cam-stolen")).status_code == 403

    wait_until(refused, timeout=15, what="the gateway refusing the denied device")
    problem = assert_problem(upload(gateway.url, photo("cam-stolen")), 403, "denied", "stolen from pen 4")
    assert "cam-stolen" in problem["detail"]
    assert upload(gateway.url, photo("cam-honest")).status_code == 201, "other devices are not touched"
    assert metric_value(gateway.url, "photoferry_gateway_denied_devices") == 1
    assert metric_value(gateway.url, "photoferry_gateway_denied_requests_total") >= 2
    listed = photoferry(keeper, "denied")
    assert listed.returncode == 0 and "cam-stolen" in listed.stdout and "stolen from pen 4" in listed.stdout

    allowed = photoferry(keeper, "allow", "cam-stolen")
    assert allowed.returncode == 0, allowed.stderr
    wait_until(lambda: upload(gateway.url, photo("cam-stolen")).status_code == 201, timeout=15,
               what="the gateway taking the allowed device again")
    assert photoferry(keeper, "allow", "cam-stolen").returncode == 2, "not on the list any more: said so"
    site.drain()


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/api/devices/denied/cam%2F1", {"reason": "x"}, 400),
    ("/api/devices/denied/cam-1", {"reason": ""}, 400),
    ("/api/devices/denied/cam-1", {"reason": "x" * 201}, 400),
    ("/api/devices/denied/cam-1", {"reason": "x", "until": "tomorrow"}, 400),
    ("/api/devices/denied/cam-1", ["x"], 400),
])
def test_a_bad_deny_request_changes_nothing(keeper: ServiceProcess, path: str, body: object, status: int) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    answer = requests.put(f"{keeper.url}{path}", json=body, headers=headers, timeout=10)
    assert_problem(answer, status)
    listed = requests.get(f"{keeper.url}/api/devices/denied", headers=headers, timeout=10).json()
    assert "cam-1" not in [d["device_id"] for d in listed["denied"]]


def test_the_previous_operator_token_is_accepted_and_counted_until_it_is_removed(
    keeper: ServiceProcess, site: Site, logs: Path
) -> None:
    def status(url: str, token: str) -> int:
        return requests.get(f"{url}/api/status", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code

    before = metric_value(keeper.url, "photoferry_store_previous_admin_token_requests_total")
    assert [status(keeper.url, t) for t in (ADMIN_TOKEN, OLD_ADMIN_TOKEN, "not-a-token")] == [200, 200, 401]
    assert metric_value(keeper.url, "photoferry_store_previous_admin_token_requests_total") == before + 1

    removed = start_service("store", site.env(), logs)
    try:
        assert [status(removed.url, t) for t in (ADMIN_TOKEN, OLD_ADMIN_TOKEN)] == [200, 401]
    finally:
        stop_cleanly(removed)
