"""Dispatch benchmark: submit → process-start latency and throughput of broker + agent + Ray.

A real broker (``rigshift broker serve``, SQLite) and one real agent
(``rigshift agent run --simulate RTX3090xN``, local Ray head) on loopback. The
jobs ask for one GPU each; each job's first act is to record the wall-clock time
it started (``sh -c 'date +%s%N > …'``), then it sleeps ``--job-seconds``.

* back to back (default): all jobs submitted as fast as one client can
  (``--submitters N``: N client threads);
* ``--idle``: one job at a time into an empty queue (the next is submitted
  after the previous one finished).

Reported: submit→process-start latency p50/p90/p99, makespan (first submit to
last job end as the broker recorded it) and jobs/s, with the latency broken
down into broker dispatch (submit → bound to GPUs) and agent/Ray start (bound →
process running). With ``--json`` the last line is one JSON object.

Other modes:

* ``--ray-paths``: in-process comparison of how to start a job's process:
  bare subprocess, a Ray task wrapping a subprocess (the agent's path) and the
  Ray Jobs API, with Ray token authentication on;
* ``--footprint``: the agent's own idle CPU share and RSS, with Ray and without.

Usage::

    python benchmarks/dispatch_bench.py --gpus 8 --jobs 200 --job-seconds 0.1
    python benchmarks/dispatch_bench.py --idle --jobs 30
    python benchmarks/dispatch_bench.py --jobs 1000 --job-seconds 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.fleet import LocalFleet


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def _ts(t: Any) -> float:
    return t.seconds + t.nanos / 1e9


def run_dispatch(args: argparse.Namespace) -> dict[str, Any]:
    """Start broker + agent, run the jobs, return the figures."""
    from rigshift.v1 import job_pb2

    root = Path(tempfile.mkdtemp(prefix="rigshift-dispatch-"))
    out = root / "starts"
    out.mkdir()
    fleet = LocalFleet(root)
    try:
        fleet.start_broker(lease_ttl_s=15, heartbeat_interval_s=3, rate_limit_per_s=0)
        client = fleet.client()
        farm = client.create_farm("bench-farm")
        fleet.start_agent(
            "bench-rig",
            farm.enrollment_token,
            simulate=f"RTX3090x{args.gpus}",
            executor=args.executor,
            log_level="WARNING",
        )
        fleet.wait_workers(1, timeout_s=120)
        time.sleep(1.0)  # let the freshly started Ray workers settle
        script = f'date +%s%N > "{out}/$RIGSHIFT_JOB_ID"'
        if args.job_seconds > 0:
            script += f"; sleep {args.job_seconds}"
        command = ["sh", "-c", script]
        terminal = {job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED, job_pb2.Job.CANCELLED}
        submitted: dict[str, float] = {}

        def wait_all(names: list[str], timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            pending = set(names)
            while pending and time.monotonic() < deadline:
                page = client.list_jobs(page_size=1000)
                pending -= {j.name for j in page.jobs if j.state in terminal}
                time.sleep(0.05)
            if pending:
                raise RuntimeError(f"{len(pending)} jobs did not finish")

        if args.idle:
            for _ in range(args.jobs):
                t = time.time()
                name = client.create_job(command).name
                submitted[name] = t
                job_id = name.split("/")[1]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if client.get_job(name).state in terminal:
                        break
                    time.sleep(0.005 if (out / job_id).exists() else 0.002)
                time.sleep(0.2)  # an empty, quiet queue before the next one
        else:
            from concurrent.futures import ThreadPoolExecutor

            def submit_one(_: int) -> None:
                t = time.time()
                submitted[client.create_job(command).name] = t

            with ThreadPoolExecutor(args.submitters) as pool:
                list(pool.map(submit_one, range(args.jobs)))
            wait_all(list(submitted), timeout_s=60 + args.jobs * (args.job_seconds + 0.5))

        rows = []
        for name, t_submit in submitted.items():
            job = client.get_job(name)
            if job.state != job_pb2.Job.SUCCEEDED:
                raise RuntimeError(f"{name} ended {job_pb2.Job.State.Name(job.state)}")
            attempt = job.attempts[0]
            started = int((out / name.split("/")[1]).read_text()) / 1e9
            rows.append(
                {
                    "gpu": attempt.gpu_indices[0],
                    "submit": t_submit,
                    "bound": _ts(attempt.schedule_time),
                    "start": started,
                    "end": _ts(attempt.end_time),
                }
            )
    finally:
        fleet.stop()
    latency = [(r["start"] - r["submit"]) * 1000 for r in rows]
    dispatch = [(r["bound"] - r["submit"]) * 1000 for r in rows]
    agent = [(r["start"] - r["bound"]) * 1000 for r in rows]
    finish = [(r["end"] - r["start"] - args.job_seconds) * 1000 for r in rows]
    # On each GPU: from the broker recording an attempt's end to binding the next one.
    regap = []
    for gpu in {r["gpu"] for r in rows}:
        on_gpu = sorted((r for r in rows if r["gpu"] == gpu), key=lambda r: r["bound"])
        regap += [
            (b["bound"] - a["end"]) * 1000
            for a, b in itertools.pairwise(on_gpu)
            if b["submit"] < a["end"]  # only when the next job was already waiting
        ]
    makespan = max(r["end"] for r in rows) - min(r["submit"] for r in rows)
    return {
        "mode": "idle" if args.idle else "back-to-back",
        "executor": args.executor,
        "submitters": args.submitters,
        "gpus": args.gpus,
        "jobs": args.jobs,
        "job_seconds": args.job_seconds,
        "start_latency_p50_ms": round(pct(latency, 50), 1),
        "start_latency_p90_ms": round(pct(latency, 90), 1),
        "start_latency_p99_ms": round(pct(latency, 99), 1),
        "broker_dispatch_p50_ms": round(pct(dispatch, 50), 1),
        "broker_dispatch_p99_ms": round(pct(dispatch, 99), 1),
        "agent_start_p50_ms": round(pct(agent, 50), 1),
        "agent_start_p99_ms": round(pct(agent, 99), 1),
        "finish_report_p50_ms": round(pct(finish, 50), 1),
        "finish_report_p99_ms": round(pct(finish, 99), 1),
        "gpu_rebind_p50_ms": round(pct(regap, 50), 1) if regap else None,
        "gpu_rebind_p99_ms": round(pct(regap, 99), 1) if regap else None,
        "submit_phase_s": round(max(submitted.values()) - min(submitted.values()), 3),
        "makespan_s": round(makespan, 3),
        "jobs_per_s": round(len(rows) / makespan, 1),
    }


def run_ray_paths(n: int) -> dict[str, Any]:
    """Median submit→process-start for a bare subprocess, a Ray task and the Ray Jobs API."""
    import asyncio
    import shlex
    import subprocess

    from worker_agent.executor import LaunchSpec, RayExecutor

    root = Path(tempfile.mkdtemp(prefix="rigshift-raypaths-"))

    def stamp(path: Path) -> list[str]:
        return ["sh", "-c", f'date +%s%N > "{path}"']

    def started(path: Path) -> float:
        while not path.exists() or not path.read_text().strip():
            time.sleep(0.001)
        return int(path.read_text()) / 1e9

    async def main() -> dict[str, list[float]]:
        ex = RayExecutor(2, token_path=root / "ray_auth_token", dashboard=True)
        await ex.start()
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(f"http://{ex.dashboard_url}")  # finds the token itself
        res: dict[str, list[float]] = {"subprocess": [], "ray_task": [], "ray_jobs_api": []}
        for i in range(n):
            p = root / f"sub{i}"
            t = time.time()
            subprocess.Popen(stamp(p)).wait()
            res["subprocess"].append(started(p) - t)
            p = root / f"task{i}"
            t = time.time()
            run = ex.launch(LaunchSpec("jobs/x", i, stamp(p), dict(os.environ), str(root), [i % 2]))
            async for _ in run.events():
                pass
            res["ray_task"].append(started(p) - t)
            p = root / f"jobs{i}"
            t = time.time()
            jobs.submit_job(
                entrypoint=shlex.join(stamp(p)),
                entrypoint_num_cpus=0,
                entrypoint_resources={f"rigshift_gpu_{i % 2}": 1},
            )
            res["ray_jobs_api"].append(started(p) - t)
        await ex.close()
        return res

    res = asyncio.run(main())
    return {f"{k}_p50_ms": round(statistics.median(v) * 1000, 1) for k, v in res.items()} | {
        f"{k}_max_ms": round(max(v) * 1000, 1) for k, v in res.items()
    }


def run_footprint(seconds: float) -> dict[str, Any]:
    """Idle CPU share (of one core) and RSS of the agent process, with and without Ray."""
    import psutil

    results: dict[str, Any] = {}
    for executor in ("local", "ray"):
        root = Path(tempfile.mkdtemp(prefix="rigshift-footprint-"))
        fleet = LocalFleet(root)
        try:
            fleet.start_broker(lease_ttl_s=15, heartbeat_interval_s=3)
            farm = fleet.client().create_farm("f")
            agent = fleet.start_agent(
                "rig", farm.enrollment_token, simulate="RTX3090x8", executor=executor
            )
            fleet.wait_workers(1, timeout_s=120)
            time.sleep(5)
            proc = psutil.Process(agent.proc.pid)
            ray = [p for p in proc.children(recursive=True)]
            c0 = proc.cpu_times()
            r0 = {p.pid: p.cpu_times() for p in ray}
            time.sleep(seconds)
            c1 = proc.cpu_times()
            ray_cpu = 0.0
            for p in ray:
                try:
                    c = p.cpu_times()
                    ray_cpu += c.user + c.system - r0[p.pid].user - r0[p.pid].system
                except psutil.Error:
                    pass
            results[executor] = {
                "agent_cpu_percent": round(
                    (c1.user + c1.system - c0.user - c0.system) / seconds * 100, 2
                ),
                "agent_rss_mb": round(proc.memory_info().rss / 2**20, 1),
                "ray_processes": len(ray),
                "ray_cpu_percent": round(ray_cpu / seconds * 100, 2),
                "ray_rss_mb": round(
                    sum(p.memory_info().rss for p in ray if p.is_running()) / 2**20, 1
                ),
            }
        finally:
            fleet.stop()
    return results


def main() -> int:
    """Parse the options, run one mode, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--job-seconds", type=float, default=0.1)
    ap.add_argument("--idle", action="store_true", help="one job at a time into an empty queue")
    ap.add_argument("--executor", choices=["ray", "local"], default="ray")
    ap.add_argument("--submitters", type=int, default=1, help="client threads submitting")
    ap.add_argument("--ray-paths", action="store_true", help="compare ways to start a process")
    ap.add_argument("--footprint", action="store_true", help="the agent's idle CPU and RSS")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args()
    if args.ray_paths:
        result = run_ray_paths(min(args.jobs, 20))
    elif args.footprint:
        result = run_footprint(30.0)
    else:
        result = run_dispatch(args)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
