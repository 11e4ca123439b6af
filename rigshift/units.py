"""Unit conversions between what people type and what the API carries, for every package.

The broker, the agent and the client parse and format money and units here and
nowhere else (``client.units`` re-exports this module for SDK users).

Money is integer micro-dollars on the wire (``$0.35`` = ``350000``) and is
parsed with :class:`~decimal.Decimal`, never ``float``: a value that is not a
whole number of micro-dollars is rejected rather than rounded. Memory is MiB
on the wire; "GB" on the command line means GiB, as GPU vendors use it (a
24 GB RTX 3090 reports 24576 MiB). Ratios (PUE, broker fee, reliability) are
integer thousandths ("permille") on the wire.

It also parses the small texts an operator types for farm economics:
``MODEL=PRICE`` pairs, a time-of-use tariff file and a ``--since`` time.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal, InvalidOperation

__all__ = [
    "JOULES_PER_KWH",
    "MIB_PER_GB",
    "MICROS_PER_USD",
    "format_permille_percent",
    "format_price_per_gpu_hour",
    "format_usd",
    "gb_to_mib",
    "joules_to_kwh",
    "micros_to_usd",
    "milliseconds_to_hours",
    "parse_model_price",
    "parse_since",
    "parse_tariff_file",
    "percent_to_permille",
    "pue_to_permille",
    "usd_to_micros",
]

MICROS_PER_USD = 1_000_000
"""Micro-dollars in one US dollar: money is integer micro-dollars everywhere."""
MIB_PER_GB = 1024
"""MiB in one GB as GPU vendors count it (GiB)."""
JOULES_PER_KWH = 3_600_000
"""Joules in one kilowatt-hour: energy is integer joules everywhere."""
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


def milliseconds_to_hours(milliseconds: int) -> Decimal:
    """GPU time in milliseconds to hours, to three decimals: ``5_400_000`` → ``1.500``."""
    return (Decimal(milliseconds) / 3_600_000).quantize(Decimal("0.001"), ROUND_HALF_EVEN)


def percent_to_permille(value: str | int | Decimal) -> int:
    """A percentage to thousandths: ``"10"`` → 100, ``"2.5"`` → 25; must be 0 to 100."""
    percent = _decimal(value.rstrip("%") if isinstance(value, str) else value, "percent")
    if percent > 100:
        raise ValueError(f"percent: must be between 0 and 100 (got {value})")
    permille = percent * 10
    if permille != permille.to_integral_value():
        raise ValueError(f"percent: at most one decimal (got {value})")
    return int(permille)


def format_permille_percent(permille: int) -> str:
    """Thousandths as a percentage for people: ``998`` → ``"99.8%"``, ``1000`` → ``"100.0%"``."""
    sign = "-" if permille < 0 else ""
    whole, tenth = divmod(abs(permille), 10)
    return f"{sign}{whole}.{tenth}%"


def parse_model_price(text: str, what: str = "MODEL=PRICE") -> tuple[str, int]:
    """``"RTX 3090=0.35"`` → ``("RTX 3090", 350000)``: a GPU model and a USD amount.

    The model is everything before the last ``=`` (stripped; it may hold
    spaces). Raises ValueError naming ``what`` for a missing ``=``, an empty
    model or a price that :func:`usd_to_micros` refuses.
    """
    model, sep, price = text.rpartition("=")
    model = model.strip()
    if not sep or not model or not price.strip():
        raise ValueError(f"{what}: expected MODEL=USD, e.g. 'RTX 3090=0.35', got {text!r}")
    try:
        return model, usd_to_micros(price)
    except ValueError as exc:
        raise ValueError(f"{what}: {model}: {exc}") from None


_TARIFF_LINE = re.compile(r"^(\d{1,2})-(\d{1,2})\s+(\S+)$")


def _window_hours(start: int, end: int) -> list[int]:
    """The UTC hours a window covers; ``22-6`` wraps past midnight."""
    return list(range(start, end)) if start < end else [*range(start, 24), *range(end)]


def parse_tariff_file(text: str) -> list[tuple[int, int, int]]:
    """Parse a time-of-use tariff table into ``(start_hour, end_hour, micros_per_kwh)`` windows.

    One window per line, ``START-END USD_PER_KWH`` with UTC hours, e.g.
    ``17-21 0.31`` (17:00 to 21:00) or ``22-6 0.08`` (wraps past midnight).
    ``START`` is 0-23, ``END`` is 1-24 and differs from ``START`` (``0-24`` is the
    whole day). ``#``
    starts a comment; blank lines are skipped. Windows must not overlap.
    Hours outside every window pay the farm's flat tariff. Raises ValueError
    whose message starts with ``line N:`` for the first bad line.
    """
    windows: list[tuple[int, int, int]] = []
    owner: dict[int, int] = {}  # hour -> line number of the window that covers it
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _TARIFF_LINE.match(line)
        if match is None:
            raise ValueError(
                f"line {number}: expected 'START-END USD_PER_KWH', e.g. '17-21 0.31', got {line!r}"
            )
        start, end = int(match[1]), int(match[2])
        if not 0 <= start <= 23:
            raise ValueError(f"line {number}: start hour must be 0-23 (got {start})")
        if not 1 <= end <= 24:
            raise ValueError(f"line {number}: end hour must be 1-24 (got {end})")
        if start == end:
            raise ValueError(f"line {number}: empty window {start}-{end}")
        try:
            price = usd_to_micros(match[3])
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        for hour in _window_hours(start, end):
            if hour in owner:
                raise ValueError(
                    f"line {number}: window {start}-{end} overlaps the window on "
                    f"line {owner[hour]} at hour {hour}"
                )
            owner[hour] = number
        windows.append((start, end, price))
    return windows


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A ``--since`` value to an aware UTC datetime.

    Either a duration back from ``now`` (``30m``, ``24h``, ``7d``, ``2w``,
    ``90s``) or an ISO-8601 date or time (``2025-01-31``,
    ``2025-01-31T12:00:00Z``, ``2025-01-31 12:00+02:00``); a time without a
    zone is UTC. Raises ValueError for anything else or for a time after ``now``.
    """
    now = now or datetime.now(UTC)
    value = text.strip()
    match = _DURATION.match(value)
    if match:
        try:
            return now - timedelta(**{_DURATION_UNITS[match[2]]: int(match[1])})
        except OverflowError:
            raise ValueError(f"since: too far back: {text!r}") from None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"since: expected a duration like 30m, 24h, 7d or an ISO-8601 time, got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when > now:
        raise ValueError(f"since: {text!r} is in the future")
    return when.astimezone(UTC)
