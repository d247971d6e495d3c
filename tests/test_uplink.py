"""The band above the cap on a real bottleneck (devtools/uplink.py): ship on the idle uplink, yield the
moment the farm's bulk upload starts, come back when it stops; nothing lost or shipped twice.

A short version of ``make bench-uplink``: a site with a 1 MB/s cap and a 4.5 MB/s ceiling behind a
5 MB/s uplink, through three phases of a few seconds; each phase's direction is asserted with generous
bounds, measured from the far side of the uplink (what reached S3, what reached the farm's sink).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from devtools.netns import netns_list, netns_pids, run
from devtools.servers import RABBITMQ_SERVER, wait_until
from devtools.uplink import BED_PREFIX, UplinkSite, remove_leftovers, site_on_uplink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the uplink bed needs root: network namespaces and tc")

MB = 1_000_000
FLOOR, CEILING = 1 * MB, 4.5 * MB
SETTLE_S = 2.5  # after the band says what it does: its climb (2.5 s) or the drain of what it had sent
MEASURE_S = 4.0


def egress(buckets: dict[float, int], start: float, end: float) -> float:
    return sum(count for at, count in buckets.items() if start <= at < end) / (end - start)


def phase(rig: UplinkSite, state: str) -> tuple[float, float]:
    """Wait until the shipper says ``state``, let it settle; the span measured after that."""
    wait_until(lambda: rig.shipper_status()["scavenging"] == state, timeout=15, what=f"the band {state}")
    start = time.monotonic() + SETTLE_S
    time.sleep(SETTLE_S + MEASURE_S)  # the span itself, measured afterwards from what crossed the uplink
    return start, start + MEASURE_S


def test_the_band_ships_on_the_idle_uplink_yields_to_the_farm_and_comes_back() -> None:
    assert RABBITMQ_SERVER.exists(), "the rabbitmq-server package is missing (make test installs it)"
    assert shutil.which("tc"), "tc is missing: iproute2 (make test installs it)"
    with site_on_uplink(cap="1MB", settings={"PHOTOFERRY_SHIP_CEILING": "4.5MB"}) as rig:
        made = list(rig.bed.namespaces)
        rig.operator("POST", "/api/shipping/pause")
        ids = rig.fill_backlog(int(1.5 * (SETTLE_S + MEASURE_S + 3) * (2 * CEILING + FLOOR)))
        rig.operator("POST", "/api/shipping/resume")

        idle = phase(rig, "using_idle_uplink")
        rig.farm.start()
        busy = phase(rig, "yielding")
        rig.farm.stop()
        back = phase(rig, "using_idle_uplink")

        shipped, farm = rig.shipper_buckets(), rig.sink.buckets()
        figures = {name: (egress(shipped, *span) / MB, egress(farm, *span) / MB)
                   for name, span in (("idle", idle), ("farm on", busy), ("farm off", back))}
        (idle_ship, _), (busy_ship, busy_farm), (back_ship, _) = figures.values()
        assert idle_ship > 2 * FLOOR / MB, f"the band is not used on an idle uplink (MB/s): {figures}"
        assert busy_ship < 0.6 * idle_ship and busy_ship < 1.6 * FLOOR / MB, f"no yielding to the farm: {figures}"
        assert busy_farm > 0.5 * rig.link_bytes_per_s / MB, f"the farm did not get the uplink: {figures}"
        assert back_ship > 1.5 * busy_ship and back_ship > 2 * FLOOR / MB, f"no coming back: {figures}"
        status = rig.operator("GET", "/api/status")
        assert status["scavenging"]["state"] == "using_idle_uplink", status["scavenging"]

        # Nothing lost, nothing shipped twice: what is marked shipped is in S3, and was uploaded once.
        rig.operator("POST", "/api/shipping/pause")
        wait_until(lambda: rig.shipper_status()["in_flight"] == 0, timeout=30, what="shipments to settle")
        ledger = rig.ledger(ids)
        assert 0 < ledger["in_s3"] == ledger["marked_shipped"] < len(ids), ledger  # shipping, and still a backlog
        assert ledger["marked_but_not_in_s3"] == ledger["in_s3_but_not_marked"] == 0, ledger
        assert ledger["uploaded_twice"] == ledger["uploaded_not_ours"] == 0, ledger
    assert not [name for name in netns_list() if name in made], "the bed left namespaces behind"


def test_what_a_killed_bed_left_is_removed_by_the_next() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id no longer running: a bed that was killed
    namespace = f"{BED_PREFIX}{gone.pid}-site"
    folder = Path(tempfile.gettempdir()) / f"photoferry-uplink-{gone.pid}-left"
    run("ip", "netns", "add", namespace)
    folder.mkdir()
    orphan = subprocess.Popen(["ip", "netns", "exec", namespace, "sleep", "600"], start_new_session=True)
    try:
        wait_until(lambda: orphan.pid in netns_pids(namespace), timeout=10, what="a process in the namespace")
        ours = f"{BED_PREFIX}{os.getpid()}-site"  # a live bed's look-alike is left alone
        run("ip", "netns", "add", ours)
        try:
            removed = remove_leftovers()
            assert namespace in removed and str(folder) in removed
            assert namespace not in netns_list() and ours in netns_list()
            assert not folder.exists()
            assert orphan.wait(timeout=10) != 0  # killed with its namespace
        finally:
            run("ip", "netns", "delete", ours, check=False)
    finally:
        if orphan.poll() is None:
            orphan.kill()
        run("ip", "netns", "delete", namespace, check=False)
        shutil.rmtree(folder, ignore_errors=True)
