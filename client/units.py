"""Unit conversions between what people type and what the API carries.

Money is integer micro-dollars on the wire (``$0.35`` = ``350000``) and is
parsed with :class:`~decimal.Decimal`, never ``float``: a value that is not a
whole number of micro-dollars is rejected rather than rounded. Memory is MiB
on the wire; "GB" on the command line means GiB, as GPU vendors use it (a
24 GB RTX 3090 reports 24576 MiB).
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal, InvalidOperation

__all__ = [
    "MIB_PER_GB",
    "MICROS_PER_USD",
    "format_price_per_gpu_hour",
    "format_usd",
    "gb_to_mib",
    "joules_to_kwh",
    "micros_to_usd",
    "pue_to_permille",
    "usd_to_micros",
]

MICROS_PER_USD = 1_000_000
MIB_PER_GB = 1024
JOULES_PER_KWH = 3_600_000
_INT64_MAX = 2**63 - 1


def _decimal(value: str | int | Decimal, what: str) -> Decimal:
    """Parse a finite, non-negative Decimal; ``float`` is refused on purpose."""
    if isinstance(value, float):  # bool is an int and fine; float would hide rounding
        raise TypeError(f"{what}: pass a string or Decimal, not float ({value!r})")
    text = value.strip() if isinstance(value, str) else value
    try:
        number = Decimal(text)
    except (InvalidOperation, ValueError):
        raise ValueError(f"{what}: not a number: {value!r}") from None
    if not number.is_finite():
        raise ValueError(f"{what}: not a finite number: {value!r}")
    if number < 0:
        raise ValueError(f"{what}: must not be negative (got {value})")
    return number


def usd_to_micros(value: str | int | Decimal) -> int:
    """Dollars to integer micro-dollars: ``"0.35"`` → ``350000``; ``"$1"`` → ``1000000``.

    Raises ValueError for negative, non-numeric or sub-micro-dollar amounts
    (``"0.0000001"``) and for amounts that do not fit an int64.
    """
    if isinstance(value, str) and value.strip().startswith("$"):
        value = value.strip()[1:]
    micros = _decimal(value, "amount in USD") * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError(f"amount in USD: finer than one micro-dollar: {value!r}")
    if micros > _INT64_MAX:
        raise ValueError(f"amount in USD: too large: {value!r}")
    return int(micros)


def micros_to_usd(micros: int) -> str:
    """Integer micro-dollars to a dollar string with six decimals: ``350000`` → ``"0.350000"``."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def format_usd(micros: int) -> str:
    """Micro-dollars for people: ``350000`` → ``"$0.350000"``."""
    text = micros_to_usd(micros)
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def format_price_per_gpu_hour(micros: int) -> str:
    """A per-GPU-hour price for people: ``350000`` → ``"$0.350000/GPU-h"``."""
    return f"{format_usd(micros)}/GPU-h"


def gb_to_mib(value: str | int | Decimal) -> int:
    """GB (GiB) to whole MiB, rounding up so the minimum is never undershot: ``"24"`` → 24576."""
    mib = (_decimal(value, "size in GB") * MIB_PER_GB).to_integral_value(rounding=ROUND_CEILING)
    if mib > _INT64_MAX:
        raise ValueError(f"size in GB: too large: {value!r}")
    return int(mib)


def pue_to_permille(value: str | int | Decimal) -> int:
    """Power usage effectiveness to thousandths: ``"1.25"`` → 1250; must be ≥ 1 and ≤ 10."""
    pue = _decimal(value, "PUE")
    if not Decimal(1) <= pue <= Decimal(10):
        raise ValueError(f"PUE: must be between 1.0 and 10.0 (got {value})")
    permille = pue * 1000
    if permille != permille.to_integral_value():
        raise ValueError(f"PUE: at most three decimals (got {value})")
    return int(permille)


def joules_to_kwh(joules: int) -> Decimal:
    """Energy in joules to kWh, exact to six decimals (rounded half-even)."""
    return (Decimal(joules) / JOULES_PER_KWH).quantize(Decimal("0.000001"))
