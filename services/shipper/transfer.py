"""Copy one photo from the local store to S3: paced, verified, once.

Runs in a worker thread (boto3 is synchronous). The local object is streamed
straight into the upload through a reader that takes its bytes from the rate
limiter and hashes them; the reader checks size and SHA-256 before it lets the
last bytes go, so a local copy that does not match its message never completes
an upload. S3 checks the same SHA-256 (``ChecksumSHA256``) on a single-part PUT;
above the multipart threshold each part carries its own checksum, and the
whole-object digest is checked before the upload is completed.

Failures are sorted for the caller: ``Systemic`` (the remote takes nothing now:
credentials, bucket, reachability), ``Transient`` (this attempt failed; another
may not), ``Rejected`` (the remote refuses this object), and the local ones.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

from botocore.client import BaseClient
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    SSLError,
)

from services.common.photos import PhotoMessage
from services.shipper.limiter import Pace, RateLimiter

log = logging.getLogger(__name__)

# Bytes of headers an S3 request sends besides its body, charged to the cap too.
REQUEST_OVERHEAD_BYTES = 800

_SYSTEMIC_CODES = {
    "AccessDenied", "AccountProblem", "AllAccessDisabled", "AuthorizationHeaderMalformed",
    "ExpiredToken", "InvalidAccessKeyId", "InvalidBucketName", "InvalidToken", "NoSuchBucket",
    "PermanentRedirect", "SignatureDoesNotMatch", "TokenRefreshRequired", "301", "403",
}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "503", "ServiceUnavailable"}
_SYSTEMIC_EXCEPTIONS = (
    EndpointConnectionError, ConnectTimeoutError, NoCredentialsError, PartialCredentialsError,
    ProxyConnectionError, SSLError,
)


class TransferError(Exception):
    """Why a photo did not reach S3 this time."""


class Systemic(TransferError):
    """The remote cannot take anything now; every photo would fail the same way."""


class Transient(TransferError):
    """This attempt failed; a later one may succeed."""

    def __init__(self, message: str, *, throttled: bool = False) -> None:
        super().__init__(message)
        self.throttled = throttled


class Rejected(TransferError):
    """The remote refuses this object (an object-specific 4xx)."""


class LocalMissing(TransferError):
    """The local store has no object for this photo."""


class LocalCorrupt(TransferError):
    """The local object's size or SHA-256 disagrees with the message."""


class LocalUnavailable(TransferError):
    """The local store could not be read."""


class Aborted(TransferError):
    """The shipper is stopping and gave up on this upload; its message is redelivered."""


def classify(exc: Exception) -> TransferError:
    """Sort a boto3/botocore failure talking to the remote."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = f"{code or status}: {error.get('Message', '')}".strip()
        if code in _SYSTEMIC_CODES or status in (301, 403):
            return Systemic(message)
        if code in _THROTTLE_CODES or status == 503:
            return Transient(message, throttled=True)
        if status >= 500 or status == 0:
            return Transient(message)
        if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
            return Transient(f"the bytes S3 received did not match their checksum ({message})")
        return Rejected(message)
    if isinstance(exc, _SYSTEMIC_EXCEPTIONS):
        return Systemic(f"remote unreachable: {exc}")
    if isinstance(exc, ReadTimeoutError):
        return Transient(f"remote too slow: {exc}", throttled=True)
    return Transient(f"{type(exc).__name__}: {exc}")


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class PacedReader(io.RawIOBase):
    """A body for boto3: bytes from ``source``, paced by ``limiter``, checked before the last ones leave."""

    def __init__(self, source: BinaryIO, size: int, limiter: Pace, *, expected_sha256: str | None,
                 abort: threading.Event) -> None:
        super().__init__()
        self._abort = abort
        self._source = source
        self._size = size
        self._limiter = limiter
        self._expected = expected_sha256
        self._digest = hashlib.sha256()
        self._read = 0
        self.failure: TransferError | None = None  # why reading stopped, for the caller

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._read >= self._size:
            return b""
        if self._abort.is_set():
            self.failure = Aborted("the shipper is stopping")
            raise self.failure
        want = self._limiter.piece() if n is None or n < 0 else min(n, self._limiter.piece())
        want = min(want, self._size - self._read)
        try:
            chunk = self._source.read(want)
        except Exception as exc:  # the local stream broke mid-way
            self.failure = LocalUnavailable(f"reading the local object failed: {exc!r}")
            raise self.failure from exc
        if not chunk:
            self.failure = LocalCorrupt(f"local object ended after {self._read} of {self._size} bytes")
            raise self.failure
        self._digest.update(chunk)
        self._read += len(chunk)
        if self._read == self._size and self._expected is not None:
            actual = self._digest.hexdigest()
            if actual != self._expected:
                self.failure = LocalCorrupt(f"local object's SHA-256 is {actual}, its message says {self._expected}")
                raise self.failure
        self._limiter.acquire(len(chunk))
        return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


@dataclass(frozen=True)
class Shipment:
    remote_key: str
    uploaded: bool  # False when S3 already held the same bytes
    body_bytes: int


class Transfer:
    def __init__(
        self,
        *,
        local: BaseClient,
        local_bucket: str,
        remote: BaseClient,
        remote_bucket: str,
        prefix: str,
        limiter: RateLimiter,
        multipart_threshold: int,
        part_size: int,
    ) -> None:
        self._local = local
        self._local_bucket = local_bucket
        self._remote = remote
        self.remote_bucket = remote_bucket
        self._prefix = prefix
        self.limiter = limiter
        self._threshold = multipart_threshold
        self._part_size = part_size
        # Set when the shipper stops: uploads still running give up at their next read.
        self.abort = threading.Event()

    def remote_key(self, key: str) -> str:
        return self._prefix + key

    def probe(self) -> None:
        """Raise a TransferError unless the remote bucket answers with these credentials."""
        self.limiter.acquire(REQUEST_OVERHEAD_BYTES)
        try:
            self._remote.head_bucket(Bucket=self.remote_bucket)
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc) from None

    def ship(self, job: PhotoMessage, pace: Pace | None = None) -> Shipment:
        """Copy the photo of ``job`` to S3 unless it is there already with the same SHA-256;
        its bytes pass ``pace`` (the replica's limiter alone when not given)."""
        pace = pace or Pace(self.limiter)
        key = self.remote_key(job.key)
        if self._remote_sha256(key, pace) == job.sha256:
            return Shipment(key, uploaded=False, body_bytes=0)
        body, metadata = self._open_local(job)
        try:
            if job.size > self._threshold:
                self._multipart(job, key, body, metadata, pace)
            else:
                self._single(job, key, body, metadata, pace)
        finally:
            body.close()
        return Shipment(key, uploaded=True, body_bytes=job.size)

    def _remote_sha256(self, key: str, pace: Pace) -> str | None:
        """The SHA-256 (hex) of what S3 holds at ``key``, or None when nothing is there."""
        pace.acquire(REQUEST_OVERHEAD_BYTES)
        try:
            head = self._remote.head_object(Bucket=self.remote_bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise classify(exc) from None
        except BotoCoreError as exc:
            raise classify(exc) from None
        metadata = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
        if "sha256" in metadata:
            return str(metadata["sha256"])
        checksum = head.get("ChecksumSHA256")
        if checksum and "-" not in checksum:
            return base64.b64decode(checksum).hex()
        return ""  # something is there, of unknown content: upload again

    def _open_local(self, job: PhotoMessage) -> tuple[Any, dict[str, str]]:
        try:
            response = self._local.get_object(Bucket=self._local_bucket, Key=job.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise LocalMissing(f"no local object {job.key}") from None
            raise LocalUnavailable(f"local store refused {job.key}: {exc}") from None
        except BotoCoreError as exc:
            raise LocalUnavailable(f"local store unreachable: {exc}") from None
        if response["ContentLength"] != job.size:
            response["Body"].close()
            raise LocalCorrupt(f"local object has {response['ContentLength']} bytes, its message says {job.size}")
        metadata = {k.lower(): v for k, v in response.get("Metadata", {}).items()}
        metadata["sha256"] = job.sha256
        return response["Body"], metadata

    def _single(self, job: PhotoMessage, key: str, body: Any, metadata: dict[str, str], pace: Pace) -> None:
        reader = PacedReader(body, job.size, pace, expected_sha256=job.sha256, abort=self.abort)
        pace.acquire(REQUEST_OVERHEAD_BYTES)
        try:
            response = self._remote.put_object(
                Bucket=self.remote_bucket,
                Key=key,
                Body=reader,
                ContentLength=job.size,
                ContentType=job.content_type,
                Metadata=metadata,
                ChecksumSHA256=b64(bytes.fromhex(job.sha256)),
            )
        except (ClientError, BotoCoreError, OSError) as exc:
            if reader.failure is not None:  # the local side broke; boto3 wraps it
                raise reader.failure from None
            raise classify(exc) from None
        reported = response.get("ChecksumSHA256")
        if reported and reported != b64(bytes.fromhex(job.sha256)):
            raise Transient(f"S3 reports checksum {reported} for {key}, which is not the photo's")

    def _multipart(self, job: PhotoMessage, key: str, body: Any, metadata: dict[str, str], pace: Pace) -> None:
        self._abort_leftovers(key)
        pace.acquire(REQUEST_OVERHEAD_BYTES)
        try:
            upload_id = self._remote.create_multipart_upload(
                Bucket=self.remote_bucket, Key=key, ContentType=job.content_type,
                Metadata=metadata, ChecksumAlgorithm="SHA256",
            )["UploadId"]
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc) from None
        try:
            parts, part_digests = self._upload_parts(job, key, body, upload_id, pace)
            pace.acquire(REQUEST_OVERHEAD_BYTES)
            result = self._remote.complete_multipart_upload(
                Bucket=self.remote_bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
            )
        except (ClientError, BotoCoreError, OSError) as exc:
            self._abort(key, upload_id)
            raise classify(exc) from None
        except TransferError:
            self._abort(key, upload_id)
            raise
        composite = f"{b64(hashlib.sha256(b''.join(part_digests)).digest())}-{len(parts)}"
        reported = result.get("ChecksumSHA256")
        if reported and reported != composite:
            raise Transient(f"S3 reports checksum {reported} for {key}; the parts sent make {composite}")

    def _upload_parts(
        self, job: PhotoMessage, key: str, body: Any, upload_id: str, pace: Pace
    ) -> tuple[list[dict[str, Any]], list[bytes]]:
        whole = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        digests: list[bytes] = []
        sent = 0
        while sent < job.size:
            data = _read_exactly(body, min(self._part_size, job.size - sent))
            whole.update(data)
            sent += len(data)
            if sent == job.size and whole.hexdigest() != job.sha256:
                # Checked before the last part leaves: the upload is never completed.
                raise LocalCorrupt(f"local object's SHA-256 is {whole.hexdigest()}, its message says {job.sha256}")
            digest = hashlib.sha256(data).digest()
            reader = PacedReader(io.BytesIO(data), len(data), pace, expected_sha256=None, abort=self.abort)
            pace.acquire(REQUEST_OVERHEAD_BYTES)
            try:
                response = self._remote.upload_part(
                    Bucket=self.remote_bucket, Key=key, UploadId=upload_id, PartNumber=len(parts) + 1,
                    Body=reader, ContentLength=len(data), ChecksumSHA256=b64(digest),
                )
            except (ClientError, BotoCoreError, OSError):
                if reader.failure is not None:
                    raise reader.failure from None
                raise
            if response.get("ChecksumSHA256") not in (None, b64(digest)):
                raise Transient(f"S3 reports a different checksum for part {len(parts) + 1} of {key}")
            parts.append({"PartNumber": len(parts) + 1, "ETag": response["ETag"], "ChecksumSHA256": b64(digest)})
            digests.append(digest)
        return parts, digests

    def _abort_leftovers(self, key: str) -> None:
        """Abort multipart uploads of ``key`` a crashed earlier attempt left behind."""
        try:
            listing = self._remote.list_multipart_uploads(Bucket=self.remote_bucket, Prefix=key)
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc) from None
        for upload in listing.get("Uploads", []):
            if upload.get("Key") == key:
                self._abort(key, upload["UploadId"])

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._remote.abort_multipart_upload(Bucket=self.remote_bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            # The remote bucket's lifecycle rule (AbortIncompleteMultipartUpload) removes it later.
            log.warning("could not abort a multipart upload", extra={"key": key, "error": str(exc)})


def _read_exactly(body: Any, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        try:
            chunk = body.read(min(remaining, 1 << 20))
        except Exception as exc:
            raise LocalUnavailable(f"reading the local object failed: {exc!r}") from exc
        if not chunk:
            raise LocalCorrupt(f"local object ended {remaining} bytes early")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
