"""The site's local store: MinIO (or any S3-protocol store) through obstore, or the embedded store.

The endpoint's scheme chooses: ``http://``/``https://`` is an S3-protocol store,
``file:///path`` the embedded store (``services/common/filestore.py``: objects as
files under that directory, for a one-node site). Both keep the same contract:
atomic create-if-absent, metadata with every photo, listings in key order,
markers, deletes, and the bucket's provisioning.

obstore (Rust's ``object_store``) is asynchronous, signs and hashes in native
code, and has an atomic create-if-absent put (``If-None-Match: *``), which makes a
device's retry race-free in one round trip. Measured on the gateway's path it
costs about a third of the CPU of a threaded minio-py client.

The store is configured explicitly: the credential provider keeps the ``AWS_*``
credentials meant for the remote S3 (obstore would otherwise pick them up from
the environment) away from the local store.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import obstore
from botocore.exceptions import BotoCoreError, ClientError
from obstore.exceptions import AlreadyExistsError, BaseError
from obstore.store import S3Store
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common.config import StoreSettings
from services.common.errors import DependencyUnavailable
from services.common.filestore import DiskFigures, FileMeta, FileObjects
from services.common.s3 import ensure_bucket, s3_client

T = TypeVar("T")

log = logging.getLogger(__name__)
tracer = trace.get_tracer("photoferry.localstore")


class StoreUnavailable(DependencyUnavailable):
    """The local store cannot be reached or refused the request."""


# obstore raises its own errors, and builtin FileNotFoundError for a missing
# object (or bucket) and OSError subclasses for some transport failures; the
# embedded store raises OSError (a full disk, permissions), boto3 its own.
_FAILURES = (BaseError, OSError, ClientError, BotoCoreError)


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    last_modified: datetime
    content_type: str
    metadata: dict[str, str]


class _StaticCredentials:
    def __init__(self, access_key: str, secret_key: str) -> None:
        self._credentials = {
            "access_key_id": access_key,
            "secret_access_key": secret_key,
            "token": None,
            "expires_at": None,
        }

    def __call__(self) -> dict[str, Any]:
        return self._credentials


class LocalStore:
    """Photo objects and marker objects in one bucket of the local store."""

    def __init__(self, settings: StoreSettings) -> None:
        self.bucket = settings.bucket
        self.endpoint = settings.endpoint
        self._settings = settings
        self._timeout = settings.timeout
        endpoint = urllib.parse.urlsplit(settings.endpoint)
        self._files: FileObjects | None = None
        self._admin: Any = None
        if endpoint.scheme == "file":
            self.kind = "file"
            self._host, self._port = "localhost", 0
            self._files = FileObjects(Path(urllib.parse.unquote(endpoint.path)) / settings.bucket)
            return
        self.kind = "s3"
        self._host = endpoint.hostname or ""
        self._port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        self._store = S3Store(
            settings.bucket,
            endpoint=settings.endpoint,
            region=settings.region,
            credential_provider=_StaticCredentials(settings.access_key, settings.secret_key),
            virtual_hosted_style_request=False,
            # The store verifies the SHA-256 header, so the payload itself need
            # not be hashed a second time for the signature.
            checksum_algorithm="SHA256",
            unsigned_payload=True,
            client_options={
                "allow_http": settings.endpoint.startswith("http://"),
                "connect_timeout": timedelta(seconds=min(2.0, settings.timeout)),
                "timeout": timedelta(seconds=settings.timeout),
            },
            retry_config={
                "max_retries": 2,
                "retry_timeout": timedelta(seconds=settings.timeout),
                "backoff": {
                    "init_backoff": timedelta(milliseconds=50),
                    "max_backoff": timedelta(seconds=1),
                    "base": 2,
                },
            },
        )

    @contextlib.contextmanager
    def _span(self, operation: str, key: str) -> Iterator[None]:
        """A client span per request, named and attributed as the AWS SDK instrumentation names S3's."""
        with tracer.start_as_current_span(
            f"S3.{operation}", kind=SpanKind.CLIENT, record_exception=False, set_status_on_exception=False,
            attributes={"rpc.system": "aws-api", "rpc.service": "S3", "rpc.method": operation,
                        "aws.s3.bucket": self.bucket, "aws.s3.key": key, "server.address": self._host,
                        "server.port": self._port},
        ) as span:
            try:
                yield
            except FileNotFoundError:
                span.set_attribute("http.response.status_code", 404)  # an answer, not a failure
                raise
            except AlreadyExistsError:
                span.set_attribute("http.response.status_code", 412)
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise

    def _unavailable(self, action: str, key: str, exc: Exception) -> StoreUnavailable:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StoreUnavailable(f"local store {self.endpoint} could not {action} {key}: {first_line}")

    async def _blocking(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call (the embedded store's, boto3's) in a thread, under the store's timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.to_thread(call, *args, **kwargs)
        except TimeoutError:
            raise TimeoutError(f"no answer within {self._timeout:g} s") from None

    async def create(
        self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]
    ) -> bool:
        """Store ``data`` at ``key`` unless something is there; return whether it was created."""
        try:
            with self._span("PutObject", key):
                if self._files is not None:
                    return await self._blocking(self._files.create, key, data, content_type=content_type,
                                               metadata=metadata)
                await obstore.put_async(
                    self._store,
                    key,
                    data,
                    mode="create",
                    attributes={"Content-Type": content_type, **metadata},
                )
        except AlreadyExistsError:
            return False
        except FileNotFoundError as exc:
            # A put only meets "not found" when the bucket itself is missing.
            raise self._unavailable("write (bucket missing?)", key, exc) from None
        except (*_FAILURES, TimeoutError) as exc:
            raise self._unavailable("write", key, exc) from None
        return True

    async def put(self, key: str, data: bytes, *, metadata: dict[str, str]) -> None:
        """Write ``data`` at ``key``, replacing what is there (for markers)."""
        try:
            with self._span("PutObject", key):
                if self._files is not None:
                    await self._blocking(self._files.put, key, data, metadata=metadata)
                else:
                    await obstore.put_async(self._store, key, data, attributes=metadata)
        except (*_FAILURES, TimeoutError) as exc:
            raise self._unavailable("write", key, exc) from None

    async def stat(self, key: str) -> StoredObject | None:
        """Return an object's size, time and metadata, or None when it does not exist."""
        try:
            with self._span("HeadObject", key):
                if self._files is not None:
                    return _from_file(key, await self._blocking(self._files.stat, key))
                result = await obstore.get_async(self._store, key, options={"head": True})
        except FileNotFoundError:
            return None
        except (*_FAILURES, TimeoutError) as exc:
            raise self._unavailable("read", key, exc) from None
        return _described(key, result)

    def read_with_metadata(self, key: str) -> tuple[bytes, StoredObject] | None:
        """Read a whole object and what is known of it, or None when it does not exist.

        Blocking (obstore's own runtime, or the file system, does the I/O): for worker
        threads, such as the shipper's uploads.
        """
        try:
            with self._span("GetObject", key):
                if self._files is not None:
                    data, meta = self._files.read(key)
                    return data, _from_file(key, meta)
                result = obstore.get(self._store, key)
                data = bytes(result.bytes())
        except FileNotFoundError:
            return None
        except _FAILURES as exc:
            raise self._unavailable("read", key, exc) from None
        return data, _described(key, result)

    async def exists(self, key: str) -> bool:
        return await self.stat(key) is not None

    async def read(self, key: str) -> bytes | None:
        """Return a (small) object's bytes, or None when it does not exist."""
        try:
            with self._span("GetObject", key):
                if self._files is not None:
                    data, _ = await self._blocking(self._files.read, key)
                    return data
                result = await obstore.get_async(self._store, key)
                return bytes(await result.bytes_async())
        except FileNotFoundError:
            return None
        except (*_FAILURES, TimeoutError) as exc:
            raise self._unavailable("read", key, exc) from None

    async def delete(self, key: str) -> None:
        await self.delete_many([key])

    async def delete_many(self, keys: list[str]) -> None:
        """Delete several objects (in one request per 1,000 on S3); missing ones are no error."""
        if not keys:
            return
        try:
            if self._files is not None:
                files = self._files
                await self._blocking(lambda: [files.delete(key) for key in keys])
            else:
                await obstore.delete_async(self._store, keys if len(keys) > 1 else keys[0])
        except FileNotFoundError:
            pass
        except (*_FAILURES, TimeoutError) as exc:
            raise self._unavailable("delete", f"{len(keys)} objects", exc) from None

    async def list(self, prefix: str, *, chunk_size: int = 1000) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield the objects under ``prefix`` (whole path segments, as obstore takes it) in key order,
        a page at a time."""
        try:
            if self._files is not None:
                listing = self._files.listing(prefix)
                while page := await self._blocking(lambda: list(itertools.islice(listing, chunk_size))):
                    yield page
                return
            async for page in obstore.list(self._store, prefix=prefix, chunk_size=chunk_size):
                yield page
        except (*_FAILURES, TimeoutError) as exc:
            raise self._unavailable("list", prefix, exc) from None

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the bucket answers a (one-request) listing."""
        try:
            if self._files is not None:
                await self._blocking(self._files.check)
            else:
                await obstore.list_with_delimiter_async(self._store, prefix="ping/")
        except (*_FAILURES, TimeoutError) as exc:
            raise self._unavailable("list", "the bucket", exc) from None

    # -- provisioning (the store keeper's) -----------------------------------------------------

    async def ensure_bucket(self) -> bool:
        """Create the bucket unless it exists; return whether it was created."""
        try:
            if self._files is not None:
                return await self._blocking(self._files.ensure_bucket)
            return await self._blocking(ensure_bucket, self._admin_client(), self.bucket)
        except (*_FAILURES, TimeoutError) as exc:
            raise self._unavailable("create", f"the bucket {self.bucket}", exc) from None

    async def clean_leftovers(self, older_than: timedelta) -> int:
        """Remove what interrupted writes left: incomplete multipart uploads on S3, staging
        files and metadata without an object in the embedded store. Return how many."""
        try:
            if self._files is not None:
                return await asyncio.to_thread(self._files.clean_leftovers, older_than.total_seconds())
            return await self._blocking(self._abort_stale_uploads, datetime.now(UTC) - older_than)
        except _FAILURES as exc:
            raise self._unavailable("clean up", f"the bucket {self.bucket}", exc) from None

    def _abort_stale_uploads(self, cutoff: datetime) -> int:
        admin = self._admin_client()
        aborted = 0
        for upload in admin.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []):
            if upload["Initiated"] < cutoff:
                admin.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                log.info("aborted an incomplete multipart upload", extra={"key": upload["Key"]})
                aborted += 1
        return aborted

    def _admin_client(self) -> Any:
        """A boto3 client for what obstore does not do (buckets, multipart listings)."""
        if self._admin is None:
            s = self._settings
            self._admin = s3_client(s.endpoint, access_key=s.access_key, secret_key=s.secret_key,
                                    region=s.region, connect_timeout=min(2.0, s.timeout), read_timeout=s.timeout)
        return self._admin

    async def disk(self) -> DiskFigures | None:
        """The embedded store's file system figures (statvfs); None for an S3-protocol store."""
        if self._files is None:
            return None
        try:
            return await self._blocking(self._files.disk)
        except (OSError, TimeoutError) as exc:
            raise self._unavailable("measure", "the file system", exc) from None


def _from_file(key: str, meta: FileMeta) -> StoredObject:
    return StoredObject(key=key, size=meta.size, last_modified=meta.last_modified, content_type=meta.content_type,
                        metadata={k.lower(): v for k, v in meta.metadata.items()})


def _described(key: str, result: Any) -> StoredObject:
    """What a GET or HEAD answer says of an object."""
    attributes = {str(k).lower(): str(v) for k, v in result.attributes.items()}
    content_type = attributes.pop("content-type", "application/octet-stream")
    for standard in ("content-disposition", "content-encoding", "content-language", "cache-control",
                     "storage-class"):
        attributes.pop(standard, None)
    return StoredObject(
        key=key,
        size=result.meta["size"],
        last_modified=result.meta["last_modified"],
        content_type=content_type,
        # Header names are case-insensitive and stores spell them differently
        # (MinIO canonicalises them): metadata keys are always lower case here.
        metadata=attributes,
    )

