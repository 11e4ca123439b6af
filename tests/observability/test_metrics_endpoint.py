"""The broker's metrics port (`/metrics`, `/sd`), its RPC metrics and `broker serve` wiring."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prom_helpers import start_broker
from prometheus_client.parser import text_string_to_metric_families
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

from broker.metrics import ALLOWED_LABELS
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2 as ws


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], ""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def broker(tmp_path: Path):
    rb = start_broker(
        tmp_path / "broker", lease_ttl_s=3.0, heartbeat_interval_s=0.5, metrics_listen="127.0.0.1:0"
    )
    yield rb
    rb.stop()


def test_metrics_and_sd_over_http(broker):
    farm = create_farm(broker.address, "farm-x")
    agent = ProtocolAgent(broker.address, farm.enrollment_token, gpus(2, "RTX 3090"))
    agent.stub.RegisterWorker(
        ws.RegisterWorkerRequest(
            enrollment_token=farm.enrollment_token,
            hostname="rig-x",
            agent_version="test",
            gpus=gpus(2, "RTX 3090"),
            metrics_address="10.1.2.3:9400",
        )
    )
    with authed_channel(broker.address) as ch, pytest.raises(grpc.RpcError):
        jsg.JobServiceStub(ch).GetJob(js.GetJobRequest(name="jobs/nope"))
    agent.close()

    base = f"http://{broker.broker.metrics_address}"
    status, content_type, text = get(f"{base}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    values = samples(text)
    create = frozenset({("method", "rigshift.v1.FarmService/CreateFarm"), ("code", "OK")})
    assert values[("rigshift_grpc_requests_total", create)] == 1
    not_found = frozenset({("method", "rigshift.v1.JobService/GetJob"), ("code", "NOT_FOUND")})
    assert values[("rigshift_grpc_requests_total", not_found)] == 1
    assert values[("rigshift_grpc_request_duration_seconds_count", not_found)] == 1
    online = frozenset({("farm", "farm-x"), ("state", "online")})
    assert values[("rigshift_workers", online)] == 1
    for name, labels in values:
        if name.startswith("rigshift_"):
            assert {k for k, _ in labels} <= ALLOWED_LABELS, name
    assert any(name.startswith("process_") for name, _ in values)

    status, content_type, text = get(f"{base}/sd")
    assert status == 200 and content_type.startswith("application/json")
    assert json.loads(text) == [
        {"targets": ["10.1.2.3:9400"], "labels": {"farm": "farm-x", "gpu_model": "RTX 3090"}}
    ]
    assert get(f"{base}/nothing-here")[0] == 404


def test_metrics_port_is_off_by_default(tmp_path: Path):
    rb = start_broker(tmp_path / "broker")
    try:
        assert rb.broker.metrics_address == ""
        assert rb.broker.metrics is not None  # RPCs are still counted, just not served
    finally:
        rb.stop()


def test_broker_serve_prints_the_metrics_url(tmp_path: Path):
    exe = Path(sys.executable).parent / "rigshift"
    proc = subprocess.Popen(
        [
            str(exe),
            "broker",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--home",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        while not (lines and lines[-1].startswith("rigshift broker metrics on ")):
            line = proc.stdout.readline()
            assert line, f"broker serve exited: {lines} {proc.stderr.read()}"
            lines.append(line.strip())
        listening = [line for line in lines if line.startswith("rigshift broker listening on ")]
        assert listening and lines.index(listening[0]) < len(lines) - 1
        url = lines[-1].split()[-1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        status, _, text = get(url)
        assert status == 200 and "rigshift_jobs{" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
