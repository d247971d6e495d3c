"""Parse the human units used in configuration: sizes, rates, durations, fractions.

Sizes take ``B``, ``KB``/``MB``/``GB``/``TB`` (powers of 10) and
``KiB``/``MiB``/``GiB``/``TiB`` (powers of 2). Rates take the same units per second
(an optional ``/s`` is allowed) and ``Kbit``/``Mbit``/``Gbit`` in bits per second.
A bare number is bytes (or bytes per second, or seconds).
"""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BIT_UNITS = {"bit": 1 / 8, "kbit": 10**3 / 8, "mbit": 10**6 / 8, "gbit": 10**9 / 8}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

_NUMBER_UNIT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _number_and_unit(text: str, what: str) -> tuple[float, str]:
    match = _NUMBER_UNIT.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a {what} (expected a number and a unit)")
    return float(match.group(1)), match.group(2).lower()


def parse_size(text: str) -> int:
    """Return the number of bytes in a size such as ``2TB``, ``16MiB`` or ``1024``."""
    number, unit = _number_and_unit(text, "size")
    if unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r}: unknown size unit {unit!r} (use B, KB, MB, GB, TB, KiB..TiB)")
    return int(number * _SIZE_UNITS[unit])


def parse_rate(text: str) -> float:
    """Return bytes per second for a rate such as ``40Mbit``, ``5MB``, ``5MiB/s`` or ``5000000``."""
    stripped = text.strip()
    if stripped.lower().endswith("/s"):
        stripped = stripped[:-2]
    number, unit = _number_and_unit(stripped, "rate")
    if unit in _BIT_UNITS:
        rate = number * _BIT_UNITS[unit]
    elif unit in _SIZE_UNITS:
        rate = number * _SIZE_UNITS[unit]
    else:
        raise ValueError(
            f"{text!r}: unknown rate unit {unit!r} (use Kbit, Mbit, Gbit, or B, KB, MB, KiB.. per second)"
        )
    if rate <= 0:
        raise ValueError(f"{text!r}: a rate must be above zero")
    return rate


def parse_duration(text: str) -> float:
    """Return seconds for a duration such as ``30s``, ``10m``, ``24h``, ``1h30m`` or ``45``."""
    stripped = text.strip()
    if _PLAIN_NUMBER.fullmatch(stripped):
        return float(stripped)
    if not stripped or _DURATION_PART.sub("", stripped):
        raise ValueError(f"{text!r} is not a duration (use ms, s, m, h, d, e.g. 30s or 1h30m)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(stripped))


def parse_fraction(text: str) -> float:
    """Return a fraction in [0, 1] from ``0.9`` or ``90%``."""
    stripped = text.strip()
    try:
        value = float(stripped[:-1]) / 100 if stripped.endswith("%") else float(stripped)
    except ValueError:
        raise ValueError(f"{text!r} is not a fraction (use 0.9 or 90%)") from None
    if not 0 <= value <= 1:
        raise ValueError(f"{text!r}: a fraction must lie between 0 and 1")
    return value


def format_bytes(count: float) -> str:
    """Format a byte count for people, in powers of 10 as the configuration is."""
    if abs(count) < 1000:
        return f"{count:.0f} B"
    for unit in ("KB", "MB", "GB"):
        count /= 1000
        if abs(count) < 1000:
            return f"{count:.1f} {unit}"
    return f"{count / 1000:.1f} TB"


def format_duration(seconds: float) -> str:
    """A duration as a person writes it: ``45 s``, ``12 min``, ``3 h 20 min``, ``2 d 4 h``, ``more than a year``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s".replace(".0 s", " s")  # 0.27 s is 0.3 s, not 0 s
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 24 * 60:
        hours, minutes = divmod(minutes, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if seconds >= 365 * 86400:
        return "more than a year"
    days, hours = divmod(round(seconds / 3600), 24)
    return f"{days} d {hours} h" if hours else f"{days} d"

