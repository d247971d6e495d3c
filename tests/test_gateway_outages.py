"""The broker or the local store away: uploads get 503 with Retry-After, never a 2xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.servers import RabbitNode, S3Server, ServiceProcess, free_port, wait_until
from services.common import photos, topology
from services.common.s3 import ensure_bucket, s3_client
from tests.conftest import start_service, stop_cleanly
from tests.helpers import Site, assert_problem, drain_queue, jpeg, photo, upload

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def own_rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A broker of this module's own, to kill."""
    node = RabbitNode(tmp_path_factory.mktemp("rabbit-outage"))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def own_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A local store of this module's own, to stop."""
    server = S3Server(tmp_path_factory.mktemp("store-outage"))
    server.start()
    yield server
    server.stop()


def _bucket(store: S3Server, site: Site) -> None:
    ensure_bucket(s3_client(store.endpoint, access_key=store.access_key, secret_key=store.secret_key,
                            region="us-east-1"), site.store_bucket)


@pytest.fixture(scope="module")
def gateway(site: Site, own_rabbit: RabbitNode, own_store: S3Server,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    _bucket(own_store, site)
    env = site.env(PHOTOFERRY_AMQP_URL=own_rabbit.url, PHOTOFERRY_STORE_ENDPOINT=own_store.endpoint,
                   PHOTOFERRY_PUBLISH_TIMEOUT="3s", PHOTOFERRY_STORE_TIMEOUT="3s")
    service = start_service("gateway", env, tmp_path_factory.mktemp("logs"))
    yield service
    stop_cleanly(service)


def test_broker_down_gives_503_then_recovers(gateway: ServiceProcess, own_rabbit: RabbitNode) -> None:
    assert upload(gateway.url, photo("cam-outage")).status_code == 201
    for queue in (topology.FRESH_QUEUE, topology.SHIP_QUEUE):
        drain_queue(own_rabbit.url, queue)

    own_rabbit.kill()
    statuses = []

    def refused() -> bool:
        response = upload(gateway.url, photo("cam-outage"))
        statuses.append(response.status_code)
        return response.status_code == 503

    wait_until(refused, timeout=20, what="503 while the broker is down")
    response = upload(gateway.url, photo("cam-outage"))
    assert_problem(response, 503, "broker")
    assert int(response.headers["Retry-After"]) > 0
    assert not [s for s in statuses if 200 <= s < 300], statuses
    ready = requests.get(f"{gateway.url}/readyz", timeout=10)
    assert_problem(ready, 503, "broker")
    assert ready.json()["checks"]["broker"] != "ok"

    own_rabbit.start()
    accepted = []

    def accepted_again() -> bool:
        fields = photo("cam-outage")
        response = upload(gateway.url, fields)
        if response.status_code == 201:
            accepted.append(response.json()["id"])
        return response.status_code == 201

    wait_until(accepted_again, timeout=60, what="uploads accepted after the broker is back", interval=0.5)
    # The broker's durable queue holds what was confirmed: the photo accepted last.
    queued = [photos.PhotoMessage.from_json(m.body).id
              for queue in (topology.FRESH_QUEUE, topology.SHIP_QUEUE) for m in drain_queue(own_rabbit.url, queue)]
    assert accepted[-1] in queued


def test_store_down_gives_503_then_recovers(gateway: ServiceProcess, own_store: S3Server, site: Site) -> None:
    own_store.kill()
    response = upload(gateway.url, photo("cam-store", jpeg()))
    assert_problem(response, 503, "store")
    assert int(response.headers["Retry-After"]) > 0
    ready = requests.get(f"{gateway.url}/readyz", timeout=10)
    assert_problem(ready, 503, "store")

    own_store.start()
    _bucket(own_store, site)  # moto keeps nothing across a restart
    wait_until(lambda: upload(gateway.url, photo("cam-store")).status_code == 201,
               timeout=20, what="uploads accepted after the store is back")


def test_gateway_starts_without_a_broker_and_says_so(site: Site, tmp_path: Path) -> None:
    port = free_port()
    dead = f"amqp://photoferry:photoferry@127.0.0.1:{free_port()}/"
    service = ServiceProcess("gateway", site.env(PHOTOFERRY_AMQP_URL=dead, PHOTOFERRY_GATEWAY_PORT=str(port)),
                             port=port, logfile=tmp_path / "gateway.log")
    service.start(wait="alive")
    try:
        ready = requests.get(f"{service.url}/readyz", timeout=10)
        assert_problem(ready, 503, "broker")
        assert_problem(upload(service.url, photo("cam-early")), 503, "broker")
    finally:
        service.stop()
