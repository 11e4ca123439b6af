"""Benchmark of broker.scheduler.place() on a synthetic mining-farm fleet.

    .venv/bin/python benchmarks/scheduler_bench.py --workers 10000 --jobs 100000
    .venv/bin/python benchmarks/scheduler_bench.py --table
    .venv/bin/python benchmarks/scheduler_bench.py --core --workers 1000 --jobs 10000

Every worker has 8 GPUs. Most rigs are one model; 10% mix two models 4 + 4.
Each model is offered at three price levels, and about a sixth of the GPUs are
already busy. Jobs ask for 1, 2, 4 or 8 GPUs (40/30/20/10%); 30% name a model,
20% a minimum VRAM, 20% a price cap. Building the snapshot is timed apart from
place() (best of ``--repeat``); with ``--json`` the last line printed is one JSON object.

``--topology`` mixes the fleet as issue 15 sees it: half the rigs are mining rigs on x1
risers (0.8 GB/s, 4 GB RAM and 1 core per GPU), half x16 rigs (12.8 GB/s, 16 GB and 4 cores
per GPU); 10 % of the rigs are unverified (scores vary by rig, 90-110 in steps of 5);
30 % of the jobs accept unverified GPUs, 20 % set a ``min_pcie`` (1 or 8 GB/s), 10 % a
``min_score`` (100), 10 % a host RAM and 10 % a CPU minimum per GPU.

``--core`` times the whole scheduling pass of ``broker.core.BrokerCore`` instead (place on the
kept index, bind, preemption checks, the index brought up to date with the bound workers) on
the same fleet (every GPU free at the start) and jobs, all GUARANTEED: one first pass
that fills the fleet, then ``--passes`` steady passes, each after one attempt finished and
one job arrived (what a live broker does all day); it reports the median steady pass, and
the median of passes with nothing freed and with one attempt's GPUs freed (issue 17), and of
QuoteJob (``BrokerCore.quote``, guaranteed and spot) on the filled fleet. ``--view kept``
examines every queued job every pass (``KeptQueue``, the broker before issue 17); the
default is the broker's parking view (``broker.parking``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.core import BrokerCore
from broker.events import Assign, AttemptFinished, AttemptStarted, JobSubmitted, SchedulePass
from broker.events import WorkerRegistered as Registered
from broker.model import GpuInfo, JobSpec, Tier
from broker.queue import KeptQueue, job_request
from broker.scheduler import (
    FleetIndex,
    GpuSlot,
    JobRequest,
    SchedulingResult,
    Snapshot,
    WorkerCapacity,
    passes,
    place,
)
from broker.settlement import price_for
from rigshift.catalogue import CATALOGUE
from rigshift.scoring import Measurement, reference

FLEET_MODELS = ("RTX 3060", "RTX 3070", "RTX 3080", "RTX 3090", "RX 6800 XT", "A4000")
MODELS = {  # model: (VRAM MB, base ask in micro-dollars per GPU-hour), from rigshift.catalogue
    m.name: (m.vram_mb, m.default_price_micros_per_gpu_hour)
    for m in CATALOGUE
    if m.name in FLEET_MODELS
}
PRICE_STEPS = (-20_000, 0, 30_000)  # three price levels around each model's base ask
SHAPES = ((1, 0.4), (2, 0.3), (4, 0.2), (8, 0.1))
GPUS_PER_WORKER = 8


def build_workers(
    count: int, rnd: random.Random, topology: bool = False
) -> tuple[WorkerCapacity, ...]:
    """A fleet of ``count`` eight-GPU rigs (``topology``: see the module docstring)."""
    names = list(MODELS)
    workers = []
    for w in range(count):
        models = [rnd.choice(names)] * GPUS_PER_WORKER
        if rnd.random() < 0.1:
            models[4:] = [rnd.choice(names)] * 4
        step = rnd.choice(PRICE_STEPS)
        busy = rnd.choice((0, 0, 2, 4, 8)) if rnd.random() < 0.5 else 0  # ~17.5% busy
        gpus = tuple(
            GpuSlot(i, m, MODELS[m][0], MODELS[m][1] + step, i < GPUS_PER_WORKER - busy)
            for i, m in enumerate(models)
        )
        if not topology:
            workers.append(WorkerCapacity(f"w-{w:07d}", gpus))
            continue
        riser = rnd.random() < 0.5
        verified = rnd.random() >= 0.1
        score = rnd.choice((90, 95, 100, 105, 110))
        pcie = 800 if riser else 12_800
        gpus = tuple(replace(g, verified=verified, score=score, pcie_mbps=pcie) for g in gpus)
        ram, cpu = (4, 1000) if riser else (16, 4000)
        workers.append(
            WorkerCapacity(f"w-{w:07d}", gpus, ram_gb_per_gpu=ram, cpu_millicores_per_gpu=cpu)
        )
    return tuple(workers)


def build_jobs(count: int, rnd: random.Random, topology: bool = False) -> tuple[JobRequest, ...]:
    """``count`` pending jobs of mixed shapes and filters (``topology``: see the module
    docstring)."""
    names = list(MODELS)
    sizes = [s for s, _ in SHAPES]
    weights = [p for _, p in SHAPES]
    jobs = []
    for j in range(count):
        jobs.append(
            JobRequest(
                f"j-{j:08d}",
                rnd.choices(sizes, weights)[0],
                rnd.choice(names) if rnd.random() < 0.3 else "",
                rnd.choice((10_240, 16_384, 24_576)) if rnd.random() < 0.2 else 0,
                rnd.choice((150_000, 200_000, 260_000)) if rnd.random() < 0.2 else 0,
            )
        )
        if topology:
            jobs[-1] = replace(
                jobs[-1],
                allow_unverified=rnd.random() < 0.3,
                min_pcie_mbps=rnd.choice((1000, 8000)) if rnd.random() < 0.2 else 0,
                min_score=100 if rnd.random() < 0.1 else 0,
                min_ram_gb_per_gpu=8 if rnd.random() < 0.1 else 0,
                min_cpu_millicores_per_gpu=2000 if rnd.random() < 0.1 else 0,
            )
    return tuple(jobs)


def timed(snapshot: Snapshot) -> tuple[float, SchedulingResult]:
    """Seconds one place(snapshot) takes, from a freshly collected heap, and its result."""
    gc.collect()
    t0 = time.perf_counter()
    result = place(snapshot)
    return time.perf_counter() - t0, result


def run(
    workers: int, jobs: int, seed: int, repeat: int = 3, topology: bool = False
) -> dict[str, object]:
    """Build one snapshot, time place() on it (best of ``repeat``), return the figures.

    ``index_s`` is place() with an empty queue: indexing the fleet, paid once per pass.
    The two are timed alternately so that both see the same machine state.
    """
    rnd = random.Random(seed)
    t0 = time.perf_counter()
    snapshot = Snapshot(
        1_000.0, build_jobs(jobs, rnd, topology), build_workers(workers, rnd, topology)
    )
    build_s = time.perf_counter() - t0
    empty = Snapshot(snapshot.now, (), snapshot.workers)
    seconds = index_s = float("inf")
    for _ in range(repeat):
        index_s = min(index_s, timed(empty)[0])
        elapsed, result = timed(snapshot)
        seconds = min(seconds, elapsed)
    placed = len(result.placements)
    free = sum(g.free for w in snapshot.workers for g in w.gpus)
    return {
        "workers": workers,
        "jobs": jobs,
        "seed": seed,
        "topology": topology,
        "groups": len(FleetIndex(snapshot.workers)._groups),
        "free_gpus": free,
        "placements": placed,
        "gpus_placed": sum(len(p.gpu_indices) for p in result.placements),
        "unplaced": len(result.unplaced),
        "seconds": round(seconds, 4),
        "index_s": round(index_s, 4),
        "snapshot_build_s": round(build_s, 4),
        "placements_per_s": round(placed / seconds),
        "us_per_placement": round(seconds / placed * 1e6, 2) if placed else None,
        "us_per_job": round(seconds / jobs * 1e6, 2) if jobs else None,
        "us_per_job_after_index": round((seconds - index_s) / jobs * 1e6, 2) if jobs else None,
    }


def _spec(job: JobRequest) -> JobSpec:
    return JobSpec(
        command=("train",),
        gpu_count=job.gpu_count,
        gpu_model=job.gpu_model,
        min_vram_mb=job.min_vram_mb,
        max_price_micros_per_gpu_hour=job.max_price_micros_per_gpu_hour,
    )


def _healthy(model: str, vram_mb: int) -> Measurement | None:
    """A healthy card's self-test figures (its model's reference; None without one)."""
    ref = reference(model)
    return Measurement(ref.fp16_gflops, ref.fp32_gflops, vram_mb) if ref else None


def _old_spot_range(core: BrokerCore, spec: JobSpec) -> tuple[int, int]:
    """QuoteJob's spot price range as it was computed before issue 17 (a walk over every GPU
    of every worker in the matching groups), for the benchmark's comparison."""
    request = job_request("quote", spec, core.spot_permille)
    caps = core._caps
    prices: list[int] = []
    seen: set[str] = set()
    for group in caps.fleet.matching(request):
        for worker_id in caps.fleet.workers_in(group):
            if worker_id in seen:
                continue
            seen.add(worker_id)
            worker = core.workers[worker_id]
            capacity = caps.of[worker_id]
            for slot in capacity.gpus:
                if passes(request, slot, capacity):
                    floor = core.floor_of(worker, slot.index)
                    ask = slot.price_micros_per_gpu_hour
                    prices.append(price_for(Tier.SPOT, ask, floor, core.spot_permille))
    return min(prices, default=0), max(prices, default=0)


def core_run(
    workers: int, jobs: int, seed: int, passes: int = 20, view: str = "parking"
) -> dict[str, object]:
    """Time ``BrokerCore`` scheduling passes and QuoteJob (see the module docstring)."""
    rnd = random.Random(seed)
    queue = build_jobs(jobs + passes, rnd)
    fleet = build_workers(workers, rnd)
    core = BrokerCore(lease_ttl_s=1e12, view=KeptQueue() if view == "kept" else None)
    t0 = time.perf_counter()
    for w in fleet:
        gpus = tuple(
            GpuInfo(g.index, f"{w.worker_id}-{g.index}", g.model, g.vram_mb) for g in w.gpus
        )
        gpus = tuple(
            replace(
                info,
                price_micros_per_gpu_hour=g.price_micros_per_gpu_hour,
                measurement=_healthy(g.model, g.vram_mb),  # verified: ordinary jobs run on it
            )
            for info, g in zip(gpus, w.gpus, strict=True)
        )
        core.handle(Registered(0.0, w.worker_id, "farm", w.worker_id, "bench", gpus))
    for j in queue[:jobs]:
        core.handle(JobSubmitted(0.0, j.job_id, "bench", _spec(j)))
    build_s = time.perf_counter() - t0
    running: list[tuple[str, str]] = []

    def timed_pass(now: float) -> float:
        gc.collect()
        start = time.perf_counter()
        cmds = core.handle(SchedulePass(now))
        elapsed = time.perf_counter() - start
        for cmd in cmds:
            if isinstance(cmd, Assign):
                core.handle(AttemptStarted(now, cmd.worker_id, cmd.job_id, 1, 1))
                running.append((cmd.worker_id, cmd.job_id))
        return elapsed

    def finish_one(now: float) -> None:
        worker_id, job_id = running.pop(rnd.randrange(len(running)))
        core.handle(AttemptFinished(now, worker_id, job_id, 1, 2, 0))

    first_s = timed_pass(1.0)
    placed = len(running)
    idle, freed, steady = [], [], []
    for k in range(passes):
        now = 2.0 + 3 * k
        idle.append(timed_pass(now))  # nothing freed, nothing new
        finish_one(now + 1)
        freed.append(timed_pass(now + 1))  # one attempt's GPUs freed
        finish_one(now + 2)
        j = queue[jobs + k]
        core.handle(JobSubmitted(now + 2, j.job_id, "bench", _spec(j)))
        steady.append(timed_pass(now + 2))  # one freed and one new job
    quotes, cold = [], []
    for j in queue[:passes]:
        for tier in (Tier.GUARANTEED, Tier.SPOT):
            spec = replace(_spec(j), tier=tier)
            start = time.perf_counter()
            core.quote(spec)
            quotes.append(time.perf_counter() - start)
        # The spot price ranges as every spot quote computed them before issue 17: over
        # every GPU of the matching groups' workers.
        start = time.perf_counter()
        _old_spot_range(core, replace(_spec(j), tier=Tier.SPOT))
        cold.append(time.perf_counter() - start)

    def median_ms(xs: list[float]) -> float:
        return round(sorted(xs)[len(xs) // 2] * 1000, 3)

    return {
        "mode": "core",
        "view": view,
        "workers": workers,
        "jobs": jobs,
        "seed": seed,
        "placements_first_pass": placed,
        "pending_after": len(core.pending),
        "first_pass_s": round(first_s, 4),
        "idle_pass_ms": median_ms(idle),
        "freed_pass_ms": median_ms(freed),
        "steady_pass_ms": median_ms(steady),
        "steady_pass_max_ms": round(max(steady) * 1000, 2),
        "quote_ms": median_ms(quotes),
        "quote_max_ms": round(max(quotes) * 1000, 3),
        "quote_spot_cold_ms": median_ms(cold),
        "setup_s": round(build_s, 2),
    }


def summary(r: dict[str, object]) -> str:
    """The figures of one run as a few readable lines."""
    return (
        f"{r['workers']:,} workers x {GPUS_PER_WORKER} GPUs ({r['free_gpus']:,} free), "
        f"{r['jobs']:,} pending jobs, {r['groups']:,} groups"
        f"{' (mixed topology)' if r['topology'] else ''}\n"
        f"  placed {r['placements']:,} jobs on {r['gpus_placed']:,} GPUs, "
        f"{r['unplaced']:,} unplaced\n"
        f"  place(): {r['seconds']} s = {r['placements_per_s']:,} placements/s, "
        f"{r['us_per_placement']} us/placement, {r['us_per_job']} us/job\n"
        f"  of which indexing the fleet: {r['index_s']} s; "
        f"after it {r['us_per_job_after_index']} us/job\n"
        f"  snapshot build (not timed above): {r['snapshot_build_s']} s"
    )


def table(seed: int, repeat: int) -> str:
    """The grid of fleet and queue sizes as a markdown table."""
    grid = [(w, j) for w in (1_000, 10_000, 50_000) for j in (10_000, 100_000)]
    grid.append((10_000, 1_000_000))
    lines = [
        "| workers | jobs | placed | place() s | of it index s | placements/s "
        "| us/placement | us/job | us/job after index |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for w, j in grid:
        r = run(w, j, seed, repeat)
        lines.append(
            f"| {w:,} | {j:,} | {r['placements']:,} | {r['seconds']} | {r['index_s']} | "
            f"{r['placements_per_s']:,} | {r['us_per_placement']} | {r['us_per_job']} | "
            f"{r['us_per_job_after_index']} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="time the best of this many")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--table", action="store_true", help="run the grid, print markdown")
    parser.add_argument("--core", action="store_true", help="time BrokerCore passes instead")
    parser.add_argument(
        "--topology", action="store_true", help="a fleet of risers and x16 rigs (issue 15)"
    )
    parser.add_argument("--passes", type=int, default=20, help="--core: steady passes to time")
    parser.add_argument(
        "--view",
        choices=("parking", "kept"),
        default="parking",
        help="--core: the broker's view (parking) or every queued job every pass (kept)",
    )
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs")
    if args.core:
        c = core_run(args.workers, args.jobs, args.seed, args.passes, args.view)
        print(
            f"BrokerCore ({c['view']}), {c['workers']:,} workers x {GPUS_PER_WORKER} GPUs, "
            f"{c['jobs']:,} pending: first pass {c['first_pass_s']} s "
            f"({c['placements_first_pass']:,} placed); median pass with nothing freed "
            f"{c['idle_pass_ms']} ms, one attempt freed {c['freed_pass_ms']} ms, one freed and "
            f"one new job {c['steady_pass_ms']} ms (max {c['steady_pass_max_ms']} ms), with "
            f"{c['pending_after']:,} pending; QuoteJob median {c['quote_ms']} ms "
            f"(max {c['quote_max_ms']} ms; the spot range as computed before issue 17: "
            f"{c['quote_spot_cold_ms']} ms)"
        )
        if args.json:
            print(json.dumps(c))
        return
    if args.table:
        print(table(args.seed, args.repeat))
        return
    r = run(args.workers, args.jobs, args.seed, args.repeat, args.topology)
    print(summary(r))
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
