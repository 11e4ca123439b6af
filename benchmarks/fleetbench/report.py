"""Figures and their presentation: percentiles, the per-second timeline, the summary."""

from __future__ import annotations

import math
import sys
from typing import Any

from fleetbench.processes import Sampler

__all__ = ["human", "percentile", "print_timeline"]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list; NaN for an empty one."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def print_timeline(
    results: list[dict[str, Any]], sampler: Sampler | None, ws_wall: float, we_wall: float
) -> None:
    """Per second: heartbeats answered OK, failed, and broker CPU % (to stderr)."""
    merged: dict[int, list[int]] = {}
    for r in results:
        for sec, (ok, bad) in r["timeline"].items():
            m = merged.setdefault(int(sec), [0, 0])
            m[0] += ok
            m[1] += bad
    cpu = sampler.cpu_by_second() if sampler is not None else {}
    print(
        "t_s  heartbeats_ok  heartbeats_failed  broker_cpu_%  (t=0: window start)", file=sys.stderr
    )
    for sec in sorted(set(merged) | set(cpu)):
        ok, bad = merged.get(sec, (0, 0))
        mark = "*" if ws_wall <= sec < we_wall else " "
        print(
            f"{sec - int(ws_wall):+5d}{mark} {ok:7d} {bad:7d} {cpu.get(sec, float('nan')):7.1f}",
            file=sys.stderr,
        )


def human(r: dict[str, Any]) -> str:
    """A short readable summary."""
    return "\n".join(
        [
            f"agents {r['agents']} ({r['ready']} ready, registered in {r['register_s']} s), "
            f"{r['gpus_per_agent']} GPUs each, {r['processes']} load-generator process(es)",
            f"heartbeats/s {r['heartbeats_per_s']} (expected {r['expected_heartbeats_per_s']}), "
            f"latency p50 {r['heartbeat_p50_ms']} ms, p99 {r['heartbeat_p99_ms']} ms",
            f"jobs {r['jobs_submitted']} submitted at {r['submit_rate_per_s']}/s, "
            f"{r['jobs_assigned']} assigned, {r['jobs_finished']} finished; submit->assign "
            f"p50 {r['submit_to_assign_p50_ms']} ms, p99 {r['submit_to_assign_p99_ms']} ms",
            f"broker CPU {r['broker_cpu_percent']} %, RSS {r['broker_rss_mb']} MB "
            f"(peak {r['broker_rss_peak_mb']} MB); load generator CPU "
            f"{r['loadgen_cpu_percent']} %; other processes on the machine "
            f"{r['other_cpu_percent']} %",
            f"errors in the window {r['errors'] or 'none'}; outside it (registration, drain) "
            f"{r['errors_outside_window'] or 'none'}",
        ]
    )
