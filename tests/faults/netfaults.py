"""Helpers of the fault tests (their fixtures are in conftest.py): network namespaces
joined by a veth pair with nftables faults (:class:`NetNs`), and a fleet of real
processes running marker jobs (:class:`FaultFleet`). See conftest.py for the layout."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.fleet import MARKER_JOB, LocalFleet, ManagedProcess, marker_runs, rigshift_argv

#: Lease of the fault tests' brokers and agents (as in tests/e2e).
LEASE = {"lease_ttl_s": 6, "heartbeat_interval_s": 1}

_TABLE = "rigshift_faults"


def run(*argv: str, input: str | None = None, check: bool = True) -> str:
    """Run a command (``ip``, ``nft``); its stdout. ``check``: raise when it fails."""
    done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def why_no_netns() -> str | None:
    """Why network-namespace faults cannot run here; None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and nftables rules)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command (Debian package {package}; .ci/run installs it)"
    return None


@dataclass
class NetNs:
    """A network namespace joined to the root namespace by a veth pair."""

    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    @property
    def wrap(self) -> list[str]:
        """Prefix of an argv that runs it inside the namespace (``ip`` execs it)."""
        return [shutil.which("ip") or "ip", "netns", "exec", self.name]

    def _rules(self, match: str) -> None:
        script = (
            f"table inet {_TABLE}\ndelete table inet {_TABLE}\n"
            f"table inet {_TABLE} {{\n"
            f"  chain cut_in {{ type filter hook input priority 0; policy accept;\n"
            f'    iifname "{self.ns_if}" {match}\n  }}\n'
            f"  chain cut_out {{ type filter hook output priority 0; policy accept;\n"
            f'    oifname "{self.ns_if}" {match}\n  }}\n'
            f"}}\n"
        )
        run(*self.wrap, "nft", "-f", "-", input=script)

    def blackhole(self) -> None:
        """Drop every packet between the namespace and the root namespace, both ways."""
        self._rules("drop")

    def loss(self, percent: int) -> None:
        """Drop ``percent`` % of the packets at random, each way."""
        self._rules(f"numgen random mod 100 < {int(percent)} drop")

    def heal(self) -> None:
        """Remove the fault rules."""
        run(*self.wrap, "nft", "delete", "table", "inet", _TABLE, check=False)

    def counters(self) -> str:
        """The fault table as nft lists it (for failure messages)."""
        return run(*self.wrap, "nft", "list", "table", "inet", _TABLE, check=False)


def free_subnet() -> ipaddress.IPv4Network:
    used = run("ip", "-o", "-4", "addr", "show")
    for _ in range(100):
        net = ipaddress.ip_network(
            f"10.213.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30"
        )
        if f" {net[1]}/" not in used and f" {net[2]}/" not in used:
            return net
    raise RuntimeError("no free /30 in 10.213.0.0/16")


def new_netns() -> NetNs:
    """Names and addresses for a new namespace (nothing is created yet)."""
    tag = secrets.token_hex(3)
    net = free_subnet()
    return NetNs(f"rsf-{tag}", f"rsf{tag}h", f"rsf{tag}n", str(net[1]), str(net[2]))


def create_netns(ns: NetNs) -> None:
    """Create the namespace, its veth pair and addresses (remove_netns undoes it)."""
    run("ip", "netns", "add", ns.name)
    run("ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
    run("ip", "link", "set", ns.ns_if, "netns", ns.name)
    run("ip", "addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if)
    run("ip", "link", "set", ns.host_if, "up")
    run("ip", "-n", ns.name, "addr", "add", f"{ns.ns_ip}/30", "dev", ns.ns_if)
    run("ip", "-n", ns.name, "link", "set", ns.ns_if, "up")
    run("ip", "-n", ns.name, "link", "set", "lo", "up")


def remove_netns(ns: NetNs) -> list[str]:
    """Remove the table, the veth pair and the namespace; what is left (should be nothing)."""
    run("ip", "netns", "exec", ns.name, "nft", "delete", "table", "inet", _TABLE, check=False)
    run("ip", "link", "del", ns.host_if, check=False)
    run("ip", "netns", "del", ns.name, check=False)
    left = []
    if ns.name in run("ip", "netns", "list", check=False).split():
        left.append(f"namespace {ns.name}")
    if ns.host_if in run("ip", "-o", "link", "show", check=False):
        left.append(f"veth {ns.host_if}")
    return left


# --- a fleet of real processes and what they leave behind -----------------------------


def log_time(line: str) -> float | None:
    """Unix time of an agent log line (``%(asctime)s`` of ``rigshift agent run``)."""
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
    if m is None:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def p99(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The 99th percentile of what a cumulative histogram gained between two scrapes,
    interpolated within its bucket like PromQL's ``histogram_quantile``; seconds."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank, lower, below = 0.99 * total, 0.0, 0.0
    for bound, cum in zip(bounds, counts, strict=True):
        if cum >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cum - below, 1e-9)
        lower, below = bound, cum
    return lower


def histogram(address: str, metric: str, method_re: str = "") -> dict[float, float]:
    """Buckets (cumulative) of a Prometheus histogram at ``http://address/metrics``, summed
    over its series whose ``method`` label matches ``method_re``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for s in family.samples:
            if not s.name.endswith("_bucket"):
                continue
            if method_re and not re.search(method_re, s.labels.get("method", "")):
                continue
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
    return buckets


class FaultFleet:
    """A broker, agents (``--executor local``, one simulated GPU each) and marker jobs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.out = root / "out"
        self.out.mkdir(parents=True)
        self.script = root / "job.py"
        self.script.write_text(MARKER_JOB)
        self.fleet = LocalFleet(root / "fleet")
        self.metrics_address = ""

    # --- processes ---

    def start_broker(self, host: str = "127.0.0.1", **options: object) -> str:
        """The broker on ``host`` (a free port), lease as in tests/e2e, /metrics on."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.metrics_address = f"127.0.0.1:{s.getsockname()[1]}"
        return self.fleet.start_broker(
            listen=f"{host}:0", metrics_listen=self.metrics_address, **{**LEASE, **options}
        )

    def start_agent(
        self,
        name: str,
        token: str,
        *,
        netns: NetNs | None = None,
        config: dict[str, object] | None = None,
        **options: object,
    ) -> ManagedProcess:
        """An agent (inside ``netns`` when given); ``config``: more AgentConfig fields."""
        toml = self.root / f"{name}.toml"
        toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in (config or {}).items()))
        options = {
            "executor": "local",
            "simulate": "RTX3090x1",
            "drain_grace_s": 5,
            "config": str(toml),
            **LEASE,
            **options,
        }
        return self.fleet.start_agent(name, token, wrap=netns.wrap if netns else (), **options)

    def client(self) -> Any:
        """The admin SDK client."""
        return self.fleet.client()

    def stop(self) -> list[int]:
        """Stop every process; pids left running (should be none)."""
        self.fleet.stop()
        return self.fleet.leftovers()

    # --- jobs ---

    def submit(self, seconds: float, **kw: object) -> str:
        """A marker job of ``seconds``; its name."""
        job = self.client().create_job(
            [sys.executable, str(self.script), str(self.out), str(seconds)], gpu_count=1, **kw
        )
        return str(job.name)

    def wait(
        self, names: Iterable[str], done: Callable[[Any], bool], timeout_s: float, what: str
    ) -> dict[str, Any]:
        """Poll until ``done(job)`` holds for every job; the jobs."""
        names = list(names)
        deadline = time.monotonic() + timeout_s
        jobs: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # a call lost to the fault: ask again
                jobs = {n: self.client().get_job(n) for n in names}
                if all(done(j) for j in jobs.values()):
                    return jobs
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}: {jobs}")

    def runs(self) -> dict[str, list[tuple[float, float, str]]]:
        """Each job's runs as (began, last heartbeat, label), from the marker files."""
        return marker_runs(self.out)

    def overlaps(self) -> list[str]:
        """Runs of one job that were alive at the same time (must be none)."""
        found = []
        for job_id, intervals in sorted(self.runs().items()):
            intervals.sort()
            for i, (_, end, a) in enumerate(intervals):
                for begin, _, b in intervals[i + 1 :]:
                    if begin < end:
                        found.append(
                            f"job {job_id}: {a} ran until {end:.2f}, {b} began {begin:.2f}"
                        )
        return found

    def verify_ledger(self) -> tuple[bool, str]:
        """``rigshift admin verify-ledger`` on the broker's database."""
        done = subprocess.run(
            [
                *rigshift_argv(),
                "admin",
                "verify-ledger",
                "--home",
                str(self.root / "fleet" / "broker"),
            ],
            capture_output=True,
            text=True,
            env=self.fleet.env,
            timeout=60,
        )
        out = done.stdout + done.stderr
        return done.returncode == 0 and "settled exactly once" in out, out

    # --- what the processes said ---

    @staticmethod
    def log_lines(p: ManagedProcess, pattern: str, after: float = 0.0) -> list[tuple[float, str]]:
        """(time, line) of the log lines of ``p`` matching ``pattern`` at or after ``after``."""
        found = []
        for line in p.log_path.read_text(errors="replace").splitlines():
            t = log_time(line)
            # (log times are rounded down to the millisecond)
            if t is not None and t >= after - 0.001 and re.search(pattern, line):
                found.append((t, line))
        return found

    def wait_log(self, p: ManagedProcess, pattern: str, after: float, timeout_s: float) -> float:
        """When ``p`` first logged ``pattern`` at or after ``after`` (waits for it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.log_lines(p, pattern, after)
            if found:
                return found[0][0]
            time.sleep(0.1)
        raise AssertionError(f"{p.name} did not log {pattern!r}:\n{p.log_tail(40)}")

    def histogram(self, metric: str, address: str = "", method_re: str = "") -> dict[float, float]:
        """:func:`histogram` of this fleet's broker by default."""
        return histogram(address or self.metrics_address, metric, method_re)

    def agent_metrics_address(self, p: ManagedProcess) -> str:
        """``host:port`` of an agent's /metrics (from its log)."""
        found = self.log_lines(p, r"metrics on http://")
        assert found, f"{p.name} serves no metrics"
        return found[0][1].rsplit("http://", 1)[1].split("/", 1)[0]
