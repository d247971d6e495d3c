"""boto3 clients for S3-protocol endpoints: the remote S3, and bucket administration.

boto3 >= 1.36 sends default integrity checksums that some S3-compatible servers
reject; for a non-AWS endpoint they are sent only when an operation requires
them. Path-style addressing is used for such endpoints (MinIO, test servers).
"""

from __future__ import annotations

import logging

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

log = logging.getLogger(__name__)


def s3_client(
    endpoint: str | None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    max_pool_connections: int = 10,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_attempts: int = 3,
    sign_payload: bool = True,
) -> BaseClient:
    """Return an S3 client; without an endpoint it talks to AWS with the standard credential chain.

    ``sign_payload=False`` sends UNSIGNED-PAYLOAD even over plain HTTP, so a streamed
    body is read once, as it is sent (integrity then rests on the checksum header).
    """
    custom = bool(endpoint)
    s3_options: dict[str, object] = {"addressing_style": "path"} if custom else {}
    if not sign_payload:
        s3_options["payload_signing_enabled"] = False
    config = Config(
        region_name=region,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        retries={"mode": "standard", "max_attempts": max_attempts},
        request_checksum_calculation="when_required" if custom else "when_supported",
        response_checksum_validation="when_required" if custom else "when_supported",
        s3=s3_options or None,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint or None,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


def ensure_bucket(client: BaseClient, bucket: str) -> bool:
    """Create ``bucket`` unless it exists; return whether it was created."""
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou",):
            return False
        raise
    log.info("created bucket", extra={"bucket": bucket})
    return True
