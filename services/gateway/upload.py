"""Turn an upload body (JSON or msgpack) into a checked ``Upload``, or raise ``Problem``.

Pure logic, no I/O: the handler reads the body under a size cap and calls these.
Untrusted input is bounded before it is parsed: the body size is capped by the
caller, msgpack gets explicit length limits, orjson stops at 1024 levels of
nesting, base64 is decoded strictly, and the image is recognised by its magic
bytes only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack
import orjson
import pybase64

from services.common.photos import DEVICE_ID_PATTERN
from services.common.problems import Problem
from services.gateway import images

JSON = "application/json"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")

# Room for the fields around the image (ids, timestamps, labels) in a body.
FIELDS_ALLOWANCE = 64 * 1024

# What any request holds besides its body: parser, request and response objects, headers, log fields.
REQUEST_OVERHEAD = 32 * 1024

MAX_LABELS = 32
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 256
MAX_LABELS_ENCODED = 1024  # S3 allows 2 KB of user metadata in all

KNOWN_FIELDS = frozenset({"device_id", "captured_at", "image", "content_type", "sha256", "labels"})

_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class Upload:
    device_id: str
    captured_at: datetime
    image: bytes
    sha256: str
    content_type: str
    labels: dict[str, str]


def body_format(content_type: str | None) -> str:
    """Return ``json`` or ``msgpack`` for a request's Content-Type, or raise 415."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type == JSON:
        return "json"
    if media_type in MSGPACK_TYPES:
        return "msgpack"
    raise Problem(
        415,
        f"Content-Type {media_type or '(none)'!r} is not supported; "
        "send application/json (image as base64) or application/msgpack (image as bin)",
    )


def body_limit(body_format_: str, max_image_bytes: int) -> int:
    """Largest body worth reading for a format: the image limit, its encoding, and the fields."""
    if body_format_ == "json":
        return -(-max_image_bytes // 3) * 4 + FIELDS_ALLOWANCE
    return max_image_bytes + FIELDS_ALLOWANCE


def held_bytes(body_length: int) -> int:
    """The memory an upload with a body of ``body_length`` bytes holds at its peak, in either format.

    The body and what is parsed out of it live together for a moment: the image's base64 text
    (about the body's size) in JSON, the image itself in msgpack. The handler then drops the body,
    and the text once the image is decoded, so the rest of the upload holds less (JSON: text and
    image, 1.75x, then the image, 0.75x; msgpack: the image, 1x).
    """
    return 2 * body_length + REQUEST_OVERHEAD


def decode_body(body_format_: str, body: bytes | bytearray) -> dict[Any, Any]:
    """Parse the body into its top-level map; raise 400 when it is not one."""
    if body_format_ == "json":
        try:
            fields = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Problem(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise Problem(400, f"body must be a JSON object, not {type(fields).__name__}")
        return fields
    try:
        fields = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=len(body),
            max_bin_len=len(body),
            max_array_len=MAX_LABELS,
            max_map_len=MAX_LABELS,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        # ValueError covers the length limits, FormatError/StackError and bad UTF-8.
        raise Problem(400, f"body is not valid msgpack: {exc}") from None
    if not isinstance(fields, dict):
        raise Problem(400, f"body must be a msgpack map, not {type(fields).__name__}")
    return fields


def parse_device_id(fields: dict[Any, Any]) -> str:
    """Return the device_id of a body, which authorisation needs before anything else."""
    device_id = fields.get("device_id")
    if device_id is None:
        raise Problem(400, "device_id is required")
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise Problem(400, "device_id must be 1 to 64 characters of A-Z a-z 0-9 . _ -")
    return device_id


def parse_upload(
    fields: dict[Any, Any], *, body_format_: str, device_id: str, max_image_bytes: int
) -> Upload:
    """Check every field of an upload and return it; raise 400/413/415/422 with the reason.

    The image is taken out of ``fields``, so its encoded form is freed as soon as it is decoded.
    """
    unknown = [k for k in fields if k not in KNOWN_FIELDS]
    if unknown:
        names = ", ".join(sorted(repr(k) for k in unknown))
        raise Problem(400, f"unknown field(s) {names}; known fields are {', '.join(sorted(KNOWN_FIELDS))}")

    captured_at = _parse_captured_at(fields.get("captured_at"))
    declared_type = _optional_str(fields, "content_type")
    declared_sha = _optional_str(fields, "sha256")
    if declared_sha is not None and not _SHA256_HEX.fullmatch(declared_sha):
        raise Problem(400, "sha256 must be 64 hexadecimal digits")
    labels = _parse_labels(fields["labels"]) if "labels" in fields else {}
    image = _parse_image(fields.pop("image", None), body_format_, max_image_bytes)

    sniffed = images.sniff(image)
    if sniffed is None:
        raise Problem(
            415, f"image is not a supported format ({', '.join(images.SUPPORTED)}) by its first bytes"
        )
    if declared_type is not None and images.normalise(declared_type) != sniffed:
        raise Problem(422, f"content_type {declared_type!r} disagrees with the image, which is {sniffed}")
    digest = hashlib.sha256(image).hexdigest()
    if declared_sha is not None and declared_sha.lower() != digest:
        raise Problem(422, f"sha256 does not match the image (the image's SHA-256 is {digest})")
    return Upload(
        device_id=device_id,
        captured_at=captured_at,
        image=image,
        sha256=digest,
        content_type=sniffed,
        labels=labels,
    )


def encode_labels(labels: dict[str, str]) -> str:
    """Labels as one ASCII JSON string, fit for an object metadata header."""
    return json.dumps(labels, ensure_ascii=True, separators=(",", ":"), sort_keys=True)


def _optional_str(fields: dict[Any, Any], name: str) -> str | None:
    """An optional string field: absent is None, but an explicit null is a wrong type."""
    if name not in fields:
        return None
    value = fields[name]
    if not isinstance(value, str):
        raise Problem(400, f"{name} must be a string when given")
    return value


def _parse_captured_at(value: Any) -> datetime:
    if value is None:
        raise Problem(400, "captured_at is required")
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise Problem(
            400, "captured_at must be an RFC 3339 timestamp with an offset, e.g. 2026-05-01T12:00:00Z"
        )
    try:
        moment = datetime.fromisoformat(value.upper())
        moment.astimezone(UTC)  # an offset can push it past year 1..9999
    except (ValueError, OverflowError) as exc:
        raise Problem(400, f"captured_at is not a valid time: {exc}") from None
    return moment


def _parse_labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Problem(400, "labels must be a map of strings to strings")
    if len(value) > MAX_LABELS:
        raise Problem(400, f"labels may hold at most {MAX_LABELS} entries")
    for key, item in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_LABEL_KEY:
            raise Problem(400, f"label names must be strings of 1 to {MAX_LABEL_KEY} characters")
        if not isinstance(item, str) or len(item) > MAX_LABEL_VALUE:
            raise Problem(
                400, f"label {key!r} must be a string of at most {MAX_LABEL_VALUE} characters"
            )
    if len(encode_labels(value)) > MAX_LABELS_ENCODED:
        raise Problem(400, f"labels take more than {MAX_LABELS_ENCODED} bytes once encoded")
    return value


def _parse_image(value: Any, body_format_: str, max_image_bytes: int) -> bytes:
    if value is None:
        raise Problem(400, "image is required")
    if body_format_ == "json":
        if not isinstance(value, str):
            raise Problem(400, "image must be a base64 string in a JSON body")
        if len(value) // 4 * 3 - 2 > max_image_bytes:
            raise Problem(413, f"image is larger than the limit of {max_image_bytes} bytes")
        try:
            image = pybase64.b64decode(value, validate=True)
        except (ValueError, TypeError) as exc:
            raise Problem(400, f"image is not valid base64 (standard alphabet, padded): {exc}") from None
    else:
        if not isinstance(value, bytes):
            raise Problem(400, "image must be msgpack bin (raw bytes) in a msgpack body")
        image = value
    if not image:
        raise Problem(400, "image is empty")
    if len(image) > max_image_bytes:
        raise Problem(413, f"image is larger than the limit of {max_image_bytes} bytes")
    return image
