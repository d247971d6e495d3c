"""Check that accepted photos arrived in the remote bucket, byte-identical.

S3 verifies a single-part upload against its ``ChecksumSHA256`` and the shipper
stores the photo's SHA-256 in the object's metadata, so a ``HEAD`` tells what
bytes an object holds without fetching them; ``full=True`` fetches and hashes
every object instead.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from botocore.client import BaseClient

from services.common import photos


@dataclass
class Arrival:
    arrived: dict[str, str] = field(default_factory=dict)  # photo id -> sha256 found
    missing: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)  # present, with other bytes than the device sent
    unexpected: list[str] = field(default_factory=list)  # objects under the prefix no accepted photo explains


def remote_sha256(client: BaseClient, bucket: str, key: str, *, full: bool) -> str:
    if full:
        return hashlib.sha256(client.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()
    head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    metadata = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
    if "sha256" in metadata:
        return str(metadata["sha256"])
    checksum = head.get("ChecksumSHA256") or ""
    return base64.b64decode(checksum).hex() if checksum and "-" not in checksum else ""


def listed_keys(client: BaseClient, bucket: str, prefix: str) -> set[str]:
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


def check_arrivals(client: BaseClient, bucket: str, prefix: str, expected: dict[str, str], *,
                   timeout_s: float, full: bool = False, poll_s: float = 2.0,
                   progress: Callable[[int, int], None] | None = None) -> Arrival:
    """Wait (up to ``timeout_s``) until every expected photo (id -> sha256) is in the bucket; check each."""
    arrival = Arrival()
    deadline = time.monotonic() + timeout_s
    waiting = dict(expected)
    while True:
        keys = listed_keys(client, bucket, prefix + photos.PHOTOS_PREFIX)
        for photo_id in [i for i in waiting if prefix + photos.object_key(i) in keys]:
            arrival.arrived[photo_id] = remote_sha256(client, bucket, prefix + photos.object_key(photo_id), full=full)
            if arrival.arrived[photo_id] != waiting.pop(photo_id):
                arrival.different.append(photo_id)
        if progress is not None:
            progress(len(arrival.arrived), len(expected))
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    arrival.missing = sorted(waiting)
    known = {prefix + photos.object_key(i) for i in expected}
    arrival.unexpected = sorted(keys - known)
    return arrival


def expected_of(accepted: Iterable[dict[str, str]]) -> dict[str, str]:
    """The ``photos`` of a fleet report as id -> sha256."""
    return {p["id"]: p["sha256"] for p in accepted}
