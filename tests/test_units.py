"""Configuration units: sizes, rates, durations, fractions."""

from __future__ import annotations

import pytest

from services.common.units import format_bytes, parse_duration, parse_fraction, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024", 1024), ("16MiB", 16 * 2**20), ("2TB", 2 * 10**12), ("5 MB", 5_000_000),
     ("1.5KiB", 1536), ("10kb", 10_000), ("0B", 0)],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("40Mbit", 5_000_000), ("5MB", 5_000_000), ("5MiB", 5 * 2**20), ("5000000", 5_000_000),
     ("40Mbit/s", 5_000_000), ("1Gbit", 125_000_000), ("800Kbit", 100_000), ("2.5 MB/s", 2_500_000)],
)
def test_rates(text: str, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", 30), ("10m", 600), ("24h", 86400), ("7d", 604800), ("1h30m", 5400), ("250ms", 0.25), ("45", 45)],
)
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize(("text", "expected"), [("0.9", 0.9), ("90%", 0.9), ("1", 1.0), ("0%", 0.0)])
def test_fractions(text: str, expected: float) -> None:
    assert parse_fraction(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("parser", "text"),
    [(parse_size, "5 parsecs"), (parse_size, "MB"), (parse_size, "-1MB"), (parse_rate, "0Mbit"),
     (parse_rate, "fast"), (parse_rate, "5 furlongs"), (parse_duration, "soon"), (parse_duration, "10 s x"),
     (parse_duration, "inf"), (parse_duration, "nan"), (parse_fraction, "1.5"), (parse_fraction, "nan"),
     (parse_fraction, "ninety")],
)
def test_malformed_values_are_refused_with_the_value_named(parser, text: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="'"):
        parser(text)


def test_bytes_format_for_people() -> None:
    assert [format_bytes(n) for n in (999, 1500, 2_000_000, 3 * 10**12)] == ["999 B", "1.5 KB", "2.0 MB", "3.0 TB"]
