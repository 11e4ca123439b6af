"""Every dashboard query and every alert expression, run by a real Prometheus.

Set-up: a real broker (gRPC and ``/metrics`` + ``/sd`` on port 0), test-side
agents that speak the real WorkerService protocol and register a
``metrics_address``, and a real Prometheus (Debian's package) started from
``deploy/prometheus/prometheus.yml`` with only the addresses, a 1 s scrape and
evaluation interval and a temporary storage changed. It scrapes the broker and
discovers the agents through the broker's ``/sd``, and loads the real rule file.

The agents' exporters here are **stand-ins**: tiny prometheus_client servers in
this process serving the agent metric names of docs/metrics.md, because this
test exercises the Prometheus side (discovery, labels, queries). The real
agent's exporter is tested against the same names in the agent's own tests.

Once the targets are up, a few jobs go through the lifecycle (success, failure,
cancel, one that stays pending) and a worker's lease expires. Then:

* every query of every dashboard panel (Grafana variables filled in:
  ``$__rate_interval`` → 1m, ``$farm`` → ``.*``) must succeed and return at
  least one series;
* every recording rule must have produced series;
* every alert expression must evaluate without error. An alert expression is
  empty while the alert is not firing, so "no series" is checked on its parts
  instead: every vector selector it reads (metric name and matchers, e.g.
  ``up{job="rigshift-broker"}``) must return series. Also every rule group must
  evaluate without error, and the heartbeat-lost alert must really fire.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prom_helpers import (
    CONFIG,
    RULES,
    alert_rules,
    concrete,
    dashboards,
    panel_queries,
    recording_rules,
    selectors,
    start_broker,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

from rigshift.v1 import job_pb2
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2 as ws

pytestmark = pytest.mark.timeout(90)

DEADLINE_S = 30.0


class StandInAgentExporter:
    """STAND-IN for a real agent's ``--metrics-listen`` exporter (not the agent itself).

    Serves the agent metric names of docs/metrics.md for some GPUs so that
    Prometheus has agent-side series to discover and scrape.
    """

    def __init__(self, models: list[str]) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["gpu", "gpu_model"]
        power = Gauge("rigshift_gpu_power_watts", "Power.", labels, registry=r)
        self.energy = Counter("rigshift_gpu_energy_joules", "Energy.", labels, registry=r)
        temp = Gauge("rigshift_gpu_temperature_celsius", "Temperature.", labels, registry=r)
        util = Gauge("rigshift_gpu_utilization_ratio", "Utilisation.", labels, registry=r)
        self.state = Gauge("rigshift_gpu_state", "State.", [*labels, "state"], registry=r)
        ask = Gauge("rigshift_gpu_ask_price_usd_per_gpu_hour", "Ask.", labels, registry=r)
        self.rtt = Histogram("rigshift_agent_heartbeat_rtt_seconds", "RTT.", registry=r)
        self.running = Gauge("rigshift_agent_jobs_running", "Jobs running.", registry=r)
        cap = Gauge("rigshift_gpu_power_limit_watts", "Power limit set.", labels, registry=r)
        self.curtailed = Gauge("rigshift_agent_curtailed", "Curtailed.", registry=r)
        self.models = models
        for i, model in enumerate(models):
            power.labels(str(i), model).set(120.0)
            self.energy.labels(str(i), model).inc(1000)
            temp.labels(str(i), model).set(60.0)
            util.labels(str(i), model).set(0.0)
            ask.labels(str(i), model).set(2.0)
            cap.labels(str(i), model).set(300.0)
            self.set_state(i, "idle")
        self.rtt.observe(0.004)
        self.curtailed.set(0)
        self.server, self.thread = start_http_server(0, addr="127.0.0.1", registry=r)
        self.address = f"127.0.0.1:{self.server.server_port}"

    def set_state(self, gpu: int, state: str) -> None:
        for s in ("ai", "mining", "idle", "quarantined"):
            self.state.labels(str(gpu), self.models[gpu], s).set(1 if s == state else 0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ExportingAgent(ProtocolAgent):
    """The protocol agent, registering with the address of its (stand-in) exporter."""

    def __init__(self, address: str, token: str, gpu_infos, hostname: str, metrics: str):
        super().__init__(address, token, gpu_infos, hostname)
        self.metrics_address = metrics

    def register(self, worker: str = "") -> ws.RegisterWorkerResponse:
        resp = self.stub.RegisterWorker(
            ws.RegisterWorkerRequest(
                enrollment_token=self.token,
                hostname=self.hostname,
                agent_version="test",
                gpus=self.gpu_infos,
                worker=worker,
                metrics_address=self.metrics_address,
            )
        )
        self.worker, self.credential = resp.worker, resp.credential
        return resp


@contextmanager
def heartbeats(agents: list[ProtocolAgent], interval_s: float = 0.5) -> Iterator[None]:
    """Keep the agents' leases alive from a background thread."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            for agent in agents:
                with suppress(grpc.RpcError):
                    agent.heartbeat()

    thread = threading.Thread(target=loop, name="heartbeats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as err:  # Prometheus answers a bad query with 400 + JSON
        return json.loads(err.read() or b"{}") | {"http_status": err.code}


@contextmanager
def prometheus(binary: str, tmp: Path, broker_metrics: str) -> Iterator[str]:
    """A real Prometheus from deploy/prometheus/prometheus.yml, pointed at this broker."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    config["rule_files"] = [str(RULES)]
    for job in config["scrape_configs"]:
        if "static_configs" in job:
            job["static_configs"] = [{"targets": [broker_metrics]}]
        for sd in job.get("http_sd_configs", []):
            sd["url"] = f"http://{broker_metrics}/sd"
            sd["refresh_interval"] = "1s"
    config_file = tmp / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log_path = tmp / "prometheus.log"
    for _ in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"prometheus did not start:\n{log_path.read_text()[-3000:]}")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(url: str, expr: str) -> dict[str, Any]:
    return http_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def wait_for(check, what: str, timeout: float = DEADLINE_S):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.25)


def run_jobs(address: str, agent_a: ExportingAgent, agent_b: ExportingAgent, exp_a) -> None:
    """One success, one failure, one cancel, one job nobody can run, one NOT_FOUND."""
    with authed_channel(address) as ch:
        jobs = jsg.JobServiceStub(ch)

        def submit(**spec: Any) -> str:
            spec.setdefault("command", ["python", "train.py"])
            return jobs.CreateJob(js.CreateJobRequest(spec=job_pb2.JobSpec(**spec))).name

        ok = submit(gpu_count=1, gpu_model="RTX 3090")
        a = agent_a.next_of("assignment")
        assert a.job == ok
        agent_a.start(a.job, a.attempt)
        exp_a.set_state(0, "ai")
        exp_a.running.set(1)
        time.sleep(0.3)
        agent_a.finish(a.job, a.attempt, energy=360_000)
        exp_a.set_state(0, "idle")
        exp_a.running.set(0)

        bad = submit(gpu_count=2, gpu_model="RTX 3090")
        a = agent_a.next_of("assignment")
        assert a.job == bad
        agent_a.start(a.job, a.attempt)
        agent_a.finish(a.job, a.attempt, exit_code=1, energy=20_000)

        cancelled = submit(gpu_count=1, gpu_model="RTX 3060")
        b = agent_b.next_of("assignment")
        agent_b.start(b.job, b.attempt)
        time.sleep(0.2)
        jobs.CancelJob(js.CancelJobRequest(name=cancelled))
        agent_b.next_of("cancellation")
        agent_b.finish(b.job, b.attempt, exit_code=143, energy=50_000)

        submit(gpu_count=1, gpu_model="H100")  # no farm has one: stays PENDING
        with pytest.raises(grpc.RpcError) as err:
            jobs.GetJob(js.GetJobRequest(name="jobs/doesnotexist"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    exp_a.energy.labels("0", "RTX 3090").inc(360_000)
    exp_a.rtt.observe(0.006)


def test_every_dashboard_query_and_alert_expression(prometheus_bin: str, tmp_path: Path):
    rb = start_broker(
        tmp_path / "broker",
        lease_ttl_s=3.0,
        heartbeat_interval_s=0.5,
        metrics_listen="127.0.0.1:0",
    )
    exporters: list[StandInAgentExporter] = []
    agents: list[ProtocolAgent] = []
    try:
        farm_a = create_farm(rb.address, "farm-a")
        farm_b = create_farm(rb.address, "farm-b")
        exp_a = StandInAgentExporter(["RTX 3090", "RTX 3090"])
        exp_b = StandInAgentExporter(["RTX 3060"])
        exporters += [exp_a, exp_b]
        agent_a = ExportingAgent(
            rb.address,
            farm_a.enrollment_token,
            gpus(2, "RTX 3090", price=2_000_000),
            "rig-a",
            exp_a.address,
        )
        agent_b = ExportingAgent(
            rb.address,
            farm_b.enrollment_token,
            gpus(1, "RTX 3060", price=1_000_000),
            "rig-b",
            exp_b.address,
        )
        agents += [agent_a, agent_b]
        for agent in (agent_a, agent_b):
            agent.register()
            agent.connect()
            agent.next_of("reconcile")

        with (
            heartbeats([agent_a, agent_b]),
            prometheus(prometheus_bin, tmp_path, rb.broker.metrics_address) as url,
        ):
            check_targets(url, exp_a.address, exp_b.address)
            # A rig that registers and never heartbeats: its lease expires after 3 s.
            doomed = ProtocolAgent(rb.address, farm_a.enrollment_token, gpus(1, "RTX 3070"))
            agents.append(doomed)
            doomed.register()
            run_jobs(rb.address, agent_a, agent_b, exp_a)
            check_queries(url)
            check_rules_and_alerts(url)
    finally:
        for agent in agents:
            agent.close()
        for exporter in exporters:
            exporter.close()
        rb.stop()


def check_targets(url: str, exporter_a: str, exporter_b: str) -> None:
    """The broker and both agents (found through /sd, with farm and gpu_model) are up."""

    def targets() -> list[dict[str, Any]] | None:
        active = http_json(f"{url}/api/v1/targets")["data"]["activeTargets"]
        if len(active) == 3 and all(t["health"] == "up" for t in active):
            return active
        return None

    active = wait_for(targets, "the broker and two agents to be scraped")
    agents = {
        t["labels"]["instance"]: t["labels"]
        for t in active
        if t["labels"]["job"] == "rigshift-agent"
    }
    assert agents[exporter_a]["farm"] == "farm-a"
    assert agents[exporter_a]["gpu_model"] == "RTX 3090"
    assert agents[exporter_b]["farm"] == "farm-b"
    assert agents[exporter_b]["gpu_model"] == "RTX 3060"


def check_queries(url: str) -> None:
    """Panels, variables, recording rules: no error, at least one series each."""
    wanted: dict[str, str] = {}
    for board, title, expr in panel_queries():
        wanted[concrete(expr)] = f"{board} / {title}"
    for board in dashboards().values():
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                metric = variable["query"]["query"].split("(")[1].split(",")[0]
                wanted[metric] = f"variable {variable['name']}"
    for rule in recording_rules():
        wanted[rule["record"]] = f"recording rule {rule['record']}"
    for rule in alert_rules():
        for selector in selectors(rule["expr"]):
            wanted[selector] = f"alert {rule['alert']} reads {selector}"

    failures: dict[str, str] = {}
    deadline = time.monotonic() + DEADLINE_S
    pending = dict(wanted)
    while pending and time.monotonic() < deadline:
        for expr in list(pending):
            answer = query(url, expr)
            if answer.get("status") != "success":
                failures[expr] = f"{pending.pop(expr)}: error {answer.get('error')}"
            elif answer["data"]["result"]:
                del pending[expr]
        if pending:
            time.sleep(0.5)
    for expr, where in pending.items():
        failures[expr] = f"{where}: no series"
    assert not failures, "\n".join(f"{where}\n    {expr}" for expr, where in failures.items())

    # Agent series carry the farm from /sd and their own gpu_model (honor_labels).
    farms = query(url, "count by (farm, gpu_model) (rigshift_gpu_power_watts)")["data"]["result"]
    assert {(r["metric"]["farm"], r["metric"]["gpu_model"]) for r in farms} == {
        ("farm-a", "RTX 3090"),
        ("farm-b", "RTX 3060"),
    }
    farm_label = query(url, "count by (farm) (rigshift_workers)")["data"]["result"]
    assert {r["metric"]["farm"] for r in farm_label} == {"farm-a", "farm-b"}


def check_rules_and_alerts(url: str) -> None:
    """Every alert expression evaluates; every rule group is healthy; heartbeat loss fires."""
    for rule in alert_rules():
        answer = query(url, rule["expr"])
        assert answer.get("status") == "success", (rule["alert"], answer.get("error"))

    def evaluated() -> list[dict[str, Any]] | None:
        groups = http_json(f"{url}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and not any(r.get("lastEvaluation", "0001").startswith("0001") for r in rules):
            return rules
        return None

    rules = wait_for(evaluated, "every rule to be evaluated")
    assert len(rules) == len(alert_rules()) + len(recording_rules())
    unhealthy = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not unhealthy, unhealthy

    def heartbeat_lost() -> list[dict[str, Any]] | None:
        alerts = http_json(f"{url}/api/v1/alerts")["data"]["alerts"]
        return [
            a
            for a in alerts
            if a["labels"]["alertname"] == "RigshiftWorkerHeartbeatLost" and a["state"] == "firing"
        ] or None

    (fired,) = wait_for(heartbeat_lost, "RigshiftWorkerHeartbeatLost to fire")
    assert fired["labels"]["farm"] == "farm-a"
    firing = {
        a["labels"]["alertname"]
        for a in http_json(f"{url}/api/v1/alerts")["data"]["alerts"]
        if a["state"] == "firing"
    }
    assert firing == {"RigshiftWorkerHeartbeatLost"}, firing
