"""Why a photo did not reach S3 this time, sorted for the policy.

``Systemic`` (the remote takes nothing now: credentials, bucket, reachability),
``Transient`` (this attempt failed; another may not), ``Rejected`` (the remote
refuses this object), the local store's failures, and ``Aborted`` (the shipper
is stopping). ``classify`` sorts what boto3 and botocore raise.
"""

from __future__ import annotations

from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    SSLError,
)

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
