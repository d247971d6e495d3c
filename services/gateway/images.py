"""Recognise image formats by their magic bytes; pixels are never decoded here."""

from __future__ import annotations

# Canonical media type of each supported format, and the names devices may use.
JPEG, PNG, WEBP = "image/jpeg", "image/png", "image/webp"
SUPPORTED = (JPEG, PNG, WEBP)
_ALIASES = {"image/jpg": JPEG, "image/pjpeg": JPEG}


def sniff(data: bytes) -> str | None:
    """Return the media type the bytes start like, or None when no supported format does."""
    if data[:3] == b"\xff\xd8\xff":
        return JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return PNG
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    return None


def normalise(content_type: str) -> str:
    """Return the canonical form of a media type a device declared (parameters dropped)."""
    base = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)
