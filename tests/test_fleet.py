"""The fleet simulator against the real stack: its figures add up, and every accepted photo arrives."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from devtools.servers import ServiceProcess
from services.devices.fleet import Fleet, FleetPlan
from services.devices.jpegs import JpegMaker
from services.devices.verify import check_arrivals, expected_of
from tests.conftest import start_service, stop_cleanly
from tests.helpers import DEVICE_SECRET, Site

pytestmark = pytest.mark.servers

PREFIX = "site-test/"


@pytest.fixture(scope="module")
def env(site: Site) -> dict[str, str]:
    return site.env(PHOTOFERRY_SHIP_RATE="20MB", PHOTOFERRY_GATEWAY_MAX_INFLIGHT="4", PHOTOFERRY_RETRY_AFTER="1")


@pytest.fixture(scope="module")
def gateway(env: dict[str, str], logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("gateway", env, logs)
    yield service
    stop_cleanly(service)


@pytest.fixture(scope="module")
def shipper(env: dict[str, str], logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("shipper", env, logs)
    yield service
    stop_cleanly(service)


def test_photos_are_real_distinct_jpegs_of_the_asked_mean_size() -> None:
    maker = JpegMaker(100_000)
    images = [maker.make() for _ in range(400)]
    assert len(set(images)) == len(images)
    assert 85_000 < sum(map(len, images)) / len(images) < 115_000
    assert max(map(len, images)) > 250_000  # a few several times larger
    for image in images[:20]:
        Image.open(io.BytesIO(image)).load()  # decodes: a JPEG, not bytes that start like one


def test_a_steady_fleet_is_accepted_and_arrives_byte_identical(gateway: ServiceProcess, shipper: ServiceProcess,
                                                               site: Site) -> None:
    plan = FleetPlan(gateway=gateway.url, devices=20, per_minute=30, duration_s=4, size=30_000, fmt="mixed",
                     seed=7, device_prefix="steady")
    report = Fleet(plan, secret=DEVICE_SECRET).run()
    assert report["sent"] == 20 * 2  # 30 a minute for 4 s: two each
    assert report["accepted"] == report["sent"] and report["failed"] == 0
    assert sum(report["statuses"].values()) == report["sent"] + report["retries"]
    assert len({p["id"] for p in report["photos"]}) == report["accepted"]
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    arrival = check_arrivals(site.remote_client(), site.remote_bucket, PREFIX, expected_of(report["photos"]),
                             timeout_s=60, full=True)
    assert (arrival.missing, arrival.different) == ([], [])


def test_a_burst_is_deferred_then_accepted_in_full(gateway: ServiceProcess, site: Site) -> None:
    plan = FleetPlan(gateway=gateway.url, devices=40, per_minute=1, duration_s=0, size=100_000, burst=True,
                     max_backoff_s=2, device_prefix="burst")
    report = Fleet(plan, secret=DEVICE_SECRET).run()
    assert report["sent"] == report["accepted"] == 40 and report["failed"] == 0
    assert report["statuses"].get("503", 0) > 0, "nothing was deferred: the gateway's limit was not met"
    assert report["retries"] == report["statuses"]["503"]


def test_the_command_writes_its_report_and_verifies_the_remote(gateway: ServiceProcess, shipper: ServiceProcess,
                                                               site: Site, env: dict[str, str],
                                                               tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    command = [sys.executable, "-m", "services.cli", "fleet", "--gateway", gateway.url, "--devices", "5",
               "--per-minute", "60", "--duration", "3s", "--size", "20KB", "--report", str(report_file),
               "--verify", "--verify-timeout", "60s"]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert {"sent", "accepted", "duplicates", "retries", "failed", "statuses", "latency_ms", "duration_s",
            "photos"} <= set(report)
    assert report["accepted"] == report["sent"] == 15
    assert "verified: 15 of 15" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "services.cli", "fleet", "--size", "huge"],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "size" in bad.stderr
