"""Table-driven tests of rigshift.units: money as integer micro-dollars, GB to MiB, PUE.

The one definition of each conversion for the broker, the agent and the client; the
broker's scheduler, economics and validation messages and the client's output format
money with :func:`format_usd`, and ``client.units`` re-exports the module for SDK users.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

import client.units
import rigshift.units
from rigshift.units import (
    JOULES_PER_KWH,
    MICROS_PER_USD,
    format_price_per_gpu_hour,
    format_usd,
    gb_to_mib,
    joules_to_kwh,
    micros_to_usd,
    pue_to_permille,
    usd_to_micros,
)


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("0.35", 350_000),
        ("1", 1_000_000),
        ("0", 0),
        ("0.000001", 1),  # the smallest amount: one micro-dollar
        ("$2.5", 2_500_000),
        (" 0.120000 ", 120_000),
        ("1e-6", 1),  # Decimal notation is exact, so this is still one micro-dollar
        ("9223372036854.775807", 2**63 - 1),  # int64 max
        (3, 3_000_000),
        (Decimal("0.25"), 250_000),
    ],
)
def test_usd_to_micros(text: str | int | Decimal, micros: int) -> None:
    assert usd_to_micros(text) == micros


@pytest.mark.parametrize(
    "text",
    [
        "0.0000001",  # a tenth of a micro-dollar: rejected, never rounded
        "-0.35",
        "-1",
        "abc",
        "",
        "NaN",
        "Infinity",
        "9223372036854.775808",  # one past int64 max
    ],
)
def test_usd_to_micros_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        usd_to_micros(text)


def test_usd_to_micros_refuses_float() -> None:
    with pytest.raises(TypeError):
        usd_to_micros(0.35)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("micros", "text", "price"),
    [
        (350_000, "0.350000", "$0.350000/GPU-h"),
        (1_000_000, "1.000000", "$1.000000/GPU-h"),
        (0, "0.000000", "$0.000000/GPU-h"),
        (1, "0.000001", "$0.000001/GPU-h"),
        (12_345_678, "12.345678", "$12.345678/GPU-h"),
    ],
)
def test_formatting(micros: int, text: str, price: str) -> None:
    assert micros_to_usd(micros) == text
    assert format_price_per_gpu_hour(micros) == price
    assert usd_to_micros(text) == micros  # round trip


def test_format_negative_usd() -> None:
    assert micros_to_usd(-1_500_000) == "-1.500000"
    assert format_usd(-1_500_000) == "-$1.500000"


@pytest.mark.parametrize(
    ("micros", "text"),
    [(0, "$0.000000"), (250_000, "$0.250000"), (1_234_567, "$1.234567"), (-5, "-$0.000005")],
)
def test_format_usd(micros: int, text: str) -> None:
    """What the scheduler's rejection reasons and the broker's validation messages print."""
    assert format_usd(micros) == text


def test_constants() -> None:
    assert MICROS_PER_USD == 1_000_000
    assert JOULES_PER_KWH == 3_600 * 1_000  # 1 kWh = 1000 W x 3600 s


def test_client_units_is_the_shared_module() -> None:
    """``from client.units import usd_to_micros`` (docs/client.md) gets the one definition."""
    for name in rigshift.units.__all__:
        assert getattr(client.units, name) is getattr(rigshift.units, name)
    assert sorted(client.units.__all__) == sorted(rigshift.units.__all__)


@pytest.mark.parametrize(
    ("gb", "mib"),
    [
        ("24", 24_576),  # an RTX 3090 reports 24576 MiB
        ("12", 12_288),
        ("0", 0),
        ("0.5", 512),
        ("10.1", 10_343),  # 10342.4 rounds up: a minimum is never undershot
        (8, 8_192),
    ],
)
def test_gb_to_mib(gb: str | int, mib: int) -> None:
    assert gb_to_mib(gb) == mib


@pytest.mark.parametrize("gb", ["-1", "lots", "inf"])
def test_gb_to_mib_rejects(gb: str) -> None:
    with pytest.raises(ValueError):
        gb_to_mib(gb)


@pytest.mark.parametrize(
    ("pue", "permille"), [("1.25", 1250), ("1", 1000), ("1.001", 1001), ("2", 2000)]
)
def test_pue_to_permille(pue: str, permille: int) -> None:
    assert pue_to_permille(pue) == permille


@pytest.mark.parametrize("pue", ["0.9", "1.0005", "11", "-1.2", "x"])
def test_pue_to_permille_rejects(pue: str) -> None:
    with pytest.raises(ValueError):
        pue_to_permille(pue)


@pytest.mark.parametrize(
    ("joules", "kwh"),
    [
        (3_600_000, Decimal("1.000000")),
        (0, Decimal("0.000000")),
        (1_800, Decimal("0.000500")),  # 1800 / 3.6e6
        (123_456_789, Decimal("34.293552")),  # 123456789 / 3.6e6 = 34.2935525, half-even → …552
    ],
)
def test_joules_to_kwh(joules: int, kwh: Decimal) -> None:
    assert joules_to_kwh(joules) == kwh
