"""Replay a job trace through the real broker core, in virtual time, on simulated mining farms.

    .venv/bin/python benchmarks/trace_replay.py ../shared/traces/philly.csv --json
    .venv/bin/python benchmarks/trace_replay.py TRACE.csv --submit-col submitted \\
        --duration-col runtime --gpus-col gpus --fleet fleet.json --policy fifo --limit 5000

**Trace.** Any CSV with a submit time (a naive datetime, read as UTC, or seconds), a run
time in seconds and a GPU count; rows may be unsorted. ``--owner-col`` (default
``cluster`` when present) names the client a job belongs to. Rows that cannot be parsed
are counted as invalid. Jobs asking for more GPUs than the largest homogeneous group of
one rig cannot run on a marketplace that gangs a job on one rig; they are skipped and
counted, never dropped silently.

**What runs.** The broker's ``BrokerCore`` (``broker/core.py``; ``LeanView`` in
``benchmarks/replay/view.py``, injected through ``BrokerCore(view=...)``, changes only
what the scheduler is shown) receives the
events a live broker would: ``FarmConfigured`` and ``WorkerRegistered`` at the start;
``JobSubmitted`` at each submit time; one ``SchedulePass`` after each batch of events
that share a virtual second (skipped when it could place nothing); ``AttemptStarted`` as
soon as an ``Assign`` comes out; ``AttemptFinished`` (exit 0) the job's run time later,
with the energy of a simple power model: board watts of the GPU model
(``rigshift.catalogue``, or the rig's ``watts``) x run time x GPUs. So pricing,
settlement into the ledger, SLA events and reliability run for real. No rig fails; no
job is spot unless ``--spot-percent`` says so (then guaranteed work may preempt it).

**Fleet file** (``--fleet``), JSON; money as strings or numbers in USD (converted to
integer micro-dollars exactly), optional keys in brackets::

    {"farms": [{
        "farm_id": "quebec",
        "tariff_usd_per_kwh": "0.045",           "pue": "1.10",
        ["tariff_windows": [[17, 21, "0.14"]],]   # UTC hours [start, end) at their own price
        ["broker_fee_percent": "10",]  ["margin_usd_per_gpu_hour": "0.005",]
        "mining_usd_per_kwh": {"RTX 3090": "0.11"},       # the mining alternative per model
        "ask_usd_per_gpu_hour": {"RTX 3090": "0.24"},      # per model; must be >= the floor
        "rigs": [{"model": "RTX 3090", "gpus": 8, "count": 6, ["watts": 350,] ["vram_mb": 24576,]
                  ["pcie_link_width": 1,] ["pcie_gbps": 0.8]}]
    }]}

``pcie_link_width`` (default 16; 1 on a mining riser) and ``pcie_gbps`` (the measured
host-to-device bandwidth per GPU; without it the broker estimates 0.8 GB/s per lane) make
a fleet that mixes riser and x16 rigs of one model and price
(``benchmarks/fleets/riser_mix.json``).

Without ``--fleet`` the :data:`DEFAULT_FLEET` below is used (six farms, 87 rigs, 600 GPUs);
``--fleet-scale X`` multiplies every rig count (to see how the figures move with contention).

**Policies** (``--policy``, repeatable; all but the oracle by default):

* ``fifo`` — strict FIFO first fit, no backfilling: a pass stops at the first job that
  does not fit (head-of-line blocking);
* ``default`` — the broker's default (``--queue-policy fifo``): guaranteed before spot,
  FIFO order, greedy backfill, price then best fit then reliability;
* ``short-first`` — the broker with ``--queue-policy short-first``
  (``broker.policy.SHORT_FIRST``): smallest declared GPU time first with bounded aging.
  Philly declares no run-time limits, so each job is submitted with
  ``max_duration_seconds`` = what its owner's finished jobs predict
  (``benchmarks/replay/estimator.py``), never the trace's duration;
* ``short-first-oracle`` — the same order with the true run time declared: an oracle, a
  bound no broker can reach.

**Scoring** (``--scoring``, repeatable; default ``topology``): ``topology`` is the broker's
choice (gangs to the widest links, single GPUs to the narrowest, at equal price);
``price`` the choice before issue 15, links ignored. ``--gang-slowdown-on-risers X``: a
multi-GPU job placed on a riser rig (under 2 GB/s per GPU) runs X times its trace duration
(default 1: links cost nothing; an assumption, not a measurement). Every replayed job
accepts unverified GPUs (the simulated rigs run no self-test).

**Power policy** (``--power-policy max|efficient``, repeatable; default ``max``;
``--max-slowdown-percent P``, repeatable, default 10): every simulated GPU registers the
simulated power curve of its model (``rigshift.power``: throughput ``1 - 0.9 (1 - f)^2``
at a cap of f x board watts, draw min(board watts, cap)) with a settable limit;
``efficient`` sets every farm's policy to EFFICIENT at each P, so the broker picks each
GPU's cap (``choose_limit``) and the replay runs the job 1000 / the throughput ratio
times its trace duration at the capped draw (``benchmarks/replay/power.py``). The power
table adds kWh, kWh saved against the same GPU time uncapped, billed GPU-hours, revenue
and revenue per kWh per setting.

**Curtailment** (``--curtail FARM:DAYS:START-END``, repeatable, e.g.
``busiest:weekdays:16-19``; ``busiest`` is the farm with the most GPUs, DAYS ``weekdays``
or ``all``, hours UTC): the core gets each window as a live broker does
(``CurtailmentScheduled``, a day ahead of its start) and a ``Tick`` at its start and end
(``benchmarks/replay/curtail.py``). Before the window the core's own rules keep work that
would overlap it off the farm; at its start it stops the farm's spot attempts (and
guaranteed ones with ``--curtail-guaranteed``) and requeues them. The replay meters each
stopped attempt's energy up to then (the agent's last progress report) and ends it as the
agent would (SIGTERM, exit 143). **Assumption:** the job checkpoints on SIGTERM (the SDK's
on-demand checkpoint), so no work is lost: its next attempt runs the trace duration minus
the work its earlier attempts did. ``--spot-percent P`` submits P % of the jobs (spread
evenly) as spot; ``--demand-response-usd-per-mwh`` (default 50) is every farm's
demand-response price. Each run is replayed with and without the windows, both with the
full scheduling view (the lean one leaves out a farm with a window coming, which the core
places on itself). The curtailment table: windows started, curtailed GPU-hours and kWh
not drawn (``broker.curtailed``: the farm's GPUs over each window, average AI draw minus
idle draw), demand-response income, attempts stopped (spot / guaranteed), the credits
the farm paid for stopped guaranteed work (the core credits the work since the last
*reported* checkpoint: the SIGTERM checkpoint is not reported to it), and the change in
mean JCT and utilisation against the same run without windows.

Policies run in parallel processes (``--processes``, default 2). The replay engine is the
``benchmarks/replay`` package; this script is its command line and report.

**Figures per policy.** Utilisation (GPU-seconds run / (fleet GPUs x (last finish - first
submit))); job completion time (JCT = finish - submit) mean/p50/p99; queueing delay (first
start - submit) mean/p99/max; SLA breaches (``START_DEADLINE_MISSED`` events, 60 s deadline)
and their credits; farm revenue per kWh against the mining alternative per kWh, both from
``broker.earnings``; jobs finished and skipped. ``--json``: the last line is
``{"policies": {"fifo": {"mean_jct_s": ...}, ...}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replay import (
    DEFAULT_FLEET,
    DEFAULT_POLICIES,
    MAX,
    POLICIES,
    SCORINGS,
    CurtailSpec,
    Fleet,
    Outcome,
    PowerSetting,
    Trace,
    build_fleet,
    busiest_farm,
    load_trace,
    parse_curtail,
    replay,
)

__all__ = [
    "DEFAULT_FLEET",
    "POLICIES",
    "Fleet",
    "Outcome",
    "Trace",
    "build_fleet",
    "format_curtail_table",
    "format_power_table",
    "format_table",
    "load_trace",
    "main",
    "parse_curtails",
    "replay",
]


_JOB: tuple[Trace, Fleet, float, int, int, bool] | None = None  # what forked workers replay

Run = tuple[str, str, PowerSetting, tuple[CurtailSpec, ...]]


def _run_one(run: Run) -> Outcome:
    assert _JOB is not None
    trace, fleet, slowdown, spot_percent, dr_micros, lean = _JOB
    policy, scoring, power, curtail = run
    outcome, _ = replay(
        trace,
        fleet,
        policy,
        scoring=scoring,
        gang_slowdown=slowdown,
        power=power,
        curtail=curtail,
        spot_percent=spot_percent,
        demand_response_micros_per_mwh=dr_micros,
        lean=lean,
    )
    outcome.jct_s, outcome.duration_s = [], []
    return outcome


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f}"


def _label(o: Outcome) -> str:
    extra = ([] if o.power == "max" else [o.power]) + (["curtailed"] if o.curtail else [])
    return f"{o.policy} ({', '.join(extra)})" if extra else o.policy


def format_table(outcomes: Sequence[Outcome]) -> str:
    """Markdown table, one row per policy; times in hours."""
    head = (
        "| policy | scoring | util | mean JCT h | p50 JCT h | p99 JCT h | mean queue h "
        "| p99 queue h | max queue h | SLA breaches | credits $ | rev $/kWh | mining $/kWh "
        "| finished | skipped | gangs on risers | singles on x16 | replay s |"
    )
    lines = [head, "|---|---" + "|--:" * 16 + "|"]
    for o in outcomes:
        lines.append(
            f"| {_label(o)} | {o.scoring} "
            f"| {o.utilisation:.1%} | {_hours(o.mean_jct_s)} "
            f"| {_hours(o.p50_jct_s)} | {_hours(o.p99_jct_s)} | {_hours(o.mean_queue_s)} "
            f"| {_hours(o.p99_queue_s)} | {_hours(o.max_queue_s)} | {o.sla_breaches:,} "
            f"| {o.sla_credits_usd:,.0f} "
            f"| {o.revenue_usd_per_kwh:.4f} | {o.mining_usd_per_kwh:.4f} | {o.finished:,} "
            f"| {o.skipped:,} | {o.gangs_on_risers:,} | {o.singles_on_x16:,} | {o.replay_s:.1f} |"
        )
    return "\n".join(lines)


def format_power_table(outcomes: Sequence[Outcome]) -> str:
    """Markdown table, one row per policy and power setting: JCT, energy, revenue."""
    head = (
        "| policy | power | mean JCT h | p50 JCT h | p99 JCT h | GPU-h | kWh | kWh saved "
        "| revenue $ | rev $/kWh | finished |"
    )
    lines = [head, "|---|---" + "|--:" * 9 + "|"]
    for o in outcomes:
        lines.append(
            f"| {o.policy} | {o.power} | {_hours(o.mean_jct_s)} | {_hours(o.p50_jct_s)} "
            f"| {_hours(o.p99_jct_s)} | {o.gpu_hours:,.0f} | {o.kwh:,.0f} | {o.kwh_saved:,.0f} "
            f"| {o.revenue_usd:,.0f} | {o.revenue_usd_per_kwh:.4f} | {o.finished:,} |"
        )
    return "\n".join(lines)


def format_curtail_table(outcomes: Sequence[Outcome]) -> str:
    """Markdown table, one row per curtailed run: what the windows cost and earned, and
    the change in mean JCT and utilisation against the same run without windows."""
    base = {(o.policy, o.scoring, o.power): o for o in outcomes if not o.curtail}
    head = (
        "| policy | curtail | windows | curtailed GPU-h | kWh not drawn | DR income $ "
        "| stopped spot | stopped guaranteed | farm credits $ | mean JCT h | \u0394 mean JCT "
        "| util | \u0394 util | finished |"
    )
    lines = [head, "|---|---" + "|--:" * 12 + "|"]
    for o in outcomes:
        if not o.curtail:
            continue
        b = base.get((o.policy, o.scoring, o.power))
        d_jct = f"{(o.mean_jct_s / b.mean_jct_s - 1):+.1%}" if b and b.mean_jct_s else "-"
        d_util = f"{(o.utilisation - b.utilisation) * 100:+.2f} pt" if b else "-"
        lines.append(
            f"| {o.policy} | {o.curtail} | {o.curtail_windows:,} | {o.curtailed_gpu_hours:,.0f} "
            f"| {o.kwh_not_drawn:,.0f} | {o.demand_response_usd:,.2f} | {o.interrupted_spot:,} "
            f"| {o.interrupted_guaranteed:,} | {o.curtail_credits_usd:,.2f} "
            f"| {_hours(o.mean_jct_s)} | {d_jct} | {o.utilisation:.1%} | {d_util} "
            f"| {o.finished:,} |"
        )
    return "\n".join(lines)


def parse_curtails(values: Sequence[str] | None, include_guaranteed: bool) -> list[CurtailSpec]:
    """The ``--curtail`` values as schedules (argparse error text on a bad one)."""
    out = []
    for v in values or []:
        try:
            spec = parse_curtail(v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        out.append(replace(spec, include_guaranteed=include_guaranteed))
    return out


def power_settings(
    policies: Sequence[str] | None, slowdowns: Sequence[int] | None
) -> list[PowerSetting]:
    """The power settings to replay: ``max`` once, ``efficient`` at each slowdown."""
    out: list[PowerSetting] = []
    for policy in policies or ["max"]:
        if policy == "max":
            out.append(MAX)
        else:
            out += [PowerSetting("efficient", p) for p in slowdowns or [10]]
    return list(dict.fromkeys(out))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--submit-col", default="timestamp")
    p.add_argument("--duration-col", default="duration")
    p.add_argument("--gpus-col", default="num_gpus")
    p.add_argument("--owner-col", default="cluster")
    p.add_argument("--fleet", help="JSON fleet file (format in the module docstring)")
    p.add_argument("--fleet-scale", type=float, default=1.0, help="multiply every rig count")
    p.add_argument(
        "--policy",
        action="append",
        choices=POLICIES,
        help="repeatable; default: " + ", ".join(DEFAULT_POLICIES),
    )
    p.add_argument(
        "--scoring",
        action="append",
        choices=SCORINGS,
        help="repeatable; default: topology (price: links ignored, as before issue 15)",
    )
    p.add_argument(
        "--gang-slowdown-on-risers",
        type=float,
        default=1.0,
        help="a multi-GPU job on a riser rig runs this many times its trace duration",
    )
    p.add_argument(
        "--power-policy",
        action="append",
        choices=("max", "efficient"),
        help="repeatable; default: max (board limits)",
    )
    p.add_argument(
        "--max-slowdown-percent",
        action="append",
        type=int,
        choices=range(51),
        metavar="P",
        help="with --power-policy efficient, repeatable (0-50); default: 10",
    )
    p.add_argument(
        "--curtail",
        action="append",
        metavar="FARM:DAYS:START-END",
        help="repeatable: FARM (or busiest) curtails on DAYS (weekdays|all) from START to "
        "END o'clock UTC, e.g. busiest:weekdays:16-19; each run is also replayed without",
    )
    p.add_argument(
        "--curtail-guaranteed",
        action="store_true",
        help="the windows stop guaranteed attempts too (--include-guaranteed)",
    )
    p.add_argument(
        "--spot-percent",
        type=int,
        default=0,
        choices=range(101),
        metavar="P",
        help="submit P %% of the jobs (spread evenly) as spot (default 0)",
    )
    p.add_argument(
        "--demand-response-usd-per-mwh",
        type=float,
        default=50.0,
        help="every farm's demand-response price per MWh not drawn (default 50)",
    )
    p.add_argument("--limit", type=int, default=0, help="first N valid rows by submit time")
    p.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        curtails = tuple(parse_curtails(a.curtail, a.curtail_guaranteed))
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    wall = time.perf_counter()
    spec = json.loads(Path(a.fleet).read_text()) if a.fleet else DEFAULT_FLEET
    fleet = build_fleet(spec, a.fleet_scale)
    trace = load_trace(
        a.trace,
        submit_col=a.submit_col,
        duration_col=a.duration_col,
        gpus_col=a.gpus_col,
        owner_col=a.owner_col,
        max_gang=fleet.max_gang,
        limit=a.limit,
    )
    policies = a.policy or list(DEFAULT_POLICIES)
    scorings = a.scoring or ["topology"]
    settings = power_settings(a.power_policy, a.max_slowdown_percent)
    windows: list[tuple[CurtailSpec, ...]] = [(), curtails] if curtails else [()]
    runs = [(p, s, w, c) for p in policies for s in scorings for w in settings for c in windows]
    if curtails:
        busiest_farm(fleet)  # fails early on an empty fleet
    global _JOB
    dr_micros = round(a.demand_response_usd_per_mwh * 1_000_000)
    # With windows every pass sees the whole queue (``replay``); so does the run without
    # them it is compared with.
    lean = not curtails
    _JOB = (trace, fleet, a.gang_slowdown_on_risers, a.spot_percent, dr_micros, lean)
    if a.processes > 1 and len(runs) > 1:
        context = multiprocessing.get_context("fork")  # the workers inherit _JOB, unpickled
        with ProcessPoolExecutor(min(a.processes, len(runs)), mp_context=context) as pool:
            outcomes = list(pool.map(_run_one, runs))
    else:
        outcomes = [_run_one(run) for run in runs]
    wall = time.perf_counter() - wall
    print(
        f"{trace.rows:,} rows: {len(trace.jobs):,} replayed, {trace.too_wide:,} skipped (more than "
        f"{fleet.max_gang} GPUs, the largest rig), {trace.invalid:,} invalid; fleet "
        f"{len(fleet.farms)} farms, {len(fleet.rigs)} rigs, {fleet.gpus} GPUs; wall {wall:.1f} s"
    )
    print(format_table(outcomes))
    if settings != [MAX]:
        print()
        print(format_power_table(outcomes))
    if curtails:
        print()
        print(format_curtail_table(outcomes))
    for o in outcomes:
        if o.ledger_problems:
            print(f"{o.policy}: LEDGER PROBLEMS {o.ledger_problems[:3]}")
    if a.json:
        summary = {
            "policies": {
                "/".join(
                    [o.policy]
                    + ([o.scoring] if len(scorings) > 1 else [])
                    + ([o.power] if len(settings) > 1 else [])
                    + (["curtail" if o.curtail else "none"] if curtails else [])
                ): o.figures()
                for o in outcomes
            },
            "rows": trace.rows,
            "skipped_too_wide": trace.too_wide,
            "invalid": trace.invalid,
            "fleet_gpus": fleet.gpus,
            "wall_s": round(wall, 2),
            "python": platform.python_version(),
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
