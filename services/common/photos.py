"""What a photo is called, where it is stored, and the message that asks to ship it.

A photo's id is derived from what makes it the same photo (device, capture time,
image bytes), so a device that retries gets the same id and the same object:

    id  = <captured_at UTC, YYYYMMDDTHHMMSSZ> "-" <20 hex digits of a digest> "-" <device_id>
    key = photos/YYYY/MM/DD/<id>

The id alone gives the key (so ``GET /v1/photos/{id}`` needs no index) and its
owner. Keys sort by capture time within a day, and the device_id is never a path
segment of its own (device ids such as ``..`` are valid). Marker objects with the
same suffix under ``shipped/`` and ``parked/`` record what became of a photo.

**Formats are versioned**, so services of two releases run side by side during a
rolling upgrade: a shipping message says its format in ``v``, a stored photo's
metadata in ``format-version`` (absent in the first format). Each release reads
the previous format and its own, and writes its own; a message of a format it
does not know is refused with a ``ValueError`` naming the version (the shipper
parks it with that reason, an operator replays it once every service reads it).

- message 1: the fields below without ``labels``; message 2: ``labels`` too.
- metadata 1: ``device-id``, ``captured-at``, ``received-at``, ``sha256``, ``labels``
  (JSON, optional); metadata 2: the same and ``format-version``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
PHOTO_ID_PATTERN = re.compile(r"(\d{8}T\d{6}Z)-([0-9a-f]{20})-([A-Za-z0-9._-]{1,64})")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

PHOTOS_PREFIX = "photos/"
SHIPPED_PREFIX = "shipped/"
PARKED_PREFIX = "parked/"

MESSAGE_VERSION = 2
READABLE_MESSAGE_VERSIONS = (1, 2)  # the previous release's format and this one's
METADATA_VERSION = 2
METADATA_VERSION_KEY = "format-version"
READABLE_METADATA_VERSIONS = (1, 2)  # 1: written before the key existed


def canonical_time(moment: datetime) -> str:
    """Return an aware datetime as UTC RFC 3339 with microseconds: one spelling per instant."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def photo_id(device_id: str, captured_at: datetime, sha256_hex: str) -> str:
    """Derive the id of a photo from its device, capture instant and image digest."""
    material = f"{device_id}\n{canonical_time(captured_at)}\n{sha256_hex}".encode()
    digest = hashlib.sha256(material).hexdigest()[:20]
    t = captured_at.astimezone(UTC)
    # Not strftime: glibc writes year 1 as "1", not "0001", and the id's layout is fixed.
    stamp = f"{t.year:04d}{t.month:02d}{t.day:02d}T{t.hour:02d}{t.minute:02d}{t.second:02d}Z"
    return f"{stamp}-{digest}-{device_id}"


def is_photo_id(text: str) -> bool:
    return PHOTO_ID_PATTERN.fullmatch(text) is not None


def owner_of(photo_id_: str) -> str:
    """Return the device_id that owns a photo id (the id must be valid)."""
    return photo_id_[38:]


def _suffix(photo_id_: str) -> str:
    return f"{photo_id_[0:4]}/{photo_id_[4:6]}/{photo_id_[6:8]}/{photo_id_}"


def object_key(photo_id_: str) -> str:
    """Key of the photo in the local store (and, after the prefix, in S3)."""
    return PHOTOS_PREFIX + _suffix(photo_id_)


def shipped_marker_key(photo_id_: str) -> str:
    """Key of the empty object that records a photo as shipped."""
    return SHIPPED_PREFIX + _suffix(photo_id_)


def parked_marker_key(photo_id_: str) -> str:
    """Key of the object that records a photo as parked, with the reason."""
    return PARKED_PREFIX + _suffix(photo_id_)


def id_from_key(key: str) -> str:
    """Return the photo id at the end of any photo or marker key."""
    return key.rsplit("/", 1)[-1]


def photo_metadata(*, device_id: str, captured_at: datetime, received_at: datetime, sha256: str,
                   labels: str | None = None) -> dict[str, str]:
    """The metadata a photo is stored with (this release's format)."""
    metadata = {
        METADATA_VERSION_KEY: str(METADATA_VERSION),
        "device-id": device_id,
        "captured-at": canonical_time(captured_at),
        "received-at": canonical_time(received_at),
        "sha256": sha256,
    }
    if labels:
        metadata["labels"] = labels
    return metadata


def metadata_version(metadata: Mapping[str, str]) -> int:
    """The format of a stored photo's metadata; ValueError for one this release does not read."""
    text = metadata.get(METADATA_VERSION_KEY, "1")
    if not text.isdigit() or int(text) not in READABLE_METADATA_VERSIONS:
        raise ValueError(f"stored metadata format {text!r} is not one this release reads "
                         f"({', '.join(map(str, READABLE_METADATA_VERSIONS))}): upgrade this service")
    return int(text)


@dataclass(frozen=True, slots=True)
class PhotoMessage:
    """The shipping request the gateway publishes once a photo is stored locally."""

    id: str
    key: str
    size: int
    sha256: str
    content_type: str
    device_id: str
    captured_at: str
    received_at: str
    v: int = MESSAGE_VERSION
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively (and fast)

    @classmethod
    def from_metadata(cls, photo_id: str, *, size: int, content_type: str, metadata: Mapping[str, str],
                      stored_at: datetime | None = None, sha256: str | None = None) -> PhotoMessage:
        """The shipping message for a stored photo, from its metadata (either readable format).

        ``stored_at`` stands in for capture and receipt times a photo restored by hand
        lacks; ``sha256`` for a digest it lacks. Raises ValueError for metadata of a
        format this release does not read.
        """
        metadata_version(metadata)
        fallback = canonical_time(stored_at) if stored_at is not None else None
        labels = metadata.get("labels")
        try:
            parsed = orjson.loads(labels) if labels else {}
        except orjson.JSONDecodeError:
            parsed = {}
        return cls(
            id=photo_id, key=object_key(photo_id), size=size, sha256=sha256 or metadata["sha256"],
            content_type=content_type, device_id=metadata.get("device-id", owner_of(photo_id)),
            captured_at=metadata.get("captured-at") or fallback or "",
            received_at=metadata.get("received-at") or fallback or "",
            labels={str(k): str(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {},
        )

    @classmethod
    def from_json(cls, body: bytes) -> PhotoMessage:
        """Parse a message body; raise ValueError with the reason if it is not one."""
        try:
            data: Any = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"message body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("message body is not a JSON object")
        version = data.get("v")
        if isinstance(version, bool) or version not in READABLE_MESSAGE_VERSIONS:
            raise ValueError(f"message format version {version!r} is not one this release reads "
                             f"({', '.join(map(str, READABLE_MESSAGE_VERSIONS))}): replay it once every "
                             "service is upgraded")
        if version == 1 and "labels" in data:
            raise ValueError("message fields do not match: a format 1 message has no labels")
        data["v"] = MESSAGE_VERSION  # read as this release's format; written again as such
        try:
            message = cls(**data)
        except TypeError as exc:
            raise ValueError(f"message fields do not match: {exc}") from None
        if not is_photo_id(message.id) or message.key != object_key(message.id):
            raise ValueError(f"message names an invalid photo id or key: {message.id!r}")
        if not isinstance(message.size, int) or message.size < 0:
            raise ValueError(f"message has an invalid size: {message.size!r}")
        if not isinstance(message.sha256, str) or not _SHA256_HEX.fullmatch(message.sha256):
            raise ValueError(f"message has an invalid sha256: {message.sha256!r}")
        if not isinstance(message.labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in message.labels.items()):
            raise ValueError("message has invalid labels: a map of strings to strings")
        for name in ("received_at", "captured_at"):
            value = getattr(message, name)
            try:
                if not isinstance(value, str) or datetime.fromisoformat(value).tzinfo is None:
                    raise ValueError
            except ValueError:
                raise ValueError(f"message has an invalid {name}: {value!r}") from None
        return message
