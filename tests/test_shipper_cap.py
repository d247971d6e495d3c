"""The egress cap, measured on the wire by a byte-counting proxy in front of the remote S3.

On a backlog: every 1-second window at most 105% of the cap, every 250 ms window
at most 150%, and the whole backlog shipped; for small and for large photos, with
one shipper replica and with two (the cap is global). How close to the cap it
drains is a figure for ``make bench-shipper``, not an assertion on a shared machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.proxy import CountingProxy, mean_rate, peak_rate
from devtools.servers import ServiceProcess, wait_until
from services.common import photos
from services.common.shipping import ShippingControl
from tests.conftest import start_service, stop_cleanly
from tests.helpers import Site, remote_keys, set_control, upload_many

pytestmark = pytest.mark.servers

CAP = 3_000_000  # bytes per second
SMALL = [250_000, 180_000, 320_000]
LARGE = [4_000_000, 9 * 2**20, 6_000_000]  # one above the multipart threshold


@pytest.fixture(scope="module")
def env(site: Site, proxy: CountingProxy) -> dict[str, str]:
    return site.env(PHOTOFERRY_S3_ENDPOINT=proxy.endpoint, PHOTOFERRY_SHIP_RATE=str(CAP))


@pytest.fixture(scope="module")
def gateway(env: dict[str, str], logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("gateway", env, logs)
    yield service
    stop_cleanly(service)


@pytest.fixture(scope="module")
def shippers(env: dict[str, str], logs: Path) -> Iterator[list[ServiceProcess]]:
    started = [start_service("shipper", env, logs) for _ in range(2)]
    yield started
    for service in started:
        stop_cleanly(service)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize(("sizes", "count"), [(SMALL, 90), (LARGE, 5)], ids=["small", "large"])
def test_cap_holds_on_the_wire_and_the_backlog_drains_near_it(
    site: Site, gateway: ServiceProcess, shippers: list[ServiceProcess], proxy: CountingProxy,
    replicas: int, sizes: list[int], count: int,
) -> None:
    running, idle = shippers[:replicas], shippers[replicas:]
    for service in idle:
        service.stop()
    for service in running:
        if service.process is None or service.process.poll() is not None:
            service.start()
    set_control(site, ShippingControl(paused=True))
    wait_until(lambda: all(_state(s) == "paused" for s in running), timeout=15, what="pause")
    expected = upload_many(gateway.url, count, device=f"cam-cap-{replicas}", size=sizes)
    proxy.reset()
    set_control(site, ShippingControl())
    # Watch the local markers, not the remote: listing the remote would load the server measured.
    wanted = {photos.shipped_marker_key(i) for i in expected}
    wait_until(lambda: wanted <= set(site.local_keys(photos.SHIPPED_PREFIX)), timeout=120,
               what="the backlog to drain", interval=0.5)
    assert {"site-test/" + photos.object_key(i) for i in expected} <= set(remote_keys(site))

    buckets = proxy.buckets()
    one_second, quarter = peak_rate(buckets, 1.0), peak_rate(buckets, 0.25)
    drain = mean_rate(buckets, trim_s=1.0)
    report = f"1 s peak {one_second / CAP:.1%}, 250 ms peak {quarter / CAP:.1%}, drain {drain / CAP:.1%} of the cap"
    print(f"{replicas} replica(s), {'small' if sizes is SMALL else 'large'} photos: {report}")
    assert one_second <= 1.05 * CAP, report
    assert quarter <= 1.50 * CAP, report


def _state(service: ServiceProcess) -> str:
    return str(requests.get(f"{service.url}/status", timeout=10).json()["state"])
