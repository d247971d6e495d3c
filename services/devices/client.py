"""The reference device client: how a camera should upload a photo to a photoferry gateway.

Standard library plus ``msgpack``, in one file, meant to be read in one sitting
and ported to whatever a device runs. What it does, and why:

- **One request, built once.** The body (JSON with the image in base64, or msgpack
  with the image as raw ``bin``) is encoded once and every retry sends the very
  same bytes with the same ``captured_at``: the gateway recognises a retry and
  answers ``200`` with the same id, so retrying is always harmless.
- **Retry what may succeed later.** No answer at all, ``408`` (the body was too
  slow), ``429`` and any ``5xx`` are retried; every other ``4xx`` means the
  request itself is wrong and retrying cannot help, so the client gives up.
- **Back off with full jitter**, and never sooner than the gateway's
  ``Retry-After``: a thousand devices that failed together must not come back
  together. ``429`` (this device sent past its limits) and ``503`` (the site
  cannot take it now) are waited out alike.
- **HTTPS, verified.** With an ``https://`` gateway the certificate is checked
  against the site's CA (``ca_file``, else the system's); the token never
  crosses the network in clear.

Example::

    client = DeviceClient("https://gateway.site:8080", "cam-042", token, ca_file="/etc/site-ca.pem")
    result = client.upload(Photo(image=jpeg_bytes, captured_at="2026-05-01T12:00:00Z"))
    if result.accepted:
        print(result.photo_id)
    else:
        keep_the_photo_and_try_later(result.detail)
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

JSON = "application/json"
MSGPACK = "application/msgpack"
CONNECTION_FAILED = 0  # the status recorded when no HTTP answer came back


@dataclass(frozen=True)
class Photo:
    image: bytes
    captured_at: str  # RFC 3339 with an offset; the same on every retry
    content_type: str | None = None  # e.g. image/jpeg; checked against the image if given
    sha256: str | None = None  # hex; checked against the image if given
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """An upload ready to send, and to send again unchanged."""

    content_type: str
    body: bytes


@dataclass(frozen=True)
class Answer:
    status: int  # CONNECTION_FAILED when there was no answer
    body: bytes = b""
    retry_after: float | None = None
    error: str = ""  # why there was no answer


@dataclass(frozen=True)
class Result:
    accepted: bool  # 201 (stored) or 200 (stored before: a retry that had succeeded)
    status: int
    photo_id: str | None
    attempts: int
    detail: str  # the gateway's problem detail, or the connection error


def encode(device_id: str, photo: Photo, *, fmt: str = "json") -> Request:
    """Build the upload body: ``json`` (image as standard base64) or ``msgpack`` (image as bin)."""
    fields: dict[str, object] = {"device_id": device_id, "captured_at": photo.captured_at}
    if photo.content_type:
        fields["content_type"] = photo.content_type
    if photo.sha256:
        fields["sha256"] = photo.sha256
    if photo.labels:
        fields["labels"] = photo.labels
    if fmt == "json":
        fields["image"] = base64.b64encode(photo.image).decode("ascii")
        return Request(JSON, json.dumps(fields, separators=(",", ":")).encode())
    if fmt == "msgpack":
        fields["image"] = photo.image
        return Request(MSGPACK, msgpack.packb(fields, use_bin_type=True))
    raise ValueError(f"unknown format {fmt!r}: use json or msgpack")


def should_retry(status: int) -> bool:
    """Whether an upload that got ``status`` may succeed if sent again unchanged."""
    return status in (CONNECTION_FAILED, 408, 429) or status >= 500


class Backoff:
    """Delays between attempts: exponential with full jitter, at least the server's Retry-After."""

    def __init__(self, *, base_s: float = 1.0, cap_s: float = 300.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self._rng = rng

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``attempt``-th failed attempt (1 for the first)."""
        ceiling = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        jitter = self._rng() * ceiling
        # Never sooner than asked; spread on top of it, so a crowd told "1 s" does not return as one.
        return min(self.cap_s, retry_after + jitter) if retry_after is not None else jitter


class DeviceClient:
    """Uploads one device's photos over one kept-alive HTTP connection."""

    def __init__(self, gateway_url: str, device_id: str, token: str, *, fmt: str = "json",
                 timeout_s: float = 30.0, backoff: Backoff | None = None, ca_file: str | None = None) -> None:
        url = urllib.parse.urlsplit(gateway_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{gateway_url!r} is not an http:// or https:// URL")
        self._url = url
        # Verifies the certificate and that it names the gateway's host, against the site's CA.
        self._tls = tls_context(ca_file) if url.scheme == "https" else None
        self.device_id = device_id
        self._token = token
        self.fmt = fmt
        self._timeout_s = timeout_s
        self.backoff = backoff or Backoff()
        self._connection: http.client.HTTPConnection | None = None

    def request(self, photo: Photo) -> Request:
        return encode(self.device_id, photo, fmt=self.fmt)

    def send(self, request: Request) -> Answer:
        """One attempt: POST the request and read the answer (or why there was none)."""
        headers = {"Content-Type": request.content_type, "Authorization": f"Bearer {self._token}"}
        for fresh_connection in (False, True):
            connection = self._connect(fresh=fresh_connection)
            try:
                connection.request("POST", f"{self._url.path.rstrip('/')}/v1/photos", body=request.body,
                                   headers=headers)
                response = connection.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if not fresh_connection:
                    continue  # a kept-alive connection the server had closed: once more on a new one
                return Answer(CONNECTION_FAILED, error=f"{type(exc).__name__}: {exc}")
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                return Answer(CONNECTION_FAILED, error=f"{type(exc).__name__}: {exc}")
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return Answer(response.status, body, _seconds(response.getheader("Retry-After")))
        raise AssertionError("unreachable")

    def upload(self, photo: Photo, *, max_attempts: int | None = None,
               sleep: Callable[[float], None] = time.sleep) -> Result:
        """Send until the photo is accepted, the gateway refuses it for good, or attempts run out."""
        request = self.request(photo)
        attempt = 0
        while True:
            attempt += 1
            answer = self.send(request)
            if 200 <= answer.status < 300 or not should_retry(answer.status) or attempt == max_attempts:
                return result_of(answer, attempt)
            sleep(self.backoff.delay(attempt, answer.retry_after))

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self, *, fresh: bool) -> http.client.HTTPConnection:
        if fresh:
            self.close()
        if self._connection is None:
            if self._tls is not None:
                self._connection = http.client.HTTPSConnection(self._url.hostname, self._url.port,
                                                               timeout=self._timeout_s, context=self._tls)
            else:
                self._connection = http.client.HTTPConnection(self._url.hostname, self._url.port,
                                                              timeout=self._timeout_s)
        return self._connection


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Verify a gateway's certificate against ``ca_file`` (the site's CA), else the system's CAs."""
    return ssl.create_default_context(cafile=ca_file)


def result_of(answer: Answer, attempts: int) -> Result:
    """What an attempt's answer means for the photo."""
    photo_id = detail = None
    if answer.body:
        try:
            document = json.loads(answer.body)
            photo_id = document.get("id") if 200 <= answer.status < 300 else None
            detail = document.get("detail")
        except (ValueError, AttributeError):
            detail = answer.body[:200].decode(errors="replace")
    return Result(accepted=answer.status in (200, 201), status=answer.status, photo_id=photo_id,
                  attempts=attempts, detail=detail or answer.error)


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After in seconds (the delta form the gateway sends; an HTTP date is treated as absent)."""
    try:
        return max(0.0, float(retry_after)) if retry_after else None
    except ValueError:
        return None
