"""Copy one photo from the local store to S3: paced, verified, once.

Runs in a worker thread (boto3 is synchronous). The local object is read whole
through the local store client and checked against its message (size, SHA-256)
before a byte leaves, so a local copy that does not match what the device sent
is never uploaded; then a reader lets its bytes out at the pace of the rate
limiters as the HTTP client sends them. S3 checks the same SHA-256
(``ChecksumSHA256``) on a single-part PUT; above the multipart threshold each
part carries its own checksum, and S3's composite is compared after completing.

One request to the remote in the common case: a PUT with ``If-None-Match: *``,
which S3 refuses (412) when the key exists; only then is what is there compared
with the photo (a HEAD). That comparison trusts only what S3 computed itself
(its SHA-256 checksum, else its MD5 ETag), never the ``sha256`` metadata we
write with the upload: an upload that went wrong carries that metadata too.
Memory per upload is the photo (16 MiB at most).

Failures are sorted for the caller (``failures``): ``Systemic``, ``Transient``,
``Rejected`` and the local ones.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import threading
from dataclasses import dataclass
from typing import Any

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from services.common.localstore import LocalStore, StoreUnavailable
from services.common.photos import PhotoMessage
from services.shipper.failures import (
    Aborted,
    LocalCorrupt,
    LocalMissing,
    LocalUnavailable,
    TransferError,
    Transient,
    classify,
)
from services.shipper.limiter import Pace, RateLimiter

log = logging.getLogger(__name__)

# Bytes of headers an S3 request sends besides its body, charged to the cap too.
REQUEST_OVERHEAD_BYTES = 800
# What a single PUT came to.
UPLOADED, EXISTS, UNSUPPORTED = "uploaded", "exists", "unsupported"

def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class PacedReader(io.RawIOBase):
    """A body for boto3: bytes already read and checked, let out at the pace of ``pace`` as they are sent."""

    def __init__(self, data: memoryview, pace: Pace, *, abort: threading.Event) -> None:
        super().__init__()
        self._data = data
        self._pace = pace
        self._abort = abort
        self._sent = 0
        self.failure: TransferError | None = None  # why reading stopped, for the caller (boto3 may wrap it)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        # The bytes are in memory: the HTTP client may rewind (after a refused
        # 100-continue, a reset connection); what it sends again is paced again.
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._sent, io.SEEK_END: len(self._data)}[whence]
        self._sent = min(max(0, base + offset), len(self._data))
        return self._sent

    def tell(self) -> int:
        return self._sent

    def read(self, n: int = -1) -> bytes:
        if self._sent >= len(self._data):
            return b""
        if self._abort.is_set():
            self.failure = Aborted("the shipper is stopping")
            raise self.failure
        want = self._pace.piece() if n is None or n < 0 else min(n, self._pace.piece())
        chunk = self._data[self._sent:self._sent + want]
        self._sent += len(chunk)
        self._pace.acquire(len(chunk))
        return bytes(chunk)

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
        local: LocalStore,
        remote: BaseClient,
        remote_bucket: str,
        prefix: str,
        limiter: RateLimiter,
        multipart_threshold: int,
        part_size: int,
    ) -> None:
        self._local = local
        self._remote = remote
        self.remote_bucket = remote_bucket
        self._prefix = prefix
        self.limiter = limiter
        self._threshold = multipart_threshold
        self._part_size = part_size
        # A conditional PUT (If-None-Match: *) uploads a photo in one request and cannot
        # overwrite one; a remote that does not implement it gets HEAD, then PUT.
        self._conditional = True
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

    def ship(self, job: PhotoMessage, pace: Pace | None = None, *, maybe_there: bool = True) -> Shipment:
        """Copy the photo of ``job`` to S3 unless it is there already with the same SHA-256;
        its bytes pass ``pace`` (the replica's limiter alone when not given).

        The local copy is read whole and checked (size, SHA-256) before a byte leaves. A
        photo on its first delivery (``maybe_there=False``) takes one request to the remote:
        a PUT that S3 refuses (412) when the key exists, before the body when the remote
        honours ``Expect: 100-continue``; only then is what is there compared by its SHA-256.
        A retry, a redelivery or another copy of a message asks first (HEAD), so a photo
        that may be there already is not sent again.
        """
        pace = pace or Pace(self.limiter)
        key = self.remote_key(job.key)
        data, metadata = self._read_local(job)
        if job.size > self._threshold:
            if self._remote_holds(key, job, data, pace):
                return Shipment(key, uploaded=False, body_bytes=0)
            self._multipart(job, key, data, metadata, pace)
            return Shipment(key, uploaded=True, body_bytes=job.size)
        if self._conditional and not maybe_there:
            outcome = self._single(job, key, data, metadata, pace, if_absent=True)
            if outcome == UPLOADED:
                return Shipment(key, uploaded=True, body_bytes=job.size)
        if self._remote_holds(key, job, data, pace):
            return Shipment(key, uploaded=False, body_bytes=0)
        # Nothing there, or something else (never this photo's bytes): put it in place.
        self._single(job, key, data, metadata, pace, if_absent=False)
        return Shipment(key, uploaded=True, body_bytes=job.size)

    def _read_local(self, job: PhotoMessage) -> tuple[memoryview, dict[str, str]]:
        """The local copy, checked against the message: size and SHA-256."""
        try:
            found = self._local.read_with_metadata(job.key)
        except StoreUnavailable as exc:
            raise LocalUnavailable(str(exc)) from None
        if found is None:
            raise LocalMissing(f"no local object {job.key}")
        data, stored = found
        if len(data) != job.size:
            raise LocalCorrupt(f"local object has {len(data)} bytes, its message says {job.size}")
        actual = hashlib.sha256(data).hexdigest()
        if actual != job.sha256:
            raise LocalCorrupt(f"local object's SHA-256 is {actual}, its message says {job.sha256}")
        metadata = {k: v for k, v in stored.metadata.items() if k != "sha256"}
        metadata["sha256"] = job.sha256
        return memoryview(data), metadata

    def _remote_holds(self, key: str, job: PhotoMessage, data: memoryview, pace: Pace) -> bool:
        """Whether S3 holds exactly this photo at ``key``, by the checksums S3 computed itself.

        Its SHA-256 checksum when it has one (whole, or the composite of parts), else its
        ETag (the MD5 of a single-part object, or of the parts' MD5s). The parts are assumed
        to be ours in size; anything that cannot be matched counts as not this photo, so it
        is uploaded again rather than trusted.
        """
        pace.acquire(REQUEST_OVERHEAD_BYTES)
        try:
            head = self._remote.head_object(Bucket=self.remote_bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise classify(exc) from None
        except BotoCoreError as exc:
            raise classify(exc) from None
        if head.get("ContentLength") not in (None, job.size):
            return False
        checksum = head.get("ChecksumSHA256")
        if checksum:
            # A whole object's SHA-256; or, uploaded in parts, the SHA-256 of the parts' ones
            # (S3 adds "-<parts>", some S3-protocol servers do not).
            digest = checksum.split("-", 1)[0]
            if base64.b64decode(digest).hex() == job.sha256:
                return True
            return job.size > self._threshold and digest == self._composite(data, hashlib.sha256, encode=b64)
        etag = str(head.get("ETag", "")).strip('"')
        if "-" in etag:
            return etag.split("-", 1)[0] == self._composite(data, hashlib.md5, encode=bytes.hex)
        return bool(etag) and etag == hashlib.md5(data).hexdigest()

    def _composite(self, data: memoryview, algorithm: Any, *, encode: Any) -> str:
        """S3's checksum of a multipart object uploaded in parts of our size: the digest of the
        parts' digests."""
        digests = [algorithm(data[start:start + self._part_size]).digest()
                   for start in range(0, len(data), self._part_size)]
        return str(encode(algorithm(b"".join(digests)).digest()))

    def _single(self, job: PhotoMessage, key: str, data: memoryview, metadata: dict[str, str], pace: Pace, *,
                if_absent: bool) -> str:
        """One PUT: UPLOADED, or with ``if_absent`` EXISTS (S3 holds something at ``key``) or
        UNSUPPORTED (the remote does not take conditional PUTs; it is not asked again)."""
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        reader = PacedReader(data, pace, abort=self.abort)
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
                **condition,
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if if_absent and (status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")):
                return EXISTS
            if if_absent and (status == 501 or code == "NotImplemented"):
                log.warning("the remote does not take conditional PUTs; checking with HEAD before each upload",
                            extra={"error": code or status})
                self._conditional = False
                return UNSUPPORTED
            raise classify(exc) from None
        except (BotoCoreError, OSError, TransferError) as exc:
            if reader.failure is not None:  # the shipper is stopping; boto3 may have wrapped it
                raise reader.failure from None
            raise exc if isinstance(exc, TransferError) else classify(exc) from None
        reported = response.get("ChecksumSHA256")
        if reported and reported != b64(bytes.fromhex(job.sha256)):
            raise Transient(f"S3 reports checksum {reported} for {key}, which is not the photo's")
        return UPLOADED

    def _multipart(self, job: PhotoMessage, key: str, data: memoryview, metadata: dict[str, str],
                   pace: Pace) -> None:
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
            parts, part_digests = self._upload_parts(key, data, upload_id, pace)
            pace.acquire(REQUEST_OVERHEAD_BYTES)
            result = self._remote.complete_multipart_upload(
                Bucket=self.remote_bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
            )
        except TransferError:
            self._abort(key, upload_id)
            raise
        except (ClientError, BotoCoreError, OSError) as exc:
            self._abort(key, upload_id)
            raise classify(exc) from None
        composite = f"{b64(hashlib.sha256(b''.join(part_digests)).digest())}-{len(parts)}"
        reported = result.get("ChecksumSHA256")
        if reported and reported != composite:
            raise Transient(f"S3 reports checksum {reported} for {key}; the parts sent make {composite}")

    def _upload_parts(
        self, key: str, data: memoryview, upload_id: str, pace: Pace
    ) -> tuple[list[dict[str, Any]], list[bytes]]:
        parts: list[dict[str, Any]] = []
        digests: list[bytes] = []
        for start in range(0, len(data), self._part_size):
            part = data[start:start + self._part_size]
            digest = hashlib.sha256(part).digest()
            reader = PacedReader(part, pace, abort=self.abort)
            pace.acquire(REQUEST_OVERHEAD_BYTES)
            try:
                response = self._remote.upload_part(
                    Bucket=self.remote_bucket, Key=key, UploadId=upload_id, PartNumber=len(parts) + 1,
                    Body=reader, ContentLength=len(part), ChecksumSHA256=b64(digest),
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
