"""Fleet benchmark: one real broker process, K simulated agents speaking the real protocol.

    .venv/bin/python benchmarks/fleet_bench.py --agents 1000 --duration-s 30
    .venv/bin/python benchmarks/fleet_bench.py --agents 20 --duration-s 5 --json

It starts ``rigshift broker serve`` on 127.0.0.1 (fresh SQLite home, rate limit off),
creates a farm, and starts ``--processes`` load-generator processes that run K/P
asyncio agents each over a few shared ``grpc.aio`` channels. Every agent calls
RegisterWorker with ``--gpus-per-agent`` GPUs, holds its session open (it is ready
once the first Reconcile arrived) and renews every ``heartbeat_interval_seconds`` the
broker answered (first renewal at a random phase, then with +-5% jitter, as the real
agent: sleep(interval - elapsed)). ``--protocol session`` (default): renewals are
messages on WorkerService.Session, answered with ``lease_renewed`` on the same stream;
``--protocol unary``: Heartbeat calls beside StreamInstructions (older agents). On each
Assignment reports ``started`` and, ``--job-seconds`` later, ``finished`` (exit 0)
through ReportJobEvents with per-attempt sequence numbers.

Registration is not measured. Once every agent is ready and a short settle period
has passed, the steady-state window of ``--duration-s`` starts: the parent submits
1-GPU jobs with CreateJob (admin key) at ``--submit-rate-per-s``. It reports

* heartbeats/s: heartbeats answered OK whose answer arrived inside the window;
* heartbeat p50/p99: the round trip of those heartbeats, seen by the agent;
* submit->assign p50/p99: from CreateJob returned (``time.time()`` in the parent)
  to the agent receiving the Assignment (``time.time()`` in the load generator;
  one machine, one wall clock). The push can beat the CreateJob answer; such
  samples count as 0 ms (``assign_before_create_returned`` says how many);
* broker CPU % (user+system of all its threads over the window; 100 = one core),
  RSS at the end of the window and the peak sampled every 0.5 s;
* load-generator CPU % (if it is near 100 per process, the load generator and
  not the broker limits the figures), errors by RPC and status code.

After the window, submissions stop and the run waits (at most ``--drain-s``) until
every submitted job has reached an agent. With ``--json`` the last line printed is
one JSON object. Every loop is bounded in count and time; nothing runs after exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import psutil
from fleetbench.loadgen import LoadGenConfig, loadgen_main
from fleetbench.processes import BrokerProcess, Sampler, busy_seconds, serve_bare_grpc
from fleetbench.report import human, percentile, print_timeline

from rigshift.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

AGENTS_PER_CHANNEL = 1_000  # agents sharing one grpc.aio channel (one HTTP/2 connection)


def default_submit_rate(agents: int) -> float:
    """Jobs per second when ``--submit-rate-per-s`` is not given: K/100, within 5..50."""
    return float(min(50, max(5, agents // 100)))


async def submit_jobs(
    address: str,
    api_key: str,
    rate_per_s: float,
    start_wall: float,
    duration_s: float,
    created: dict[str, tuple[float, float]],
    errors: collections.Counter[str],
    job_seconds: float,
) -> int:
    """CreateJob at a steady rate for ``duration_s`` from ``start_wall``; returns how many.

    ``created`` gets job name -> (wall time sent, wall time CreateJob returned).
    """
    count = max(1, round(rate_per_s * duration_s))
    metadata = (("authorization", f"Bearer {api_key}"),)
    limit = asyncio.Semaphore(256)  # bounded in flight
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)

        async def one(i: int) -> None:
            spec = job_pb2.JobSpec(
                display_name=f"fleet-bench-{i}",
                command=["sleep", f"{job_seconds:g}"],
                gpu_count=1,
                max_duration_seconds=max(60, int(job_seconds * 10)),
            )
            request = job_service_pb2.CreateJobRequest(spec=spec, request_id=f"fleet-bench-{i}")
            async with limit:
                sent = time.time()
                try:
                    job = await stub.CreateJob(request, metadata=metadata, timeout=30.0)
                except grpc.aio.AioRpcError as err:
                    errors[f"CreateJob:{err.code().name}"] += 1
                    return
                created[job.name] = (sent, time.time())

        tasks = []
        for i in range(count):
            delay = start_wall + i / rate_per_s - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return count


def _poll_assigned(conns: list[Any], assigned: dict[str, float], timeout_s: float = 30.0) -> None:
    for conn in conns:
        conn.send(("query",))
    for conn in conns:
        if not conn.poll(timeout_s):
            raise RuntimeError("a load generator stopped answering")
        kind, items = conn.recv()
        assert kind == "assigned"
        for name, t in items:
            assigned.setdefault(name, t)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One benchmark run; returns the figures."""
    if args.agents < 1 or args.duration_s <= 0 or args.processes < 1:
        raise SystemExit("--agents, --duration-s and --processes must be positive")
    processes = min(args.processes, args.agents)
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine skews every figure
    rate = args.submit_rate_per_s or default_submit_rate(args.agents)
    if args.bare_grpc:
        rate = 0.0  # the bare server has no JobService: heartbeats only
    extra = []
    if args.heartbeat_interval_s:
        extra += ["--heartbeat-interval-s", f"{args.heartbeat_interval_s:g}"]
        extra += ["--lease-ttl-s", f"{max(15.0, 5 * args.heartbeat_interval_s):g}"]
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        broker = BrokerProcess(Path(tmp), extra, bare=args.bare_grpc)
        children: list[Any] = []
        conns: list[Any] = []
        sampler: Sampler | None = None
        try:
            address = broker.start()
            os.environ["RIGSHIFT_HOME"] = str(broker.cred_home)
            os.environ.pop("RIGSHIFT_API_KEY", None)
            from client.sdk import Client
            from rigshift.credentials import lookup_api_key

            api_key, token = "", "bare"
            if not args.bare_grpc:
                api_key = lookup_api_key(address)
                with Client(address, api_key=api_key) as client:
                    token = client.create_farm("bench").enrollment_token
            bproc = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
            sampler = Sampler(bproc)
            sampler.start()

            ctx = mp.get_context("spawn")
            per = [
                args.agents // processes + (i < args.agents % processes) for i in range(processes)
            ]
            first = 0
            for i, n in enumerate(per):
                parent_end, child_end = ctx.Pipe()
                cfg = LoadGenConfig(
                    index=i,
                    address=address,
                    enrollment_token=token,
                    agents=n,
                    first_agent=first,
                    gpus_per_agent=args.gpus_per_agent,
                    job_seconds=args.job_seconds,
                    channels=args.channels or max(1, min(8, math.ceil(n / AGENTS_PER_CHANNEL))),
                    register_concurrency=args.register_concurrency,
                    register_rate_per_s=args.register_rate_per_s / processes,
                    register_timeout_s=max(60.0, args.agents / 20),
                    seed=args.seed * 1000 + i,
                    protocol=args.protocol,
                )
                first += n
                p = ctx.Process(target=loadgen_main, args=(cfg, child_end), daemon=True)
                p.start()
                child_end.close()
                children.append(p)
                conns.append(parent_end)

            # Registration: not measured.
            reg_started = time.monotonic()
            registered = ready = 0
            reg_timeout = 120.0 + args.agents / 20
            for conn in conns:
                left = reg_timeout - (time.monotonic() - reg_started)
                if not conn.poll(max(0.0, left)):
                    raise RuntimeError(f"registration took over {reg_timeout:.0f} s")
                _, r, rd = conn.recv()
                registered += r
                ready += rd
            register_s = time.monotonic() - reg_started
            time.sleep(args.settle_s)

            # The steady-state window.
            ws_wall = time.time() + 0.2
            we_wall = ws_wall + args.duration_s
            for conn in conns:
                conn.send(("window", ws_wall, we_wall))
            gen_procs = [psutil.Process(p.pid) for p in children]
            time.sleep(max(0.0, ws_wall - time.time()))
            cpu0 = bproc.cpu_times()
            gen_cpu0 = [sum(g.cpu_times()[:2]) for g in gen_procs]
            machine0, me0 = busy_seconds(), sum(psutil.Process().cpu_times()[:2])
            wall0 = time.monotonic()
            profiler = None
            if args.profile:
                profiler = subprocess.Popen(
                    [
                        str(Path(sys.executable).with_name("py-spy")),
                        "record",
                        "-d",
                        str(max(1, int(args.duration_s) - 1)),
                        "-p",
                        str(bproc.pid),
                        "-o",
                        args.profile,
                        "-f",
                        "raw",
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            created: dict[str, tuple[float, float]] = {}
            errors: collections.Counter[str] = collections.Counter()
            submitted = 0
            if rate > 0:
                submitted = asyncio.run(
                    submit_jobs(
                        address,
                        api_key,
                        rate,
                        ws_wall,
                        args.duration_s,
                        created,
                        errors,
                        args.job_seconds,
                    )
                )
            time.sleep(max(0.0, we_wall - time.time()))
            cpu1 = bproc.cpu_times()
            gen_cpu1 = [sum(g.cpu_times()[:2]) for g in gen_procs]
            machine1, me1 = busy_seconds(), sum(psutil.Process().cpu_times()[:2])
            wall = time.monotonic() - wall0
            rss_end = bproc.memory_info().rss
            if profiler is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    profiler.wait(30)

            # Drain: every submitted job should reach an agent.
            assigned: dict[str, float] = {}
            deadline = time.monotonic() + args.drain_s
            while True:
                _poll_assigned(conns, assigned)
                if all(n in assigned for n in created) or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
            for conn in conns:
                conn.send(("stop",))
            results = []
            for conn in conns:
                while True:
                    if not conn.poll(60):
                        raise RuntimeError("a load generator did not stop")
                    kind, payload = conn.recv()
                    if kind == "assigned":
                        for name, t in payload:
                            assigned.setdefault(name, t)
                    elif kind == "result":
                        results.append(payload)
                        break
            for p in children:
                p.join(10)
            broker_alive = broker.proc is not None and broker.proc.poll() is None
        finally:
            if sampler is not None:
                sampler.stop()
            for p in children:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            broker.stop()
            if args.broker_log:
                with contextlib.suppress(OSError):
                    Path(args.broker_log).write_text(broker.log_path.read_text())

    if args.timeline:
        print_timeline(results, sampler, ws_wall, we_wall)
    latencies = sorted(x for r in results for x in r["heartbeat_latencies_ms"])
    hb_ok = sum(r["heartbeats_ok"] for r in results)
    s2a, send2a, early = [], [], 0
    for name, (sent, returned) in created.items():
        got = assigned.get(name)
        if got is None:
            continue
        if got < returned:
            early += 1
        s2a.append(max(0.0, got - returned) * 1000)
        send2a.append(max(0.0, got - sent) * 1000)
    s2a.sort()
    send2a.sort()
    outside: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for r in results:
        errors.update(r["errors"])
        outside.update(r["errors_outside_window"])
        for key, text in r["error_examples"].items():
            examples.setdefault(key, text)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    gen_cpu = [(b - a) / wall * 100 for a, b in zip(gen_cpu0, gen_cpu1, strict=True)]
    ours = cpu + sum(b - a for a, b in zip(gen_cpu0, gen_cpu1, strict=True)) + (me1 - me0)
    other_cpu = max(0.0, (machine1 - machine0) - ours) / wall * 100
    interval = max((r["heartbeat_interval_s"] for r in results), default=0.0)

    def ms(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 2)

    return {
        "target": "bare-grpc" if args.bare_grpc else "broker",
        "protocol": args.protocol,
        "agents": args.agents,
        "registered": registered,
        "ready": ready,
        "gpus_per_agent": args.gpus_per_agent,
        "processes": processes,
        "duration_s": args.duration_s,
        "heartbeat_interval_s": interval,
        "expected_heartbeats_per_s": round(args.agents / interval, 1) if interval else None,
        "heartbeats_per_s": round(hb_ok / wall, 1),
        "heartbeat_p50_ms": ms(percentile(latencies, 50)),
        "heartbeat_p99_ms": ms(percentile(latencies, 99)),
        "heartbeat_max_ms": ms(latencies[-1]) if latencies else None,
        "submit_rate_per_s": rate,
        "jobs_submitted": len(created),
        "jobs_create_attempted": submitted,
        "jobs_assigned": sum(1 for n in created if n in assigned),
        "jobs_finished": sum(r["jobs_finished"] for r in results),
        "submit_to_assign_p50_ms": ms(percentile(s2a, 50)),
        "submit_to_assign_p99_ms": ms(percentile(s2a, 99)),
        "submit_to_assign_max_ms": ms(s2a[-1]) if s2a else None,
        "send_to_assign_p50_ms": ms(percentile(send2a, 50)),
        "send_to_assign_p99_ms": ms(percentile(send2a, 99)),
        "assign_before_create_returned": early,
        "broker_cpu_percent": round(cpu / wall * 100, 1),
        "broker_rss_mb": round(rss_end / 2**20, 1),
        "broker_rss_peak_mb": round(
            max([rss_end] + [m for t, _, m in sampler.samples if ws_wall <= t <= we_wall]) / 2**20,
            1,
        ),
        "loadgen_cpu_percent": [round(x, 1) for x in gen_cpu],
        "other_cpu_percent": round(other_cpu, 1),
        "register_s": round(register_s, 2),
        "stream_reconnects": sum(r["stream_reconnects"] for r in results),
        "cancellations": sum(r["cancellations"] for r in results),
        "errors": dict(sorted(errors.items())),
        "errors_outside_window": dict(sorted(outside.items())),
        "error_examples": dict(sorted(examples.items())),
        "broker_alive": broker_alive,
        "loadavg_1m_before": load_before,
        "machine": f"{os.cpu_count()} CPU, {platform.python_implementation()} "
        f"{platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=0, help="simulated agents (K)")
    p.add_argument("--duration-s", type=float, default=0.0, help="measured window")
    p.add_argument("--gpus-per-agent", type=int, default=8)
    p.add_argument("--job-seconds", type=float, default=2.0, help="how long each job 'runs'")
    p.add_argument(
        "--submit-rate-per-s", type=float, default=0.0, help="default: K/100 within 5..50"
    )
    p.add_argument("--processes", type=int, default=1, help="load-generator processes")
    p.add_argument("--channels", type=int, default=0, help="grpc channels per process")
    p.add_argument(
        "--heartbeat-interval-s", type=float, default=0.0, help="broker's (default: its own, 3 s)"
    )
    p.add_argument("--register-concurrency", type=int, default=8)
    p.add_argument(
        "--register-rate-per-s", type=float, default=100.0, help="agents joining per second"
    )
    p.add_argument("--settle-s", type=float, default=3.0, help="pause after registration")
    p.add_argument("--drain-s", type=float, default=15.0, help="max wait for late assignments")
    p.add_argument("--profile", default="", help="py-spy raw profile of the broker to this file")
    p.add_argument("--broker-log", default="", help="copy the broker's stderr log here")
    p.add_argument("--timeline", action="store_true", help="per-second table to stderr")
    p.add_argument(
        "--bare-grpc",
        action="store_true",
        help="drive an empty grpc.aio WorkerService instead of the broker (heartbeats only)",
    )
    p.add_argument("--serve-bare-grpc", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--protocol",
        choices=("session", "unary"),
        default="session",
        help="agents renew on WorkerService.Session (default) or with Heartbeat calls "
        "beside StreamInstructions (agents older than issue 17)",
    )
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    args = p.parse_args(argv)
    if args.serve_bare_grpc:
        serve_bare_grpc()
        return 0
    if args.agents < 1 or args.duration_s <= 0:
        p.error("--agents and --duration-s are required and must be positive")
    result = run(args)
    print(human(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
