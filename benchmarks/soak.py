"""Soak benchmark: a long run of short jobs through one real broker, sampled as it goes.

    .venv/bin/python benchmarks/soak.py --jobs 100000 --agents 20 --home /tmp/soak --json
    .venv/bin/python benchmarks/soak.py --jobs 300 --agents 5 --json          # smoke size

It starts ``rigshift broker serve`` (SQLite in ``--home``, or ``--database-url``; rate
limit off, ``/metrics`` on a local port), creates a farm, and starts one load-generator
process (``benchmarks/fleetbench``) whose ``--agents`` simulated agents register with
``--gpus-per-agent`` GPUs, heartbeat, and report each assignment ``started`` and, after
``--job-seconds``, ``finished``. The soak submits ``--jobs`` 1-GPU jobs with CreateJob
(admin key, ``--concurrency`` calls in flight) and keeps at most ``--pending`` submitted
jobs that have not reached an agent, so the queue stays fed without growing: submit->assign
then measures the broker, not a backlog. Meanwhile it calls GetJob on a recently assigned
job every 100 ms. A job counts as completed when the broker's ``rigshift_jobs_completed``
counter says so.

Every ``--sample-every`` completed jobs (default ``--jobs``/100), and when the series
crosses 10,000 jobs, it records the broker's RSS, the database size (SQLite file with WAL,
or ``pg_database_size``), lifecycles/s, and p50/p99 of submit->assign (CreateJob returned
to the agent receiving the Assignment; one machine, one clock; an assignment that beats
the CreateJob answer counts as 0 ms), CreateJob and GetJob over the interval. The samples go
to ``HOME/soak-samples.json``; a later run with the same ``--home`` continues the series,
so several runs on one database draw one curve over cumulative jobs completed.

After the last job it stops the agents and the broker (SIGTERM) and times a restart on the
final database: from starting the process until the health check answers SERVING and a
GetJob of the last job is answered (``restart_s``). The PNG (``--plot``, default
``HOME/soak.png``; matplotlib, the ``bench`` extra) shows RSS and the p99s over jobs
completed. With ``--json`` the last line printed is one JSON object: ``jobs_completed``
(the series), ``rss_mb_start`` (after the series' first 10,000 jobs; the first sample in a
shorter series), ``rss_mb_end``, ``restart_s``, ``submit_to_assign_p99_ms`` (this run) and
more. No figure is asserted here: the goals are in ``docs/scale.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import configparser
import gc
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import psutil
from fleetbench.loadgen import LoadGenConfig, loadgen_main
from fleetbench.processes import BrokerProcess
from soakbench.drive import Drive
from soakbench.plot import write_plot
from soakbench.probes import free_port, wait_serving
from soakbench.series import Series, percentile

from rigshift.v1 import job_service_pb2, job_service_pb2_grpc

SAMPLES_FILE = "soak-samples.json"


class Soak:
    """One run: the broker, the load generator, and the figures of this run."""

    def __init__(self, args: argparse.Namespace, home: Path) -> None:
        self.args = args
        self.home = home
        self.series = Series(home / SAMPLES_FILE)
        self.run_index = len(self.series.runs)
        self.prior = self.series.jobs_completed
        self.sqlite = None if args.database_url else home / "broker-home" / "broker.db"
        self.loadgen: Any = None
        self.broker: BrokerProcess | None = None
        self.address = ""
        self.metrics_url = ""
        self.api_key = ""
        self.conn: Any = None

    # --- processes ----------------------------------------------------------------------

    def broker_args(self) -> list[str]:
        """``rigshift broker serve`` options: the database and a fresh metrics port."""
        extra = ["--metrics-listen", f"127.0.0.1:{free_port()}"]
        if self.args.database_url:
            extra += ["--db", self.args.database_url]
        return extra

    def start_broker(self) -> float:
        """Start the broker on the soak's home; return seconds until it serves."""
        extra = self.broker_args()
        self.metrics_url = f"http://{extra[1]}/metrics"
        self.broker = BrokerProcess(self.home, extra)
        t0 = time.monotonic()
        self.address = self.broker.start(timeout_s=300.0)
        wait_serving(self.address)
        return time.monotonic() - t0

    def admin_key(self) -> str:
        """The admin key the broker filed at its first start (under that start's address)."""
        os.environ["RIGSHIFT_HOME"] = str(self.broker.cred_home)  # type: ignore[union-attr]
        os.environ.pop("RIGSHIFT_API_KEY", None)
        from rigshift.credentials import credentials_path, lookup_api_key

        key = lookup_api_key(self.address)
        if key:
            return key
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(credentials_path())
        for section in parser.sections():
            if parser.has_option(section, "api_key"):
                key = parser.get(section, "api_key").strip()
        if not key:
            raise RuntimeError("no admin key in the soak home's credentials file")
        return key

    def start_agents(self) -> None:
        """Create a farm and start the load generator; return once its agents are ready."""
        from client.sdk import Client

        with Client(self.address, api_key=self.api_key) as client:
            token = client.create_farm(f"soak-{self.run_index}").enrollment_token
        a = self.args
        parent_end, child_end = mp.get_context("spawn").Pipe()
        cfg = LoadGenConfig(
            index=0,
            address=self.address,
            enrollment_token=token,
            agents=a.agents,
            first_agent=self.run_index * a.agents,
            gpus_per_agent=a.gpus_per_agent,
            job_seconds=a.job_seconds,
            channels=1,
            register_concurrency=8,
            register_rate_per_s=0.0,
            register_timeout_s=60.0,
            seed=a.seed + self.run_index,
            drain_on_stop=True,  # the next run's jobs must not wait on this run's vanished rigs
        )
        self.loadgen = mp.get_context("spawn").Process(
            target=loadgen_main, args=(cfg, child_end), daemon=True
        )
        self.loadgen.start()
        child_end.close()
        self.conn = parent_end
        if not parent_end.poll(120.0):
            raise RuntimeError("the load generator's agents did not register within 120 s")
        _, registered, ready = parent_end.recv()
        if ready < a.agents:
            raise RuntimeError(f"only {ready} of {a.agents} agents ready ({registered} registered)")

    def stop_agents(self) -> dict[str, Any]:
        """Stop the load generator; return its result."""
        self.conn.send(("stop",))
        result: dict[str, Any] = {}
        while not result:
            if not self.conn.poll(60.0):
                raise RuntimeError("the load generator did not stop")
            kind, payload = self.conn.recv()
            if kind == "result":
                result = payload
        self.loadgen.join(10)
        return result

    def restart(self, last_job: str) -> dict[str, float]:
        """Stop the broker, then time a start on the same database until it serves."""
        assert self.broker is not None
        t0 = time.monotonic()
        self.broker.stop()
        stop_s = time.monotonic() - t0
        t1 = time.monotonic()
        self.start_broker()
        with grpc.insecure_channel(self.address) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            stub.GetJob(
                job_service_pb2.GetJobRequest(name=last_job),
                metadata=(("authorization", f"Bearer {self.api_key}"),),
                timeout=60.0,
            )
        restart_s = time.monotonic() - t1
        rss = psutil.Process(self.broker.proc.pid).memory_info().rss  # type: ignore[union-attr]
        return {
            "stop_s": round(stop_s, 2),
            "restart_s": round(restart_s, 3),
            "rss_mb_after_restart": round(rss / 2**20, 1),
        }

    def run(self) -> dict[str, Any]:
        """The whole run: start, drive, stop, restart, record; returns the JSON figures."""
        a = self.args
        load_before = round(os.getloadavg()[0], 2)
        result: dict[str, Any] = {}
        try:
            first_start_s = self.start_broker()
            self.api_key = self.admin_key()
            self.start_agents()
            # The soak's own collections would show up as broker latency (as in fleet_bench).
            gc.collect()
            gc.freeze()
            assert self.broker is not None and self.broker.proc is not None
            drive = Drive(
                a,
                self.series,
                self.run_index,
                self.address,
                self.api_key,
                self.metrics_url,
                self.conn,
                self.broker.proc.pid,
                self.loadgen.pid,
                self.sqlite,
            )
            wall = asyncio.run(drive.run())
            agents = self.stop_agents()
            run_completed = self.series.samples[-1]["run_jobs_completed"]
            restart = self.restart(drive.last_job)
        finally:
            if self.loadgen is not None and self.loadgen.is_alive():
                self.loadgen.kill()
            if self.broker is not None:
                self.broker.stop()
        run = {
            "run": self.run_index,
            "jobs_completed": run_completed,
            "agents": a.agents,
            "gpus_per_agent": a.gpus_per_agent,
            "job_seconds": a.job_seconds,
            "wall_s": round(wall, 1),
            "lifecycles_per_s": round(run_completed / wall, 1),
            "first_start_s": round(first_start_s, 3),
            **restart,
            "submit_to_assign_p50_ms": percentile(list(drive.all_s2a), 50),
            "submit_to_assign_p99_ms": percentile(list(drive.all_s2a), 99),
            "create_job_p99_ms": percentile(list(drive.all_create), 99),
            "get_job_p99_ms": percentile(list(drive.all_get), 99),
            "agent_jobs_finished": agents.get("jobs_finished"),
            "errors": dict(sorted((drive.errors + collections.Counter(agents["errors"])).items())),
            "loadavg_1m_before": load_before,
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "database": "postgresql" if a.database_url else "sqlite",
            "machine": f"{os.cpu_count()} CPU, {platform.python_implementation()} "
            f"{platform.python_version()}",
        }
        self.series.add_run(run)
        plot = Path(a.plot) if a.plot else self.home / "soak.png"
        why = write_plot(
            self.series.samples,
            plot,
            f"rigshift soak: {self.series.jobs_completed:,} jobs, {a.agents} agents, "
            f"{run['database']}, {run['machine']}",
        )
        s2a_p99 = [s["submit_to_assign_p99_ms"] for s in self.series.samples]
        s2a_p99 = [x for x in s2a_p99 if x is not None]
        start, end = self.series.rss_mb_start(), self.series.rss_mb_end()
        result = {
            "jobs_completed": self.series.jobs_completed,
            "runs": len(self.series.runs),
            "run_jobs_completed": run_completed,
            "rss_mb_start": start,
            "rss_mb_end": end,
            "rss_growth_percent": round((end - start) / start * 100, 1) if start and end else None,
            **{k: v for k, v in run.items() if k not in ("run", "jobs_completed")},
            "interval_submit_to_assign_p99_ms_max": max(s2a_p99, default=None),
            "db_bytes": self.series.samples[-1]["db_bytes"],
            "samples": len(self.series.samples),
            "samples_file": str(self.series.path),
            "plot": "" if why else str(plot),
            "plot_note": why,
        }
        return result


def human(r: dict[str, Any]) -> str:
    """A few readable lines of the final figures."""
    return (
        f"soak: {r['run_jobs_completed']:,} jobs this run ({r['jobs_completed']:,} in the series)"
        f" in {r['wall_s']} s = {r['lifecycles_per_s']} lifecycles/s, {r['agents']} agents\n"
        f"  broker RSS {r['rss_mb_start']} MB (start) -> {r['rss_mb_end']} MB (end), "
        f"{r['rss_mb_after_restart']} MB after restart; database {r['db_bytes'] / 2**20:.1f} MB\n"
        f"  restart {r['restart_s']} s (stop {r['stop_s']} s); submit->assign p99 "
        f"{r['submit_to_assign_p99_ms']} ms (worst interval "
        f"{r['interval_submit_to_assign_p99_ms_max']} ms); CreateJob p99 "
        f"{r['create_job_p99_ms']} ms, GetJob p99 {r['get_job_p99_ms']} ms\n"
        f"  errors {r['errors'] or 'none'}; load {r['loadavg_1m_before']} -> "
        f"{r['loadavg_1m_after']}; samples {r['samples_file']}; "
        f"plot {r['plot'] or r['plot_note']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=100_000, help="job lifecycles in this run")
    p.add_argument("--agents", type=int, default=20, help="simulated agents (K)")
    p.add_argument("--gpus-per-agent", type=int, default=4)
    p.add_argument("--job-seconds", type=float, default=0.0, help="how long each job 'runs'")
    p.add_argument("--pending", type=int, default=32, help="most jobs submitted, not assigned")
    p.add_argument("--concurrency", type=int, default=16, help="CreateJob calls in flight")
    p.add_argument("--sample-every", type=int, default=0, help="default: --jobs/100 (>= 100)")
    p.add_argument("--home", default="", help="soak home, reused across runs (default: new temp)")
    p.add_argument("--database-url", default="", help="SQLAlchemy URL (PostgreSQL)")
    p.add_argument("--plot", default="", help="PNG path (default: HOME/soak.png)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.agents < 1 or args.pending < 1 or args.concurrency < 1:
        p.error("--jobs, --agents, --pending and --concurrency must be positive")
    # Without --home: a fresh directory that is kept (its samples file and plot are the output).
    home = Path(args.home or tempfile.mkdtemp(prefix="rigshift-soak-")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    result = Soak(args, home).run()
    print(human(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
