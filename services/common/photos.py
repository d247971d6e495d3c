"""What a photo is called, where it is stored, and the message that asks to ship it.

A photo's id is derived from what makes it the same photo (device, capture time,
image bytes), so a device that retries gets the same id and the same object:

    id  = <captured_at UTC, YYYYMMDDTHHMMSSZ> "-" <20 hex digits of a digest> "-" <device_id>
    key = photos/YYYY/MM/DD/<id>

The id alone gives the key (so ``GET /v1/photos/{id}`` needs no index) and its
owner. Keys sort by capture time within a day, and the device_id is never a path
segment of its own (device ids such as ``..`` are valid). Marker objects with the
same suffix under ``shipped/`` and ``parked/`` record what became of a photo.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
PHOTO_ID_PATTERN = re.compile(r"(\d{8}T\d{6}Z)-([0-9a-f]{20})-([A-Za-z0-9._-]{1,64})")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

PHOTOS_PREFIX = "photos/"
SHIPPED_PREFIX = "shipped/"
PARKED_PREFIX = "parked/"

MESSAGE_VERSION = 1


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

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively (and fast)

    @classmethod
    def from_json(cls, body: bytes) -> PhotoMessage:
        """Parse a message body; raise ValueError with the reason if it is not one."""
        try:
            data: Any = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"message body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("message body is not a JSON object")
        if data.get("v") != MESSAGE_VERSION:
            raise ValueError(f"unsupported message version {data.get('v')!r}")
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
        for name in ("received_at", "captured_at"):
            value = getattr(message, name)
            try:
                if not isinstance(value, str) or datetime.fromisoformat(value).tzinfo is None:
                    raise ValueError
            except ValueError:
                raise ValueError(f"message has an invalid {name}: {value!r}") from None
        return message
