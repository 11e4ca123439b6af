"""The soak's drive loop: submit, match assignments, probe GetJob, count and sample.

Four asyncio tasks in the soak's process, against a broker and a load generator that are
already running: the submitter (CreateJob, at most ``pending`` jobs not yet assigned), the
poller (the load generator's assignments matched with the CreateJob answers:
submit->assign), the GetJob probe, and the counter (the broker's ``rigshift_jobs_completed``),
which takes a sample every ``sample_every`` jobs and ends the run at ``jobs``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

from rigshift.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from soakbench.probes import completed_jobs, database_bytes
from soakbench.series import START_JOBS, Interval, Series

__all__ = ["Drive"]

POLL_S = 0.02  # how often the soak asks the load generator for new assignments
PROBE_S = 0.1  # GetJob probe period (10/s: a reader, not a load)
COUNT_S = 0.5  # how often it reads the broker's completed-jobs counter


class Drive:
    """One run's traffic and its figures (``args`` as parsed by ``soak.py``)."""

    def __init__(
        self,
        args: argparse.Namespace,
        series: Series,
        run_index: int,
        address: str,
        api_key: str,
        metrics_url: str,
        conn: Any,
        broker_pid: int,
        loadgen_pid: int,
        sqlite: Path | None,
    ) -> None:
        self.args = args
        self.series = series
        self.run_index = run_index
        self.prior = series.jobs_completed
        self.address = address
        self.api_key = api_key
        self.metrics_url = metrics_url
        self.conn = conn  # the load generator's pipe
        self.broker = psutil.Process(broker_pid)
        self.loadgen = psutil.Process(loadgen_pid)  # its own memory grows with the jobs it saw
        self.sqlite = sqlite
        self.created: dict[str, float] = {}  # job name -> wall time CreateJob returned
        self.early: dict[str, float] = {}  # assigned before its CreateJob returned
        self.assigned = 0
        self.recent: collections.deque[str] = collections.deque(maxlen=1000)
        self.last_job = ""
        self.interval = Interval()
        # every latency of the run (ms), for the run's percentiles; 8 bytes a value
        self.all_s2a = array.array("d")
        self.all_create = array.array("d")
        self.all_get = array.array("d")
        self.errors: collections.Counter[str] = collections.Counter()
        self.progress = asyncio.Event()

    def _query(self) -> list[tuple[str, float]]:
        self.conn.send(("query",))
        if not self.conn.poll(30.0):
            raise RuntimeError("the load generator stopped answering")
        kind, items = self.conn.recv()
        assert kind == "assigned"
        return list(items)

    def _assigned(self, name: str, at: float) -> None:
        returned = self.created.pop(name, None)
        if returned is None:
            self.early[name] = at
        else:
            self._s2a(max(0.0, at - returned) * 1000)
        self.assigned += 1
        self.recent.append(name)
        self.last_job = name

    def _s2a(self, ms: float) -> None:
        self.interval.submit_to_assign.append(ms)
        self.all_s2a.append(ms)

    async def poll_assignments(self, done: asyncio.Event) -> None:
        """Match the agents' assignments with the jobs created (submit->assign)."""
        while not done.is_set():
            for name, at in await asyncio.to_thread(self._query):
                self._assigned(name, at)
            self.progress.set()
            await asyncio.sleep(POLL_S)

    async def submit(self, stub: job_service_pb2_grpc.JobServiceStub) -> None:
        """CreateJob ``--jobs`` times, at most ``--pending`` not yet assigned."""
        a = self.args
        metadata = (("authorization", f"Bearer {self.api_key}"),)
        limit = asyncio.Semaphore(a.concurrency)
        spec = job_pb2.JobSpec(
            display_name="soak", command=["true"], gpu_count=1, max_duration_seconds=60
        )

        async def one(i: int) -> None:
            request = job_service_pb2.CreateJobRequest(
                spec=spec, request_id=f"soak-{self.run_index}-{i}"
            )
            try:
                t0 = time.time()
                job = await stub.CreateJob(request, metadata=metadata, timeout=60.0)
                t1 = time.time()
            except grpc.aio.AioRpcError as err:
                self.errors[f"CreateJob:{err.code().name}"] += 1
                return
            finally:
                limit.release()
            ms = (t1 - t0) * 1000
            self.interval.create.append(ms)
            self.all_create.append(ms)
            at = self.early.pop(job.name, None)
            if at is None:
                self.created[job.name] = t1
            else:
                self._s2a(0.0)

        tasks: set[asyncio.Task[None]] = set()
        for i in range(a.jobs):
            while i - self.assigned >= a.pending:
                self.progress.clear()
                await self.progress.wait()
            await limit.acquire()
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def probe(self, stub: job_service_pb2_grpc.JobServiceStub, done: asyncio.Event) -> None:
        """GetJob a recently assigned job every PROBE_S (the read path's latency)."""
        metadata = (("authorization", f"Bearer {self.api_key}"),)
        rnd = random.Random(self.args.seed)
        while not done.is_set():
            await asyncio.sleep(PROBE_S)
            if not self.recent:
                continue
            name = self.recent[rnd.randrange(len(self.recent))]
            t0 = time.time()
            try:
                await stub.GetJob(job_service_pb2.GetJobRequest(name=name), metadata=metadata)
            except grpc.aio.AioRpcError as err:
                self.errors[f"GetJob:{err.code().name}"] += 1
                continue
            ms = (time.time() - t0) * 1000
            self.interval.get.append(ms)
            self.all_get.append(ms)

    def sample(self, run_completed: int, started: float, last: tuple[float, int]) -> None:
        """Record one sample of the series (and reset the interval)."""
        now = time.monotonic()
        rss = self.broker.memory_info().rss
        loadgen_rss = self.loadgen.memory_info().rss
        dt = now - last[0]
        self.series.add_sample(
            {
                "run": self.run_index,
                "jobs_completed": self.prior + run_completed,
                "run_jobs_completed": run_completed,
                "wall_s": round(now - started, 2),
                "rss_mb": round(rss / 2**20, 1),
                "loadgen_rss_mb": round(loadgen_rss / 2**20, 1),
                "db_bytes": database_bytes(self.sqlite, self.args.database_url),
                "lifecycles_per_s": round((run_completed - last[1]) / dt, 1) if dt > 0 else None,
                **self.interval.figures(),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
        )
        self.interval = Interval()
        s = self.series.samples[-1]
        print(
            f"  {s['jobs_completed']:>9,} jobs  rss {s['rss_mb']:7.1f} MB  "
            f"db {s['db_bytes'] / 2**20:8.1f} MB  {s['lifecycles_per_s'] or 0:6.1f}/s  "
            f"p99 s->a {s['submit_to_assign_p99_ms']} ms  create {s['create_job_p99_ms']} ms  "
            f"get {s['get_job_p99_ms']} ms  load {s['loadavg_1m']}",
            file=sys.stderr,
            flush=True,
        )

    async def count(self, done: asyncio.Event, base: int, started: float) -> None:
        """Read the broker's completed counter; sample on the way; set ``done`` at --jobs."""
        a = self.args
        every = a.sample_every or max(100, a.jobs // 100)
        next_at = every
        start_sample_due = self.prior < START_JOBS
        last = (started, 0)
        deadline = math.inf
        while True:
            await asyncio.sleep(COUNT_S)
            n = await asyncio.to_thread(completed_jobs, self.metrics_url) - base
            crossed = start_sample_due and self.prior + n >= START_JOBS
            if n >= next_at or crossed or n >= a.jobs:
                self.sample(n, started, last)
                last = (time.monotonic(), n)
                start_sample_due = start_sample_due and not crossed
                while next_at <= n:
                    next_at += every
            if n >= a.jobs:
                done.set()
                return
            if self.assigned >= a.jobs and deadline == math.inf:
                deadline = time.monotonic() + 120.0  # every job reached an agent
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n} of {a.jobs} jobs completed 120 s after the last")

    async def run(self) -> float:
        """Submit, poll, probe and count until --jobs completed; return the wall seconds."""
        base = await asyncio.to_thread(completed_jobs, self.metrics_url)
        done = asyncio.Event()
        started = time.monotonic()
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            tasks = [
                asyncio.create_task(self.poll_assignments(done)),
                asyncio.create_task(self.probe(stub, done)),
                asyncio.create_task(self.count(done, base, started)),
                asyncio.create_task(self.submit(stub)),
            ]
            try:
                await tasks[2]  # the counter ends the run
                await tasks[3]
            finally:
                done.set()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return time.monotonic() - started

    # --- the restart ---------------------------------------------------------------------
