"""Money and unit conversions for SDK users: :mod:`rigshift.units` under the client's name.

``from client.units import usd_to_micros`` (docs/client.md) keeps working; the one
definition lives in :mod:`rigshift.units`, which the broker and the agent share.
"""

from __future__ import annotations

from rigshift.units import (
    JOULES_PER_KWH,
    MIB_PER_GB,
    MICROS_PER_USD,
    format_permille_percent,
    format_price_per_gpu_hour,
    format_usd,
    gb_to_mib,
    joules_to_kwh,
    micros_to_usd,
    milliseconds_to_hours,
    parse_model_price,
    parse_since,
    parse_tariff_file,
    percent_to_permille,
    pue_to_permille,
    usd_to_micros,
)

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
