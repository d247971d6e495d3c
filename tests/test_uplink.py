"""The band above the cap on a real bottleneck (devtools/uplink.py): ship on the idle uplink, yield the
moment the farm's bulk upload starts, come back when it stops; nothing lost or shipped twice.

A short version of ``make bench-uplink``: a site with a 1 MB/s cap and a 4.5 MB/s ceiling behind a
5 MB/s uplink, through three phases of a few seconds; each phase's direction is asserted with generous
bounds, measured from the far side of the uplink (what reached S3, what reached the farm's sink).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from devtools.netns import netns_list, netns_pids, run
from devtools.servers import RABBITMQ_SERVER, wait_until
from devtools.site import PREFIX, REMOTE_BUCKET
from devtools.uplink import PREFIX as BED_PREFIX
from devtools.uplink import UplinkSite, remove_leftovers, site_on_uplink
from services.common import photos

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the uplink bed needs root: network namespaces and tc"),
    pytest.mark.skipif(shutil.which("tc") is None, reason="needs iproute2 (make test installs it)"),
]

MB = 1_000_000
FLOOR, CEILING = 1 * MB, 4.5 * MB
PHASE_S = 8.0


def egress(buckets: dict[float, int], start: float, end: float) -> float:
    return sum(count for at, count in buckets.items() if start <= at < end) / (end - start)


def phase(rig: UplinkSite, state: str) -> tuple[float, float]:
    """Run a phase, watching the shipper reach ``state``; the second half, when it has settled."""
    start = time.monotonic()
    wait_until(lambda: rig.shipper_status()["scavenging"] == state, timeout=PHASE_S, what=f"the band {state}")
    time.sleep(max(0.0, start + PHASE_S - time.monotonic()))  # the phase's length, whatever came first
    return start + PHASE_S / 2, start + PHASE_S


def shipped_markers(rig: UplinkSite) -> set[str]:
    async def listed() -> set[str]:
        return {item["path"] async for page in rig.site.local_store().list(photos.SHIPPED_PREFIX) for item in page}

    return asyncio.run(listed())


@pytest.mark.skipif(not RABBITMQ_SERVER.exists(), reason="needs the rabbitmq-server package (make test installs it)")
def test_the_band_ships_on_the_idle_uplink_yields_to_the_farm_and_comes_back() -> None:
    with site_on_uplink(cap="1MB", settings={"PHOTOFERRY_SHIP_CEILING": "4.5MB"}) as rig:
        made = list(rig.bed.namespaces)
        rig.operator("POST", "/api/shipping/pause")
        ids = rig.fill_backlog(int(1.3 * PHASE_S * (2 * CEILING + FLOOR)))
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
        in_s3 = {item["Key"].removeprefix(PREFIX) for page in rig.site.remote_client().get_paginator(
            "list_objects_v2").paginate(Bucket=REMOTE_BUCKET, Prefix=PREFIX + photos.PHOTOS_PREFIX)
            for item in page.get("Contents", [])}
        markers = shipped_markers(rig)
        marked = {photos.object_key(photo_id) for photo_id in ids if photos.shipped_marker_key(photo_id) in markers}
        assert marked == in_s3 and len(in_s3) > 0.5 * len(ids)
        uploads = rig.site.uploads_per_photo()
        assert set(uploads) <= set(ids) and max(uploads.values()) == 1
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
