"""Replica benchmark (issue 17): the CPU each broker replica spends per agent it holds.

    .venv/bin/python benchmarks/replica_bench.py \\
        --database-url postgresql+psycopg://rigshift@127.0.0.1:5432/rigshift \\
        --replicas 1 2 3 --agents 1000 --duration-s 20

For each replica count N it creates a fresh database next to ``--database-url``
(dropped afterwards), starts N ``rigshift broker serve --replica`` processes on it (the
first leads), creates a farm, and starts a load-generator process
(``fleetbench.sessions``) whose K agents register and then only renew their leases
every ``--interval-s``:

* N = 1: every agent on the one replica, which leads, with ``--leader-protocol``
  (``session``, the default: what agents speak; ``legacy``: StreamInstructions + a unary
  Heartbeat per renewal, the protocol of ``rigshift agent run --no-session``);
* N > 1: the agents spread evenly over the N-1 followers, each holding a
  ``WorkerService/Session`` per agent; the leader holds none and sees one
  ``RenewLeases`` digest per follower per interval.

After every agent is ready and ``--settle-s`` has passed, a window of ``--duration-s``
is measured: the user+system CPU of every replica process and of the load generator
(psutil), the renewals answered inside the window and their round trip (p50/p99), the
errors, and from the leader's /metrics the digests and the renewals they carried.
Printed per process: role, agents held, CPU % of one core, and CPU % per 1,000 agents
held (for the leader of N > 1: per 1,000 agents of the fleet). With ``--json`` the
last line is one JSON object. Every wait is bounded; nothing runs after exit.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

import grpc
import psutil
import sqlalchemy
from fleetbench.report import percentile
from fleetbench.sessions import SessionLoadConfig, session_loadgen_main
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from rigshift.v1 import farm_pb2, farm_service_pb2, farm_service_pb2_grpc

EXE = Path(sys.executable).with_name("rigshift")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ReplicaProcess:
    """One ``rigshift broker serve --replica`` process."""

    def __init__(self, db: str, work: Path, n: int, args: argparse.Namespace) -> None:
        self.address = f"127.0.0.1:{_port()}"
        self.lines: list[str] = []
        self.ready = threading.Event()
        env = {**os.environ, "RIGSHIFT_HOME": str(work / "cred"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                str(EXE),
                "broker",
                "serve",
                "--replica",
                "--db",
                db,
                "--listen",
                self.address,
                "--home",
                str(work / f"r{n}"),
                "--artifact-dir",
                str(work / "artifacts"),
                "--rate-limit-per-s",
                "0",
                "--lease-ttl-s",
                str(args.interval_s * 5),
                "--heartbeat-interval-s",
                str(args.interval_s),
                "--metrics-listen",
                "127.0.0.1:0",
                "--log-level",
                "WARNING",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            raise RuntimeError("replica did not start:\n" + "".join(self.lines))
        self.leader = "(leader)" in "".join(self.lines)
        self.ps = psutil.Process(self.proc.pid)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on" in line:
                self.ready.set()

    def metric(self, name: str, **labels: str) -> float:
        url = next(x.split()[-1] for x in self.lines if "metrics on http://" in x)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read().decode()
        return sum(
            s.value
            for fam in text_string_to_metric_families(body)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            got = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(got.status == health_pb2.HealthCheckResponse.SERVING)


def _create_farm(address: str, key: str) -> str:
    with grpc.insecure_channel(address) as ch:
        farm = farm_service_pb2_grpc.FarmServiceStub(ch).CreateFarm(
            farm_service_pb2.CreateFarmRequest(farm=farm_pb2.Farm(display_name="bench")),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=30,
        )
    return str(farm.enrollment_token)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_once(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """N replicas on a fresh database, K agents, one measured window."""
    admin = sqlalchemy.create_engine(args.database_url, isolation_level="AUTOCOMMIT")
    name = "bench_" + uuid.uuid4().hex[:10]
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    db = args.database_url.rsplit("/", 1)[0] + "/" + name
    replicas: list[ReplicaProcess] = []
    loadgen = None
    parent = None
    try:
        for i in range(n):
            replicas.append(ReplicaProcess(db, work, i, args))
        leader = replicas[0]
        assert leader.leader, "".join(leader.lines)
        deadline = time.monotonic() + 30
        while not all(_serving(r.address) for r in replicas):
            assert time.monotonic() < deadline, "followers did not find the leader"
            time.sleep(0.2)
        os.environ["RIGSHIFT_HOME"] = str(work / "cred")
        from rigshift.credentials import lookup_api_key

        token = _create_farm(leader.address, lookup_api_key(leader.address) or "")
        holders = replicas if n == 1 else replicas[1:]
        mode = args.leader_protocol if n == 1 else "session"
        counts = _split(args.agents, len(holders))
        targets = [(r.address, c, mode) for r, c in zip(holders, counts, strict=True)]
        cfg = SessionLoadConfig(targets=targets, token=token, interval_s=args.interval_s)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        loadgen = ctx.Process(target=session_loadgen_main, args=(cfg, child), daemon=True)
        loadgen.start()
        if not parent.poll(args.ready_timeout_s):
            raise RuntimeError("the agents did not get ready in time")
        _kind, ready = parent.recv()
        time.sleep(args.settle_s)
        lg = psutil.Process(loadgen.pid)
        before = [r.cpu_s() for r in replicas]
        lg_before = sum(lg.cpu_times()[:2])
        load_before = os.getloadavg()
        renewals_before = leader.metric("rigshift_broker_replica_lease_renewals_total")
        digests_before = leader.metric("rigshift_broker_replica_lease_digests_total")
        start = time.time()
        parent.send((start, start + args.duration_s))
        time.sleep(args.duration_s)
        after = [r.cpu_s() for r in replicas]
        lg_cpu = sum(lg.cpu_times()[:2]) - lg_before
        if not parent.poll(60):
            raise RuntimeError("no stats from the load generator")
        _, ok, rtt, errors = parent.recv()
        heartbeats = leader.metric(
            "rigshift_grpc_requests_total", method="rigshift.v1.WorkerService/Heartbeat"
        )
        processes = []
        for i, r in enumerate(replicas):
            cpu_pct = 100 * (after[i] - before[i]) / args.duration_s
            held = counts[holders.index(r)] if r in holders else 0
            per = held if held else args.agents  # the leader of N > 1: per agent of the fleet
            processes.append(
                {
                    "role": "leader" if r.leader else "follower",
                    "agents_held": held,
                    "cpu_pct": round(cpu_pct, 1),
                    "cpu_pct_per_1000_agents": round(1000 * cpu_pct / per, 2),
                }
            )
        rtt.sort()
        if errors:  # say why, from the replicas' logs
            for r in replicas:
                tail = [x for x in r.lines if "Error" in x or "error" in x or "Traceback" in x]
                print("".join(tail[-20:]), file=sys.stderr)
        return {
            "replicas": n,
            "agents": ready,
            "protocol_on_holders": mode,
            "interval_s": args.interval_s,
            "window_s": args.duration_s,
            "renewals_per_s": round(ok / args.duration_s, 1),
            "expected_renewals_per_s": round(args.agents / args.interval_s, 1),
            "renewal_rtt_p50_ms": round(percentile(rtt, 50), 2) if rtt else None,
            "renewal_rtt_p99_ms": round(percentile(rtt, 99), 2) if rtt else None,
            "errors": errors,
            "leader_digests_in_window": leader.metric("rigshift_broker_replica_lease_digests_total")
            - digests_before,
            "leader_digest_renewals_in_window": leader.metric(
                "rigshift_broker_replica_lease_renewals_total"
            )
            - renewals_before,
            "leader_heartbeat_rpcs_total": heartbeats,
            "processes": processes,
            "loadgen_cpu_pct": round(100 * lg_cpu / args.duration_s, 1),
            "loadavg_at_start": [round(x, 2) for x in load_before],
        }
    finally:
        if parent is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                parent.send("stop")
        if loadgen is not None:
            loadgen.join(20)
            if loadgen.is_alive():
                loadgen.kill()
        for r in reversed(replicas):
            r.stop()
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def _print(result: dict[str, Any]) -> None:
    print(
        f"\n{result['replicas']} replica(s), {result['agents']} agents "
        f"({result['protocol_on_holders']}), renewals {result['renewals_per_s']}/s "
        f"of {result['expected_renewals_per_s']}/s, rtt p50 {result['renewal_rtt_p50_ms']} ms "
        f"p99 {result['renewal_rtt_p99_ms']} ms, errors {result['errors'] or 'none'}"
    )
    print(
        f"  leader: {result['leader_digests_in_window']:.0f} digests carrying "
        f"{result['leader_digest_renewals_in_window']:.0f} renewals in the window; "
        f"{result['leader_heartbeat_rpcs_total']:.0f} Heartbeat RPCs in all"
    )
    for p in result["processes"]:
        print(
            f"  {p['role']:<9} holds {p['agents_held']:>6} agents  CPU {p['cpu_pct']:>6.1f} %  "
            f"= {p['cpu_pct_per_1000_agents']:>6.2f} % of a core per 1,000 agents"
        )
    print(
        f"  load generator CPU {result['loadgen_cpu_pct']} %; loadavg {result['loadavg_at_start']}"
    )


def main() -> None:
    """Parse the flags, run every replica count, print (and optionally JSON) the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--database-url", required=True, help="PostgreSQL URL (a fresh DB is made)")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--interval-s", type=float, default=3.0, help="renewal interval")
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--ready-timeout-s", type=float, default=300.0)
    ap.add_argument("--leader-protocol", choices=("legacy", "session"), default="session")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="replica-bench-") as tmp:
        for n in args.replicas:
            result = run_once(n, args, Path(tmp) / f"n{n}")
            _print(result)
            results.append(result)
    if args.json:
        print(json.dumps({"cpus": os.cpu_count(), "runs": results}))


if __name__ == "__main__":
    main()
