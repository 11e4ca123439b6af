"""What the broker holds after N finished jobs, and how long a restart takes (issue 17).

    .venv/bin/python benchmarks/memory_bench.py                 # 20,000 jobs
    .venv/bin/python benchmarks/memory_bench.py --jobs 2000 --json

N one-GPU jobs run to completion through a ``BrokerCore`` and a ``Store`` on a temporary
SQLite file: the events go straight into ``BrokerService.apply`` (no gRPC), so each batch is
saved in one transaction and, since issue 17, followed by ``JobsStored``. Each round submits
as many jobs as the fleet has GPUs (``--workers`` x 8, each with a request id), runs one
scheduling pass, reports every attempt started, then finished (exit 0). Afterwards it
reports the jobs the core holds, the memory they cost (tracemalloc: Python allocations
still live after a full collection; and the process's RSS growth), and the time
``Store.load`` takes to rebuild a fresh core from the database (best of ``--repeat``).
With ``--json`` the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.core import BrokerCore
from broker.events import (
    Assign,
    AttemptFinished,
    AttemptStarted,
    JobSubmitted,
    SchedulePass,
    WorkerRegistered,
)
from broker.model import GpuInfo, JobSpec
from broker.service import BrokerService
from broker.store import FarmRow, Store
from harness.broker_fixtures import healthy

GPUS_PER_WORKER = 8


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


async def run_jobs(svc: BrokerService, jobs: int, workers: int) -> float:
    """Run ``jobs`` one-GPU jobs to completion; returns the broker's clock at the end."""
    gpu = [
        GpuInfo(i, f"u{i}", "RTX 3090", 24576, 350, 300_000, measurement=healthy())
        for i in range(GPUS_PER_WORKER)
    ]
    for w in range(workers):
        await svc.apply(WorkerRegistered(0.0, f"w{w}", "f", f"rig-{w}", "1", tuple(gpu)))
    spec = JobSpec(command=("python", "train.py"), gpu_count=1)
    now, submitted = 1.0, 0
    while submitted < jobs:
        batch = min(workers * GPUS_PER_WORKER, jobs - submitted)
        await svc.apply(
            *(
                JobSubmitted(now, f"j{i:07d}", "alice", spec, f"r{i}")
                for i in range(submitted, submitted + batch)
            )
        )
        submitted += batch
        cmds = await svc.apply(SchedulePass(now))
        placed = [c for c in cmds if isinstance(c, Assign)]
        assert len(placed) == batch, f"placed {len(placed)} of {batch}"
        now += 1.0
        await svc.apply(*(AttemptStarted(now, a.worker_id, a.job_id, 1, 1) for a in placed))
        now += 60.0
        await svc.apply(
            *(
                AttemptFinished(now, a.worker_id, a.job_id, 1, 2, 0, energy_joules=18_000)
                for a in placed
            )
        )
        now += 1.0
    return now


def measure(jobs: int, workers: int, repeat: int, trace: bool) -> dict[str, object]:
    """Run the workload once and take the figures (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'broker.db'}"
        store = Store(url)
        store.create_farm(FarmRow(id="f", display_name="f", enrollment_token_sha256="x"))
        # As the broker builds it: no ledger in memory (issue 17). No ticks: leases never
        # expire here, and the reliability history (24 h) is not trimmed either.
        core = BrokerCore(lease_ttl_s=1e9, keep_ledger=False)
        gc.collect()
        rss0 = rss_bytes()
        if trace:
            tracemalloc.start()
        traced0 = tracemalloc.get_traced_memory()[0] if trace else 0
        started = time.perf_counter()

        async def go() -> float:
            svc = BrokerService(core, store, clock=lambda: 0.0)
            return await run_jobs(svc, jobs, workers)

        asyncio.run(go())
        run_s = time.perf_counter() - started
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - traced0 if trace else 0
        if trace:
            tracemalloc.stop()
        rss = rss_bytes() - rss0
        held = len(core.jobs)
        ledger_held = len(core.ledger)
        store.close()
        db_bytes = (Path(tmp) / "broker.db").stat().st_size
        loads = []
        loaded = 0
        for _ in range(repeat):
            again = BrokerCore()
            reader = Store(url)
            t0 = time.perf_counter()
            reader.load(again, now=1e9)
            loads.append(time.perf_counter() - t0)
            loaded = len(again.jobs)
            reader.close()
            del again
            gc.collect()
    return {
        "jobs": jobs,
        "workers": workers,
        "jobs_held_in_core": held,
        "ledger_legs_held_in_core": ledger_held,
        "tracemalloc_bytes": traced,
        "tracemalloc_bytes_per_job": round(traced / jobs, 1),
        "rss_delta_bytes": rss,
        "rss_delta_bytes_per_job": round(rss / jobs, 1),
        "run_s": round(run_s, 2),
        "store_load_s": round(min(loads), 4),
        "jobs_loaded": loaded,
        "db_bytes": db_bytes,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="Store.load runs (best of)")
    parser.add_argument("--no-tracemalloc", action="store_true", help="RSS only (faster)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = measure(args.jobs, args.workers, args.repeat, not args.no_tracemalloc)
    for key, value in figures.items():
        print(f"{key:>28}: {value:,}" if isinstance(value, int) else f"{key:>28}: {value}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
