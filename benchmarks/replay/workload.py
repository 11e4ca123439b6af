"""The replay's inputs: a job trace read from CSV and a fleet of mining farms.

The trace and fleet formats are documented in ``benchmarks/trace_replay.py``; this module
parses them into frozen values (:class:`Trace`, :class:`Fleet`) and holds the
:data:`DEFAULT_FLEET`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from broker.economics import FarmTerms, TariffWindow, floor_price
from rigshift.catalogue import board_watts, vram_mb

__all__ = ["DEFAULT_FLEET", "Fleet", "Rig", "Trace", "TraceJob", "build_fleet", "load_trace"]

_MINING = {  # USD the GPU earns mining per kWh it draws, post-halving
    "RTX 3060": "0.14",
    "RTX 3070": "0.15",
    "RTX 3080": "0.10",
    "RTX 3090": "0.11",
    "RX 6800 XT": "0.13",
    "A4000": "0.16",
}
_ASK = {  # USD per GPU-hour, what such cards rent for on open marketplaces
    "RTX 3060": "0.10",
    "RTX 3070": "0.13",
    "RTX 3080": "0.17",
    "RTX 3090": "0.24",
    "RX 6800 XT": "0.12",
    "A4000": "0.15",
}


def _farm(
    farm_id: str, tariff: str, pue: str, rigs: list[tuple[str, int, int]], **extra: Any
) -> dict[str, Any]:
    return {
        "farm_id": farm_id,
        "tariff_usd_per_kwh": tariff,
        "pue": pue,
        "broker_fee_percent": "10",
        "margin_usd_per_gpu_hour": "0.005",
        "mining_usd_per_kwh": _MINING,
        "ask_usd_per_gpu_hour": _ASK,
        "rigs": [{"model": m, "gpus": g, "count": c} for m, g, c in rigs],
        **extra,
    }


#: Six farms, 87 rigs, 600 GPUs: 54 rigs of 8, 18 of 6 and 15 of 4. Philly's jobs of at
#: most 8 GPUs keep 323 GPUs busy on average (offered load 0.54), but in bursts of days
#: several times that: queues build up, and FIFO's build up for days.
DEFAULT_FLEET: dict[str, Any] = {
    "farms": [
        _farm("quebec", "0.045", "1.10", [("RTX 3090", 8, 9), ("RTX 3080", 6, 6)]),
        _farm(
            "texas",
            "0.06",
            "1.25",
            [("RTX 3080", 8, 9), ("RTX 3070", 8, 6), ("A4000", 4, 6)],
            tariff_windows=[[17, 21, "0.14"]],
        ),
        _farm("iceland", "0.05", "1.05", [("RTX 3090", 8, 6), ("RX 6800 XT", 6, 6)]),
        _farm("paraguay", "0.04", "1.30", [("RTX 3060", 8, 9), ("RTX 3070", 6, 6)]),
        _farm("kazakhstan", "0.035", "1.35", [("RTX 3060", 8, 6), ("RX 6800 XT", 8, 6)]),
        _farm("georgia", "0.055", "1.20", [("A4000", 4, 9), ("RTX 3080", 8, 3)]),
    ]
}


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One row of the trace."""

    job_id: str
    submit_s: float
    duration_s: float
    gpus: int
    owner: str


@dataclass(frozen=True, slots=True)
class Trace:
    """Runnable jobs sorted by submit time, and what was left out and why."""

    jobs: tuple[TraceJob, ...]
    rows: int
    invalid: int
    too_wide: int  # asked for more GPUs than any rig's largest homogeneous group


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        stamp = datetime.fromisoformat(text)
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def load_trace(
    path: str | Path,
    *,
    submit_col: str = "timestamp",
    duration_col: str = "duration",
    gpus_col: str = "num_gpus",
    owner_col: str = "cluster",
    max_gang: int = 8,
    limit: int = 0,
) -> Trace:
    """Read, validate and sort a trace; ``limit`` keeps the first N rows by submit time."""
    parsed: list[tuple[float, int, float, int, str]] = []
    invalid = 0
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for col in (submit_col, duration_col, gpus_col):
            if col not in header:
                raise SystemExit(f"{path}: no column {col!r} (has {header})")
        s, d, g = (header.index(c) for c in (submit_col, duration_col, gpus_col))
        o = header.index(owner_col) if owner_col in header else None
        for n, row in enumerate(reader):
            if not row:
                continue  # a blank line
            try:
                submit, duration, gpus = _parse_time(row[s]), float(row[d]), int(float(row[g]))
                owner = row[o] if o is not None else "trace"
            except (IndexError, ValueError):
                invalid += 1
                continue
            if not (math.isfinite(submit) and math.isfinite(duration)) or duration < 0 or gpus < 1:
                invalid += 1
                continue
            parsed.append((submit, n, duration, gpus, owner))
    parsed.sort()
    rows = len(parsed) + invalid
    if limit:
        parsed = parsed[:limit]
        rows = len(parsed)
        invalid = 0
    jobs = tuple(
        TraceJob(f"j{n:07d}", submit, duration, gpus, owner or "trace")
        for submit, n, duration, gpus, owner in parsed
        if gpus <= max_gang
    )
    return Trace(jobs, rows, invalid, len(parsed) - len(jobs))


def _micros(usd: object) -> int:
    return int(Decimal(str(usd)) * 1_000_000)


def _permille(value: object) -> int:
    return int(Decimal(str(value)) * 1000)


@dataclass(frozen=True, slots=True)
class Rig:
    """One simulated rig: a worker with ``gpus`` GPUs of one model."""

    worker_id: str
    farm_id: str
    model: str
    gpus: int
    watts: int
    vram_mb: int
    pcie_link_width: int = 16  # lanes per GPU: 1 on a mining riser
    pcie_mbps: int = 0  # measured host-to-device MB/s per GPU; 0: the broker estimates it

    @property
    def link_mbps(self) -> int:
        """Host-to-device MB/s per GPU: measured, else the broker's estimate (gen 3)."""
        return self.pcie_mbps or 800 * self.pcie_link_width


@dataclass(frozen=True, slots=True)
class Fleet:
    """Farm terms and rigs, ready to be fed to the core."""

    farms: tuple[FarmTerms, ...]
    rigs: tuple[Rig, ...]

    @property
    def gpus(self) -> int:
        """GPUs in the fleet."""
        return sum(r.gpus for r in self.rigs)

    @property
    def max_gang(self) -> int:
        """Most GPUs one job can get (one rig, one model)."""
        return max((r.gpus for r in self.rigs), default=0)


def build_fleet(spec: dict[str, Any], scale: float = 1.0) -> Fleet:
    """Fleet from the JSON structure documented above, every rig ``count`` times ``scale``
    (rounded); refuses asks under the floor."""
    farms: list[FarmTerms] = []
    rigs: list[Rig] = []
    for f in spec["farms"]:
        terms = FarmTerms(
            farm_id=f["farm_id"],
            tariff_micros_per_kwh=_micros(f.get("tariff_usd_per_kwh", 0)),
            pue_permille=_permille(f.get("pue", 1)),
            broker_fee_permille=_permille(f.get("broker_fee_percent", 10)) // 100,
            margin_micros_per_gpu_hour=_micros(f.get("margin_usd_per_gpu_hour", 0)),
            mining_micros_per_kwh=tuple(
                (m, _micros(v)) for m, v in sorted(f.get("mining_usd_per_kwh", {}).items())
            ),
            ask_micros_per_gpu_hour=tuple(
                (m, _micros(v)) for m, v in sorted(f.get("ask_usd_per_gpu_hour", {}).items())
            ),
            tariff_windows=tuple(
                TariffWindow(int(a), int(b), _micros(p)) for a, b, p in f.get("tariff_windows", ())
            ),
        )
        farms.append(terms)
        for r in f["rigs"]:
            model = r["model"]
            watts = int(r.get("watts", board_watts(model)))
            ask = terms.ask_for(model)
            floor = floor_price(terms, model, watts).floor_micros
            if ask is not None and ask < floor:
                raise SystemExit(f"farm {terms.farm_id}: ask {ask} for {model} under floor {floor}")
            for _ in range(round(int(r.get("count", 1)) * scale)):
                worker_id = f"{terms.farm_id}-{len(rigs):04d}"
                vram = int(r.get("vram_mb", vram_mb(model)))
                width = int(r.get("pcie_link_width", 16))
                mbps = round(float(r.get("pcie_gbps", 0)) * 1000)
                gpus = int(r["gpus"])
                rigs.append(Rig(worker_id, terms.farm_id, model, gpus, watts, vram, width, mbps))
    return Fleet(tuple(farms), tuple(rigs))
