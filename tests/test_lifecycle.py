"""A k3s site's lifecycle: services started before their dependencies, and stopped during an outage.

The broker and the local store of this module are its own: both start *after*
the services (the store empty, without a bucket), and the broker is then killed
while the services run. Every service must get ready by itself, ship a photo,
and stop promptly on SIGTERM with the broker gone.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.servers import RabbitNode, S3Server, ServiceProcess, free_port, wait_until
from services.common import photos
from services.common.s3 import ensure_bucket
from tests.conftest import start_service
from tests.helpers import Site, metric_value, upload_many

pytestmark = pytest.mark.servers

SHUTDOWN_TIMEOUT_S = 5
SERVICES = ("gateway", "store", "shipper")


@pytest.fixture(scope="module")
def late(tmp_path_factory: pytest.TempPathFactory, remote_s3: S3Server) -> Iterator[Site]:
    """A site whose broker and local store exist only on paper until a test starts them."""
    workdir = tmp_path_factory.mktemp("late")
    rabbit = RabbitNode(workdir / "rabbitmq", amqp_port=free_port())
    store = S3Server(workdir / "store", port=free_port())
    site = Site(name="late", rabbit=rabbit, amqp_url=rabbit.url, local=store, remote=remote_s3,
                store_bucket="late-store", remote_bucket="late-remote")
    ensure_bucket(site.remote_client(), site.remote_bucket)
    yield site
    rabbit.stop()
    store.stop()


def _readyz(service: ServiceProcess) -> requests.Response:
    return requests.get(f"{service.url}/readyz", timeout=5)


def test_started_before_broker_and_store_then_ready_and_shipping(late: Site, logs: Path) -> None:
    env = late.env(PHOTOFERRY_SHUTDOWN_TIMEOUT=f"{SHUTDOWN_TIMEOUT_S}s", PHOTOFERRY_RECONCILE_EVERY="5s",
                   PHOTOFERRY_STORE_TIMEOUT="2s")
    services: dict[str, ServiceProcess] = {}
    try:
        for name in SERVICES:
            port = free_port()
            services[name] = ServiceProcess(name, {**env, f"PHOTOFERRY_{name.upper()}_PORT": str(port)},
                                            port=port, logfile=logs / f"late-{name}.log")
            services[name].start(wait="alive")
        # Alive, not ready, and saying what is missing.
        answer = _readyz(services["gateway"])
        assert answer.status_code == 503
        assert set(answer.json()["checks"]) == {"broker", "store"}
        assert answer.json()["checks"]["broker"] == "connecting"

        late.local.start()  # empty: no bucket; the store keeper creates it
        late.rabbit.start()
        for service in services.values():
            wait_until(service.ready, timeout=90, what=f"{service.name} ready after its dependencies came up")
        shipped = upload_many(services["gateway"].url, 3, device="cam-late", size=30_000)
        remote = late.remote_client()

        def in_remote() -> bool:
            keys = {item["Key"] for item in remote.list_objects_v2(Bucket=late.remote_bucket).get("Contents", [])}
            return all(f"site-test/{photos.object_key(i)}" in keys for i in shipped)

        wait_until(in_remote, timeout=60, what="the photos in S3")
        for service in services.values():
            assert requests.get(f"{service.url}/healthz", timeout=5).status_code == 200
    finally:
        for service in services.values():
            service.stop()


def test_sigterm_during_a_broker_outage_stops_every_service_promptly(late: Site, logs: Path) -> None:
    env = late.env(PHOTOFERRY_SHUTDOWN_TIMEOUT=f"{SHUTDOWN_TIMEOUT_S}s", PHOTOFERRY_STORE_TIMEOUT="2s")
    if late.rabbit.process is None or late.rabbit.process.poll() is not None:
        late.rabbit.start()
    if late.local.process is None or late.local.process.poll() is not None:
        late.local.start()
    ensure_bucket(late.local_client(), late.store_bucket)
    services = [start_service(name, env, logs) for name in SERVICES]
    try:
        late.rabbit.kill()
        wait_until(lambda: all(_readyz(s).status_code == 503 for s in services), timeout=30,
                   what="every service noticing the broker is gone")
        for service in services:
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for service in services:
            assert service.process is not None
            code = service.process.wait(timeout=SHUTDOWN_TIMEOUT_S + 30)
            took = time.monotonic() - started
            assert code == 0, f"{service.name} exited with {code}:\n{service.log_tail()}"
            assert took < SHUTDOWN_TIMEOUT_S + 8, f"{service.name} took {took:.1f} s to stop:\n{service.log_tail()}"
    finally:
        for service in services:
            service.kill()


def test_a_broker_still_starting_is_no_cause_for_warnings(site: Site, logs: Path) -> None:
    """`make up` and a k3s site start the services with the broker: its first seconds are not an outage."""
    env = site.env(PHOTOFERRY_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",  # nobody there yet
                   PHOTOFERRY_RECONCILE_EVERY="1s")
    port = free_port()
    keeper = ServiceProcess("store", {**env, "PHOTOFERRY_STORE_PORT": str(port)}, port=port,
                            logfile=logs / "starting-broker-store.log")
    keeper.start(wait="alive")
    try:
        wait_until(lambda: metric_value(keeper.url, "photoferry_store_sweep_seconds_count") >= 2, timeout=20,
                   what="two sweeps while the broker is still coming up")
        # Every line is a log record with a level (a changed format fails here, not silently below).
        records = [json.loads(line) for line in keeper.logfile.read_text().splitlines() if line.strip()]
        assert records and all("level" in record for record in records)
        warnings = [record for record in records if record["level"] not in ("debug", "info")]
        assert not warnings, warnings
    finally:
        keeper.kill()
