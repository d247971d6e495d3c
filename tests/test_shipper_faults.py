"""The remote fails as a whole: the breaker stops shipping, nothing is parked, and it drains after."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import requests

from devtools.proxy import CountingProxy
from devtools.servers import S3Server, ServiceProcess, wait_until
from services.common import photos, topology
from services.common.s3 import ensure_bucket, s3_client
from tests.conftest import start_service, stop_cleanly
from tests.helpers import Site, upload_many

pytestmark = pytest.mark.servers

PREFIX = "site-test/"


@pytest.fixture(scope="module")
def gateway(site: Site, logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("gateway", site.env(), logs)
    yield service
    stop_cleanly(service)


def status(shipper: ServiceProcess) -> dict:  # type: ignore[type-arg]
    return requests.get(f"{shipper.url}/status", timeout=10).json()


def nothing_parked(site: Site) -> bool:
    queue = site.rabbit.management("GET", f"queues/{site.name}/{topology.PARKED_QUEUE}")
    return int(queue.get("messages", 0)) == 0 and site.local_keys(photos.PARKED_PREFIX) == []  # type: ignore[union-attr]


def shipped(client, bucket: str, expected: dict[str, str]) -> bool:  # type: ignore[no-untyped-def]
    for photo_id, sha in expected.items():
        try:
            body = client.get_object(Bucket=bucket, Key=PREFIX + photos.object_key(photo_id))["Body"].read()
        except client.exceptions.NoSuchKey:
            return False
        assert hashlib.sha256(body).hexdigest() == sha
    return True


def test_remote_down_for_a_while_holds_the_backlog_then_drains(
    site: Site, remote_s3: S3Server, gateway: ServiceProcess, logs: Path
) -> None:
    proxy = CountingProxy("127.0.0.1", remote_s3.port).start()
    shipper = start_service("shipper", site.env(PHOTOFERRY_S3_ENDPOINT=proxy.endpoint), logs)
    try:
        proxy.cut()
        expected = upload_many(gateway.url, 8, device="cam-outage", size=80_000)
        wait_until(lambda: status(shipper)["state"] == "breaker_open", timeout=30, what="the breaker to open")
        assert "unreachable" in status(shipper)["breaker_reason"]
        assert nothing_parked(site)

        proxy.restore()
        client = site.remote_client()
        wait_until(lambda: shipped(client, site.remote_bucket, expected), timeout=90, what="the backlog to drain",
                   interval=1)
        assert status(shipper)["state"] == "running"
        assert nothing_parked(site)
    finally:
        stop_cleanly(shipper)
        proxy.stop()


@pytest.fixture
def guarded_s3(tmp_path: Path) -> Iterator[S3Server]:
    """An S3 stand-in that checks credentials (moto with IAM enforced)."""
    server = S3Server(tmp_path / "guarded-s3")
    server.start()
    yield server
    server.stop()


def test_rejected_credentials_open_the_breaker_park_nothing_and_resume_when_fixed(
    site: Site, guarded_s3: S3Server, gateway: ServiceProcess, logs: Path
) -> None:
    endpoint = guarded_s3.endpoint
    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                       region_name="us-east-1")
    allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.create_user(UserName="admin")
    iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(allow_all))
    admin = iam.create_access_key(UserName="admin")["AccessKey"]
    iam.create_user(UserName="shipper")  # no policy yet: S3 answers 403
    key = iam.create_access_key(UserName="shipper")["AccessKey"]
    ensure_bucket(s3_client(endpoint, access_key="setup", secret_key="setup", region="us-east-1"), "guarded")
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                                  headers={"Content-Type": "text/plain"})).close()

    env = site.env(PHOTOFERRY_S3_ENDPOINT=endpoint, PHOTOFERRY_S3_BUCKET="guarded",
                   AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
    shipper = start_service("shipper", env, logs)
    try:
        expected = upload_many(gateway.url, 5, device="cam-denied", size=40_000)
        wait_until(lambda: status(shipper)["state"] == "breaker_open", timeout=30, what="the breaker to open")
        assert "403" in status(shipper)["breaker_reason"] or "AccessDenied" in status(shipper)["breaker_reason"]
        assert nothing_parked(site)

        admin_iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id=admin["AccessKeyId"],
                                 aws_secret_access_key=admin["SecretAccessKey"], region_name="us-east-1")
        admin_iam.put_user_policy(UserName="shipper", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        reader = s3_client(endpoint, access_key=admin["AccessKeyId"], secret_key=admin["SecretAccessKey"],
                           region="us-east-1")
        wait_until(lambda: shipped(reader, "guarded", expected), timeout=120, what="shipping to resume",
                   interval=1)
        assert nothing_parked(site)
    finally:
        stop_cleanly(shipper)


def test_a_link_slower_than_the_cap_is_reported(site: Site, remote_s3: S3Server, gateway: ServiceProcess,
                                                logs: Path) -> None:
    proxy = CountingProxy("127.0.0.1", remote_s3.port).start()
    proxy.set_bandwidth(400_000)  # the cap is ten times that
    shipper = start_service("shipper", site.env(PHOTOFERRY_S3_ENDPOINT=proxy.endpoint,
                                                 PHOTOFERRY_SHIP_RATE="4MB"), logs)
    try:
        # 12 MB: half a minute on this link, long enough for the shipper to learn that more
        # uploads at once do not help (a few 5 s windows).
        expected = upload_many(gateway.url, 40, device="cam-slow-link", size=300_000)
        wait_until(lambda: status(shipper)["link_limited"], timeout=45, what="the slow link to be reported")
        metrics = requests.get(f"{shipper.url}/metrics", timeout=10).text
        assert "photoferry_shipper_link_limited 1.0" in metrics
        proxy.set_bandwidth(None)
        client = site.remote_client()
        wait_until(lambda: shipped(client, site.remote_bucket, expected), timeout=90, what="the backlog to drain")
    finally:
        stop_cleanly(shipper)
        proxy.stop()


def test_sigterm_finishes_or_returns_what_is_in_flight(site: Site, gateway: ServiceProcess, logs: Path) -> None:
    env = site.env(PHOTOFERRY_SHIP_RATE="1MB", PHOTOFERRY_SHUTDOWN_TIMEOUT="20s")
    shipper = start_service("shipper", env, logs)
    expected = upload_many(gateway.url, 4, device="cam-sigterm", size=[400_000, 3_000_000])
    wait_until(lambda: status(shipper)["sent_bytes_total"] > 500_000, timeout=30, what="uploads under way")
    assert shipper.stop() == 0  # SIGTERM: a clean exit
    again = start_service("shipper", env, logs)
    try:
        client = site.remote_client()
        wait_until(lambda: shipped(client, site.remote_bucket, expected), timeout=60, what="everything shipped")
        keys = {k for page in client.get_paginator("list_objects_v2").paginate(Bucket=site.remote_bucket)
                for k in (item["Key"] for item in page.get("Contents", [])) if "cam-sigterm" in k}
        assert len(keys) == len(expected)
        assert nothing_parked(site)
    finally:
        stop_cleanly(again)
