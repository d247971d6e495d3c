"""A resource alarm on the broker: it blocks every connection that publishes, and the site keeps going.

While the alarm is on, RabbitMQ takes no new message: the gateway must say so at
once (503 and Retry-After), operators must still be answered, and the shipper
must keep draining what is queued, since it acknowledges on a connection that
never publishes. After the alarm nothing is lost, duplicated or parked.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.servers import ServiceProcess, wait_until
from services.common import photos, topology
from services.common.shipping import ShippingControl
from tests.conftest import start_service, stop_cleanly
from tests.helpers import (
    ADMIN_TOKEN,
    Site,
    assert_problem,
    jpeg,
    metric_value,
    photo,
    remote_keys,
    set_control,
    upload,
    upload_many,
)

pytestmark = pytest.mark.servers

CAP = 1_000_000
PHOTOS, SIZE = 40, 100_000  # four seconds of the cap


@pytest.fixture(scope="module")
def env(site: Site) -> dict[str, str]:
    return site.env(PHOTOFERRY_SHIP_RATE=str(CAP))


@pytest.fixture(scope="module")
def services(env: dict[str, str], logs: Path) -> Iterator[dict[str, ServiceProcess]]:
    started = {name: start_service(name, env, logs) for name in ("gateway", "shipper", "store")}
    yield started
    for service in started.values():
        stop_cleanly(service)


@contextlib.contextmanager
def disk_alarm(site: Site) -> Iterator[None]:
    """The broker's disk alarm on for the duration (cleared again whatever happens)."""
    site.rabbit.set_disk_alarm(True)
    try:
        wait_until(site.rabbit.disk_alarm, timeout=30, what="the broker's disk alarm")
        yield
    finally:
        site.rabbit.set_disk_alarm(False)
        wait_until(lambda: not site.rabbit.disk_alarm(), timeout=30, what="the alarm cleared")


def test_under_a_disk_alarm_shipping_drains_devices_are_told_and_operators_answered(
    site: Site, services: dict[str, ServiceProcess]
) -> None:
    gateway, shipper, store = services["gateway"], services["shipper"], services["store"]
    set_control(site, ShippingControl(paused=True))
    queued = upload_many(gateway.url, PHOTOS, device="cam-alarm", size=SIZE)
    wait_until(lambda: site.shipping_messages("messages_ready") == PHOTOS, timeout=20, what="photos queued")
    late = photo("cam-alarm-late", jpeg(SIZE))

    with disk_alarm(site):
        # A device is told at once that nothing can be queued now, and when to come back.
        started = time.monotonic()
        refused = upload(gateway.url, late)
        assert time.monotonic() - started < 3, "the gateway waited for a confirm that cannot come"
        assert_problem(refused, 503, "broker")
        assert int(refused.headers["Retry-After"]) >= 1

        # An operator is answered promptly (the shippers read the settings from the store).
        started = time.monotonic()
        resumed = requests.post(f"{store.url}/api/shipping/resume",
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        assert resumed.status_code == 200, resumed.text
        assert time.monotonic() - started < 3, "the operator's request waited on the blocked broker"

        # The shipper drains the queue though the broker takes no new message (four seconds at the cap).
        wanted = {photos.shipped_marker_key(i) for i in queued}
        wait_until(lambda: wanted <= set(site.local_keys(photos.SHIPPED_PREFIX)), timeout=30,
                   what="the queued photos shipped during the alarm", interval=0.5)
        assert site.rabbit.disk_alarm()
        assert metric_value(shipper.url, "photoferry_shipper_publishing_blocked") == 1

    # The refused device comes back: the gateway takes photos again once the alarm is gone.
    wait_until(lambda: upload(gateway.url, late).status_code in (200, 201), timeout=30,
               what="the gateway taking photos again")
    # Nothing lost, duplicated or parked.
    wait_until(lambda: site.shipping_messages() == 0, timeout=60, what="both shipping queues empty")
    assert site.queue_figure(topology.PARKED_QUEUE) == 0
    assert site.local_keys(photos.PARKED_PREFIX) == []
    remote = [k for k in remote_keys(site) if "cam-alarm" in k]
    assert len(remote) == len(set(remote)) == PHOTOS + 1
    wait_until(lambda: metric_value(shipper.url, "photoferry_shipper_publishing_blocked") == 0, timeout=10,
               what="the shipper publishing again")
