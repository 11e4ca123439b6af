"""Chaos: kill -9 the broker and rigs while jobs run; nothing is lost, run twice or billed twice.

The scenario (:func:`run_chaos`) is shared by the CI test (``tests/chaos/``) and
this command, which runs it longer. A real broker process (SQLite), K real agent
processes (simulated RTX3090x2 rigs, the ``local`` executor), N one-GPU jobs of
1-3 s. While they run, the broker is killed with SIGKILL B times and restarted
on the same database and port, and a rig (the agent and every process it
started, as when a rig loses power) is killed A times and restarted with its
saved identity; the kills come in random order, 1.5-3 s apart. Each job process
writes its start and a heartbeat every 50 ms into a shared directory, so the
runs of a job can be checked for overlap afterwards. Figures:

- jobs by final state, and the time from the first submission until every job
  was terminal (and from the last kill);
- attempts per job (mean, max, how many jobs needed more than one);
- the largest number of processes of one job that ran at the same time (must be 1);
- ``rigshift admin verify-ledger``: the ledger balances, every ended attempt is
  settled exactly once.

``--faults blackhole,loss,db-outage,freeze`` mixes real faults into the kills (each
kind ``--fault-events`` times; needs root, ``ip`` and ``nft`` for the network ones):

- ``blackhole``: every agent runs in a network namespace of its own, joined to the
  broker by a veth pair (``tests/faults/netfaults.py``); one rig's link drops every
  packet for 2 s to 2.5 TTL, then heals. Measured: the time until the agent logs that
  the broker is unreachable (detecting the half-open connection).
- ``loss``: every rig's link loses ``--loss-percent`` (20) of its packets each way for
  ``--loss-s`` (20 s). Measured: the broker's p99 latency of agents' RPCs meanwhile.
- ``db-outage``: another process holds SQLite's write lock for ``--db-outage-s``
  (10 s): the broker refuses changes (UNAVAILABLE), holds what it decided, and writes it
  when the lock goes. Measured: how long the broker took to take writes again.
- ``freeze``: one agent is SIGSTOPped for TTL + 1-3 s, then SIGCONTed.

The three figures that must be zero: jobs lost (not SUCCEEDED in the end), jobs that
ran twice at the same time, attempts settled twice (from the ledger).

Usage::

    python benchmarks/chaos.py --jobs 200 --agents 3 --broker-kills 5 --agent-kills 8 --json
    sudo python benchmarks/chaos.py --jobs 200 --faults blackhole,loss,db-outage,freeze
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.fleet import MARKER_JOB, LocalFleet, ManagedProcess, marker_runs

__all__ = ["FAULTS", "ChaosPlan", "ChaosReport", "max_overlap", "run_chaos"]

#: The faults ``--faults`` can mix in (see the module docstring).
FAULTS = ("blackhole", "loss", "db-outage", "freeze")
#: Faults that need every agent in a network namespace of its own.
NETWORK_FAULTS = ("blackhole", "loss")
#: The broker's RPC latency histogram, and the agents' calls in it.
BROKER_RPC = "rigshift_grpc_request_duration_seconds"
AGENT_RPCS = r"^rigshift\.v1\.WorkerService/(Heartbeat|ReportJobEvents)$"
#: An agent's heartbeat round trip as the agent measures it (the network included).
HEARTBEAT_RTT = "rigshift_agent_heartbeat_rtt_seconds"


@dataclass(frozen=True, slots=True)
class ChaosPlan:
    """How big and how violent a run is."""

    jobs: int = 50
    agents: int = 3
    broker_kills: int = 2
    agent_kills: int = 3
    seed: int = 7
    gap_s: tuple[float, float] = (1.5, 3.0)
    """Pause before each kill, drawn uniformly from this range."""
    settle_timeout_s: float = 240.0
    """How long the jobs may take to become terminal after the last kill."""
    lease_ttl_s: int = 5
    heartbeat_interval_s: int = 1
    faults: tuple[str, ...] = ()
    """Real faults mixed into the kills (:data:`FAULTS`), each ``fault_events`` times."""
    fault_events: int = 2
    loss_percent: int = 20
    loss_s: float = 20.0
    db_outage_s: float = 10.0


@dataclass(slots=True)
class ChaosReport:
    """What a run measured (see the module docstring)."""

    plan: dict[str, Any]
    states: dict[str, int] = field(default_factory=dict)
    not_succeeded: dict[str, str] = field(default_factory=dict)
    all_terminal: bool = False
    seconds_to_all_terminal: float = 0.0
    seconds_after_last_kill: float = 0.0
    broker_kills_done: int = 0
    agent_kills_done: int = 0
    attempts: int = 0
    attempts_per_job_mean: float = 0.0
    attempts_per_job_max: int = 0
    jobs_with_retries: int = 0
    jobs_that_ran: int = 0
    max_concurrent_runs_per_job: int = 0
    overlaps: list[str] = field(default_factory=list)
    ledger_ok: bool = False
    ledger_output: str = ""
    leftover_processes: list[str] = field(default_factory=list)
    faults_done: dict[str, int] = field(default_factory=dict)
    jobs_lost: int = 0
    jobs_run_twice_concurrently: int = 0
    attempts_settled_twice: int = 0
    half_open_detect_s: list[float] = field(default_factory=list)
    """Per black hole: cut until the agent logged the broker unreachable."""
    p99_agent_rpc_s_under_loss: list[float] = field(default_factory=list)
    """Per loss: the broker's p99 time to serve agents' RPCs (server side)."""
    p99_heartbeat_rtt_s_under_loss: list[float] = field(default_factory=list)
    """Per loss: the p99 heartbeat round trip the agents measured (network included)."""
    p99_agent_rpc_s_whole_run: float | None = None
    db_outage_recovery_s: list[float] = field(default_factory=list)
    """Per database outage: lock released until the broker logged it took writes again."""


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that overlap at one instant (touching ends do not)."""
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = now = 0
    for _, step in points:  # at equal times -1 sorts first: an end frees before a start
        now += step
        best = max(best, now)
    return best


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_tree(p: ManagedProcess) -> None:
    """SIGKILL a process and everything it started, at once (a rig losing power)."""
    for pid in [p.proc.pid, *p.live_tree()]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.proc.wait(timeout=10)


def _settled_twice(db: Path) -> int:
    """Attempts with more than one client charge in the ledger (the database refuses a
    second leg of one transaction; this also catches a second transaction)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM (SELECT job_id, attempt FROM ledger WHERE kind = 'charge' "
            "GROUP BY job_id, attempt HAVING COUNT(*) > 1)"
        ).fetchone()
    return int(row[0])


class _Faults:
    """The network namespaces of the rigs and the faults this run puts on them."""

    def __init__(self, plan: ChaosPlan, rnd: random.Random) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "faults"))
        import netfaults  # the fault tests' helpers: namespaces, nftables, log times

        unknown = sorted(set(plan.faults) - set(FAULTS))
        if unknown:
            raise SystemExit(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
        self.networked = any(f in NETWORK_FAULTS for f in plan.faults)
        why = netfaults.why_no_netns() if self.networked else None
        if why:
            raise SystemExit(f"--faults {','.join(plan.faults)}: {why}")
        self.nf: Any = netfaults
        self.plan, self.rnd = plan, rnd
        self.netns: dict[str, Any] = {}
        self.metrics = f"127.0.0.1:{_free_port()}"

    def namespace(self, rig: str) -> Any:
        """The rig's namespace (made on first use), or None without network faults."""
        if not self.networked:
            return None
        if rig not in self.netns:
            ns = self.nf.new_netns()
            self.nf.create_netns(ns)
            self.netns[rig] = ns
        return self.netns[rig]

    def close(self) -> list[str]:
        """Remove the namespaces; what could not be removed (should be nothing)."""
        left: list[str] = []
        for ns in self.netns.values():
            left += self.nf.remove_netns(ns)
        return left

    def agent_rpcs(self) -> dict[float, float]:
        """The broker's histogram of agents' RPC latencies now."""
        return dict(self.nf.histogram(self.metrics, BROKER_RPC, AGENT_RPCS))

    def heartbeat_rtts(self, agents: dict[str, ManagedProcess]) -> dict[float, float]:
        """The agents' heartbeat round-trip histograms, summed (their /metrics)."""
        total: dict[float, float] = {}
        for p in agents.values():
            found = self.nf.FaultFleet.log_lines(p, r"metrics on http://")
            if not found:
                continue
            address = found[-1][1].rsplit("http://", 1)[1].split("/", 1)[0]
            with contextlib.suppress(OSError):
                for le, n in self.nf.histogram(address, HEARTBEAT_RTT).items():
                    total[le] = total.get(le, 0.0) + n
        return total

    def log_times(self, p: ManagedProcess, pattern: str, after: float) -> list[float]:
        """Times of ``p``'s log lines matching ``pattern`` at or after ``after``."""
        return [t for t, _ in self.nf.FaultFleet.log_lines(p, pattern, after)]


def _fault(
    what: str,
    plan: ChaosPlan,
    faults: _Faults,
    agents: dict[str, ManagedProcess],
    broker: ManagedProcess,
    db: Path,
    report: ChaosReport,
) -> str:
    """Inflict one fault and wait for it to end; a line saying what happened."""
    rnd = faults.rnd
    ttl = plan.lease_ttl_s
    if what == "blackhole":
        rig = rnd.choice(sorted(agents))
        ns = faults.netns[rig]
        cut = time.time()
        ns.blackhole()
        hold = rnd.uniform(2.0, 2.5 * ttl)
        time.sleep(hold)
        ns.heal()
        seen = faults.log_times(agents[rig], r"broker unreachable", cut)
        detect = round(seen[0] - cut, 2) if seen and seen[0] <= cut + hold else None
        if detect is not None:
            report.half_open_detect_s.append(detect)
        return f"{rig} black-holed for {hold:.1f} s (noticed after {detect} s)"
    if what == "loss":
        before, rtt_before = faults.agent_rpcs(), faults.heartbeat_rtts(agents)
        for ns in faults.netns.values():
            ns.loss(plan.loss_percent)
        time.sleep(plan.loss_s)
        for ns in faults.netns.values():
            ns.heal()
        p99 = faults.nf.p99(before, faults.agent_rpcs())
        rtt = faults.nf.p99(rtt_before, faults.heartbeat_rtts(agents))
        if p99 is not None:
            report.p99_agent_rpc_s_under_loss.append(round(p99, 4))
        if rtt is not None:
            report.p99_heartbeat_rtt_s_under_loss.append(round(rtt, 3))
        return (
            f"{plan.loss_percent} % loss on every rig for {plan.loss_s:g} s (heartbeat round "
            f"trip p99 {rtt and round(rtt, 3)} s; broker-side p99 {p99 and round(p99, 4)} s)"
        )
    if what == "db-outage":
        # Another process takes SQLite's write lock and keeps it: writes fail as locked.
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            time.sleep(plan.db_outage_s)
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        released = time.time()
        back = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and back is None:
            seen = faults.log_times(broker, r"database back after", released)
            back = round(seen[0] - released, 2) if seen else None
            if back is None:
                time.sleep(0.2)
        if back is not None:
            report.db_outage_recovery_s.append(back)
        return f"database locked for {plan.db_outage_s:g} s (writes again after {back} s)"
    if what == "freeze":
        rig = rnd.choice(sorted(agents))
        pid = agents[rig].proc.pid
        hold = ttl + rnd.uniform(1.0, 3.0)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(hold)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"{rig} frozen (SIGSTOP) for {hold:.1f} s"
    raise ValueError(f"unknown fault {what!r}; known: {', '.join(FAULTS)}")


def _verify_ledger(broker_home: Path) -> tuple[bool, str]:
    from click.testing import CliRunner

    from broker.cli import admin_group

    result = CliRunner().invoke(admin_group, ["verify-ledger", "--home", str(broker_home)])
    return result.exit_code == 0 and "settled exactly once" in result.output, result.output


def run_chaos(
    plan: ChaosPlan, root: Path, say: Callable[[str], None] = lambda _: None
) -> ChaosReport:
    """Run the scenario under ``root`` (a fresh directory) and measure it."""
    from rigshift.v1 import job_pb2

    rnd = random.Random(plan.seed)
    report = ChaosReport(plan=asdict(plan))
    out = root / "out"
    out.mkdir(parents=True)
    script = root / "job.py"
    script.write_text(MARKER_JOB)
    faults = _Faults(plan, rnd)
    port = _free_port()
    # Rigs in namespaces reach the broker through their veth: it listens on every address.
    listen = ("--listen", f"{'0.0.0.0' if faults.networked else '127.0.0.1'}:{port}")
    listen += ("--metrics-listen", faults.metrics)
    lease: dict[str, Any] = {
        "lease_ttl_s": plan.lease_ttl_s,
        "heartbeat_interval_s": plan.heartbeat_interval_s,
    }
    common: dict[str, Any] = {
        **lease,
        "drain_grace_s": 1,
        "executor": "local",
        "simulate": "RTX3090x2",
    }
    fleet = LocalFleet(root / "fleet")
    final: dict[str, Any] = {}

    def start_rig(name: str) -> ManagedProcess:
        ns = faults.namespace(name)
        if ns is None:
            return fleet.start_agent(name, token, **common)
        return fleet.start_agent(
            name,
            token,
            broker=f"{ns.host_ip}:{port}",
            wrap=ns.wrap,
            metrics_listen=f"{ns.ns_ip}:0",  # reachable from here, for the round trips
            **common,
        )

    try:
        fleet.start_broker(*listen, **lease)
        client = fleet.client()
        token = client.create_farm("chaos").enrollment_token
        agents = {f"rig-{i}": start_rig(f"rig-{i}") for i in range(plan.agents)}
        fleet.wait_workers(plan.agents)
        run_start = faults.agent_rpcs()
        t0 = time.monotonic()
        names = []
        for i in range(plan.jobs):
            seconds = 1.0 + (i % 5) * 0.5
            job = client.create_job(
                [sys.executable, str(script), str(out), str(seconds)],
                gpu_count=1,
                max_attempts=20,
                display_name=f"chaos-{i}",
            )
            names.append(job.name)
        say(f"{plan.jobs} jobs submitted in {time.monotonic() - t0:.1f} s")

        # The chaos: interleave broker and rig kills while the queue drains.
        events = ["broker"] * plan.broker_kills + ["rig"] * plan.agent_kills
        events += [f for f in plan.faults for _ in range(plan.fault_events)]
        rnd.shuffle(events)
        for what in events:
            time.sleep(rnd.uniform(*plan.gap_s))
            if what in FAULTS:
                assert fleet.broker is not None
                db = root / "fleet" / "broker" / "broker.db"
                line = _fault(what, plan, faults, agents, fleet.broker, db, report)
                report.faults_done[what] = report.faults_done.get(what, 0) + 1
                say(f"{time.monotonic() - t0:6.1f} s  {line}")
            elif what == "broker":
                broker = fleet.broker
                assert broker is not None
                broker.proc.send_signal(signal.SIGKILL)
                broker.proc.wait(timeout=10)
                fleet.processes.remove(broker)
                report.broker_kills_done += 1
                time.sleep(rnd.uniform(0.5, 1.5))
                fleet.start_broker(*listen, **lease)
                say(f"{time.monotonic() - t0:6.1f} s  broker killed and restarted")
            else:
                name = rnd.choice(sorted(agents))
                _kill_tree(agents[name])
                fleet.processes.remove(agents[name])
                report.agent_kills_done += 1
                time.sleep(rnd.uniform(0.2, 1.0))
                agents[name] = start_rig(name)
                say(f"{time.monotonic() - t0:6.1f} s  {name} killed and restarted")
        last_kill = time.monotonic()

        # Everything settles.
        terminal = {job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED, job_pb2.Job.CANCELLED}
        deadline = last_kill + plan.settle_timeout_s
        while time.monotonic() < deadline:
            try:
                jobs = {j.name: j for j in client.iter_jobs()}
            except Exception:  # the restarted broker may still be coming up
                time.sleep(0.5)
                continue
            final = {n: jobs[n] for n in names}
            if all(j.state in terminal for j in final.values()):
                report.all_terminal = True
                break
            time.sleep(0.5)
        end = time.monotonic()
        report.seconds_to_all_terminal = round(end - t0, 1)
        report.seconds_after_last_kill = round(end - last_kill, 1)
        say(f"{end - t0:6.1f} s  all terminal: {report.all_terminal}")
        with contextlib.suppress(Exception):
            value = faults.nf.p99(run_start, faults.agent_rpcs())
            report.p99_agent_rpc_s_whole_run = None if value is None else round(value, 4)
    finally:
        fleet.stop()
        left_netns = faults.close()
    report.leftover_processes = [str(p) for p in fleet.leftovers()] + left_netns

    states = Counter(job_pb2.Job.State.Name(j.state) for j in final.values())
    report.states = dict(states)
    report.not_succeeded = {
        n: f"{job_pb2.Job.State.Name(j.state)}: {j.status_message}"
        for n, j in final.items()
        if j.state != job_pb2.Job.SUCCEEDED
    }
    per_job = [len(j.attempts) for j in final.values()]
    if per_job:
        report.attempts = sum(per_job)
        report.attempts_per_job_mean = round(sum(per_job) / len(per_job), 2)
        report.attempts_per_job_max = max(per_job)
        report.jobs_with_retries = sum(1 for n in per_job if n > 1)

    # No job ran in two processes at once.
    runs = marker_runs(out)
    report.jobs_that_ran = len(runs)
    for job_id, intervals in sorted(runs.items()):
        intervals.sort()
        report.max_concurrent_runs_per_job = max(
            report.max_concurrent_runs_per_job, max_overlap([(a, b) for a, b, _ in intervals])
        )
        for (_, a1, a), (b0, _, b) in itertools.pairwise(intervals):
            if b0 < a1:
                report.overlaps.append(
                    f"job {job_id}: {a} ran until {a1:.2f} but {b} started at {b0:.2f}"
                )

    # The ledger balances and every attempt is settled exactly once.
    report.ledger_ok, report.ledger_output = _verify_ledger(root / "fleet" / "broker")
    report.attempts_settled_twice = _settled_twice(root / "fleet" / "broker" / "broker.db")
    report.jobs_lost = plan.jobs - report.states.get("SUCCEEDED", 0)
    report.jobs_run_twice_concurrently = len({o.split(":", 1)[0] for o in report.overlaps})
    return report


def _machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    """Run the scenario once and print its figures; exit status 1 when a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--broker-kills", type=int, default=5)
    parser.add_argument("--agent-kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--settle-timeout-s", type=float, default=0, help="[default: 240 + 2 s a job]"
    )
    parser.add_argument(
        "--faults",
        default="",
        help=f"comma-separated, mixed into the kills: {','.join(FAULTS)} (see the docstring)",
    )
    parser.add_argument("--fault-events", type=int, default=2, help="events of each fault kind")
    parser.add_argument("--loss-percent", type=int, default=20)
    parser.add_argument("--loss-s", type=float, default=20.0)
    parser.add_argument("--db-outage-s", type=float, default=10.0)
    parser.add_argument("--dir", type=Path, help="keep the run's files here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    plan = ChaosPlan(
        jobs=args.jobs,
        agents=args.agents,
        broker_kills=args.broker_kills,
        agent_kills=args.agent_kills,
        seed=args.seed,
        settle_timeout_s=args.settle_timeout_s or 240.0 + 2.0 * args.jobs,
        faults=tuple(f for f in args.faults.split(",") if f),
        fault_events=args.fault_events,
        loss_percent=args.loss_percent,
        loss_s=args.loss_s,
        db_outage_s=args.db_outage_s,
    )
    with tempfile.TemporaryDirectory(prefix="rigshift-chaos-") as tmp:
        root = args.dir or Path(tmp)
        report = run_chaos(plan, root, say=lambda line: print(line, file=sys.stderr, flush=True))
    ok = (
        report.all_terminal
        and report.states == {"SUCCEEDED": plan.jobs}
        and report.max_concurrent_runs_per_job == 1
        and report.ledger_ok
        and not report.leftover_processes
        and report.jobs_lost == 0
        and report.jobs_run_twice_concurrently == 0
        and report.attempts_settled_twice == 0
    )
    figures = asdict(report) | {"ok": ok, "machine": _machine()}
    if args.json:
        figures["ledger_output"] = report.ledger_output.strip().splitlines()[-1:]
        print(json.dumps(figures))
    else:
        print(f"machine            {figures['machine']}")
        print(f"jobs               {plan.jobs} on {plan.agents} rigs x 2 GPUs: {report.states}")
        print(
            f"kills              broker {report.broker_kills_done}, rigs {report.agent_kills_done}"
        )
        print(
            f"all terminal after {report.seconds_to_all_terminal} s "
            f"({report.seconds_after_last_kill} s after the last kill)"
        )
        print(
            f"attempts per job   mean {report.attempts_per_job_mean}, max "
            f"{report.attempts_per_job_max}; {report.jobs_with_retries} jobs retried"
        )
        print(f"max concurrent     {report.max_concurrent_runs_per_job} run(s) of one job at once")
        if plan.faults:
            print(f"faults             {report.faults_done}")
            print(f"half-open detected after {report.half_open_detect_s} s (per black hole)")
            print(
                f"under loss         heartbeat round trip p99 "
                f"{report.p99_heartbeat_rtt_s_under_loss} s (agents); agent RPCs p99 "
                f"{report.p99_agent_rpc_s_under_loss} s (broker side; "
                f"{report.p99_agent_rpc_s_whole_run} s over the whole run)"
            )
            print(f"db writes again    after {report.db_outage_recovery_s} s (per outage)")
        print(
            f"the three zeros    jobs lost {report.jobs_lost}, run twice at once "
            f"{report.jobs_run_twice_concurrently}, attempts settled twice "
            f"{report.attempts_settled_twice}"
        )
        print(f"verify-ledger      {'ok' if report.ledger_ok else 'FAILED'}")
        print(report.ledger_output.strip())
        print(f"result             {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
