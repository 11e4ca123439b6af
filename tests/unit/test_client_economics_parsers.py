"""Table-driven tests of the client's economics parsers (``client.units``): the time-of-use
tariff file, ``--since``, MODEL=PRICE, percentages and hours.

Pure functions: no broker, no SDK.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from client.units import (
    format_permille_percent,
    milliseconds_to_hours,
    parse_model_price,
    parse_since,
    parse_tariff_file,
    percent_to_permille,
)

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)

# -- the time-of-use tariff file ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "windows"),
    [
        ("17-21 0.31\n", [(17, 21, 310_000)]),
        ("", []),
        ("# only a comment\n\n   \n", []),
        (
            "# peak hours\n17-21 0.31   # evening\n\n22-6 $0.08\n",
            [(17, 21, 310_000), (22, 6, 80_000)],  # 22-6 wraps past midnight
        ),
        ("0-24 0.10", [(0, 24, 100_000)]),  # the whole day
        ("23-24 0.2\n0-1 0.2", [(23, 24, 200_000), (0, 1, 200_000)]),
        ("  7-9\t0.000001  ", [(7, 9, 1)]),
        ("06-08 0.15\r\n08-10 0.16\r\n", [(6, 8, 150_000), (8, 10, 160_000)]),  # touching is fine
    ],
)
def test_parse_tariff_file(text: str, windows: list[tuple[int, int, int]]) -> None:
    assert parse_tariff_file(text) == windows


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("17-21\n", "line 1: expected 'START-END USD_PER_KWH'"),
        ("# ok\n17 - 21 0.31\n", "line 2: expected 'START-END USD_PER_KWH'"),
        ("17-21 0.31 extra\n", "line 1: expected"),
        ("17:00-21:00 0.31\n", "line 1: expected"),
        ("-1-5 0.1\n", "line 1: expected"),
        ("24-2 0.1\n", "line 1: start hour must be 0-23 (got 24)"),
        ("1-0 0.1\n", "line 1: end hour must be 1-24 (got 0)"),
        ("1-25 0.1\n", "line 1: end hour must be 1-24 (got 25)"),
        ("5-5 0.1\n", "line 1: empty window 5-5"),
        ("1-2 abc\n", "line 1: amount in USD: not a number"),
        ("1-2 -0.1\n", "line 1: amount in USD: must not be negative"),
        ("1-2 0.0000001\n", "line 1: amount in USD: finer than one micro-dollar"),
        (
            "17-21 0.31\n\n20-22 0.2\n",
            "line 3: window 20-22 overlaps the window on line 1 at hour 20",
        ),
        ("22-6 0.08\n5-7 0.1\n", "line 2: window 5-7 overlaps the window on line 1 at hour 5"),
        ("0-24 0.1\n3-4 0.2\n", "line 2: window 3-4 overlaps the window on line 1 at hour 3"),
    ],
)
def test_parse_tariff_file_rejects_naming_the_line(text: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_tariff_file(text)
    assert str(info.value).startswith(error), str(info.value)


# -- --since -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", NOW - timedelta(hours=24)),
        ("7d", NOW - timedelta(days=7)),
        ("30m", NOW - timedelta(minutes=30)),
        ("90s", NOW - timedelta(seconds=90)),
        ("2w", NOW - timedelta(weeks=2)),
        (" 1h ", NOW - timedelta(hours=1)),
        ("0h", NOW),
        ("2025-01-31", datetime(2025, 1, 31, tzinfo=UTC)),  # a date is midnight UTC
        ("2025-01-31T12:00:00Z", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-01-31T12:00:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),  # no zone: UTC
        ("2025-01-31 14:00+02:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-06-01T12:00:00Z", NOW),  # exactly now is not the future
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    got = parse_since(text, now=NOW)
    assert got == expected
    assert got.tzinfo is not None and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "expected a duration"),
        ("24", "expected a duration"),
        ("h", "expected a duration"),
        ("1.5h", "expected a duration"),
        ("-1h", "expected a duration"),
        ("24H", "expected a duration"),
        ("3y", "expected a duration"),
        ("yesterday", "expected a duration"),
        ("2025-13-01", "expected a duration"),
        ("2025-06-02", "in the future"),
        ("2025-06-01T12:00:01Z", "in the future"),
        ("99999999999d", "too far back"),
    ],
)
def test_parse_since_rejects(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_since(text, now=NOW)


def test_parse_since_defaults_to_now() -> None:
    before = datetime.now(UTC)
    got = parse_since("1h")
    assert before - timedelta(hours=1, seconds=5) <= got <= datetime.now(UTC) - timedelta(hours=1)


# -- MODEL=PRICE and percentages -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("RTX 3090=0.35", ("RTX 3090", 350_000)),
        ("  RTX 3090 = $0.35 ", ("RTX 3090", 350_000)),
        ("A100=2", ("A100", 2_000_000)),
        ("H100=0", ("H100", 0)),
        ("weird=model=0.1", ("weird=model", 100_000)),  # the price follows the last '='
    ],
)
def test_parse_model_price(text: str, pair: tuple[str, int]) -> None:
    assert parse_model_price(text) == pair


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("RTX 3090", "expected MODEL=USD"),
        ("=0.35", "expected MODEL=USD"),
        ("RTX 3090=", "expected MODEL=USD"),
        ("RTX 3090= ", "expected MODEL=USD"),
        ("RTX 3090=abc", "RTX 3090: amount in USD: not a number"),
        ("RTX 3090=-1", "RTX 3090: amount in USD: must not be negative"),
        ("RTX 3090=0.0000001", "RTX 3090: amount in USD: finer than one micro-dollar"),
    ],
)
def test_parse_model_price_rejects(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_model_price(text, "--ask")


@pytest.mark.parametrize(
    ("text", "permille"),
    [("10", 100), ("12.5", 125), ("0", 0), ("100", 1000), ("7%", 70), (Decimal("2.5"), 25)],
)
def test_percent_to_permille(text: str | Decimal, permille: int) -> None:
    assert percent_to_permille(text) == permille


@pytest.mark.parametrize("text", ["100.1", "-1", "12.55", "abc", "", "NaN"])
def test_percent_to_permille_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        percent_to_permille(text)


@pytest.mark.parametrize(
    ("permille", "text"), [(998, "99.8%"), (1000, "100.0%"), (0, "0.0%"), (5, "0.5%")]
)
def test_format_permille_percent(permille: int, text: str) -> None:
    assert format_permille_percent(permille) == text


@pytest.mark.parametrize(
    ("ms", "hours"), [(5_400_000, "1.500"), (0, "0.000"), (1_801, "0.001"), (1_800, "0.000")]
)
def test_milliseconds_to_hours(ms: int, hours: str) -> None:
    assert milliseconds_to_hours(ms) == Decimal(hours)
