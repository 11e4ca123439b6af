"""The ``rigshift`` CLI against a real broker (the ``broker_address`` fixture).

Each test drives the CLI through click's CliRunner exactly as a user would,
with ``--broker`` pointing at an in-process gRPC broker on port 0 with a
temporary SQLite database. No worker is registered here, so jobs stay PENDING.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from client.errors import InvalidArgument
from client.sdk import Client, build_working_dir_archive
from rigshift.v1 import job_pb2
from rigshift_cli import main

pytestmark = pytest.mark.timeout(60)


def rs(address: str, group: str, *args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``rigshift GROUP --broker ADDRESS ARGS...`` and return the result."""
    return CliRunner().invoke(main, [group, "--broker", address, *args], env=env)


def ok(result: Result) -> Result:
    """Assert a clean exit 0, showing what went wrong otherwise."""
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def as_json(result: Result) -> dict[str, Any]:
    return json.loads(ok(result).stdout)


def failed(result: Result, code: int = 1) -> Result:
    """Assert a handled failure: the exit code, and no traceback."""
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result


def submit(address: str, *args: str) -> dict[str, Any]:
    return as_json(rs(address, "job", "submit", "--json", *args, "--", "python", "train.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- farms -------------------------------------------------------------------


def test_farm_create_human(broker_address: str) -> None:
    result = ok(
        rs(broker_address, "farm", "create", "north-1", "--region", "eu-north", "--pue", "1.25")
    )
    assert "created farms/" in result.stdout
    token = result.stdout.split("enrollment token: ")[1].split()[0]
    assert token
    assert f"rigshift agent run --broker {broker_address} --token {token}" in result.stdout


def test_farm_create_json_and_get(broker_address: str) -> None:
    farm = as_json(
        rs(
            broker_address,
            "farm",
            "create",
            "north-2",
            "--region",
            "eu-north",
            "--tariff-usd-per-kwh",
            "0.12",
            "--pue",
            "1.25",
            "--json",
        )
    )
    assert farm["name"].startswith("farms/")
    assert farm["enrollment_token"]
    assert farm["display_name"] == "north-2"
    assert farm["region"] == "eu-north"
    assert int(farm["tariff_micros_per_kwh"]) == 120_000
    assert farm["pue_permille"] == 1250

    got = as_json(rs(broker_address, "farm", "get", farm["name"], "--json"))
    assert got["name"] == farm["name"]
    assert "enrollment_token" not in got  # only CreateFarm returns it

    human = ok(rs(broker_address, "farm", "get", farm["name"].split("/")[1])).stdout
    assert "north-2" in human and "$0.120000/kWh" in human and "1.250" in human


def test_farm_workers_none(broker_address: str) -> None:
    farm = as_json(rs(broker_address, "farm", "create", "empty-farm", "--json"))
    assert ok(rs(broker_address, "farm", "workers", "--farm", farm["name"])).stdout == (
        "no workers\n"
    )
    assert as_json(rs(broker_address, "farm", "workers", "--farm", farm["name"], "--json")) == {}


def test_farm_drain_unknown_worker(broker_address: str) -> None:
    result = failed(rs(broker_address, "farm", "drain", "no-such-worker"))
    assert result.stderr.startswith("error: NOT_FOUND")


# -- jobs --------------------------------------------------------------------


def test_submit_get_list(broker_address: str) -> None:
    job = submit(
        broker_address,
        "--gpus",
        "2",
        "--gpu-model",
        "RTX 3090",
        "--min-vram-gb",
        "24",
        "--max-price-usd-per-gpu-hour",
        "0.35",
        "--env",
        "LR=0.001",
        "--name",
        "llama-ft",
    )
    assert job["name"].startswith("jobs/")
    assert job["state"] == "PENDING"

    got = as_json(rs(broker_address, "job", "get", job["name"], "--json"))
    assert got["name"] == job["name"]
    assert got["state"] == "PENDING"
    spec = got["spec"]
    assert spec["command"] == ["python", "train.py"]
    assert spec["gpu_count"] == 2
    assert spec["gpu_model"] == "RTX 3090"
    assert int(spec["min_vram_mb"]) == 24_576
    assert int(spec["max_price_micros_per_gpu_hour"]) == 350_000
    assert spec["env"] == {"LR": "0.001"}
    assert spec["display_name"] == "llama-ft"

    listed = as_json(rs(broker_address, "job", "list", "--limit", "1000", "--json"))
    assert job["name"] in [j["name"] for j in listed["jobs"]]

    human = ok(rs(broker_address, "job", "get", job["name"].split("/")[1])).stdout
    assert "PENDING" in human
    assert "2x RTX 3090 (>= 24576 MiB)" in human
    assert "$0.350000/GPU-h" in human
    assert "waiting:" in human

    table = ok(rs(broker_address, "job", "list", "--limit", "1000")).stdout
    assert table.splitlines()[0].split()[:3] == ["JOB", "STATE", "GPUS"]
    assert job["name"] in table


def test_submit_human_output(broker_address: str) -> None:
    result = ok(rs(broker_address, "job", "submit", "echo", "hi"))
    assert result.stdout.startswith("submitted jobs/")
    assert "(PENDING)" in result.stdout


def test_submit_is_idempotent_on_request_id(broker_address: str) -> None:
    first = submit(broker_address, "--request-id", "retry-me-1")
    second = submit(broker_address, "--request-id", "retry-me-1")
    assert first["name"] == second["name"]


def test_submit_zero_gpus_is_rejected_by_the_broker(broker_address: str) -> None:
    result = failed(rs(broker_address, "job", "submit", "--gpus", "0", "--", "python", "x.py"))
    assert result.stderr.startswith("error: INVALID_ARGUMENT")
    assert "spec.gpu_count" in result.stderr
    assert result.stdout == ""


def test_usage_errors_exit_2(broker_address: str) -> None:
    tiny = ["--max-price-usd-per-gpu-hour", "0.0000001", "--", "python", "x.py"]
    failed(rs(broker_address, "job", "submit", *tiny), code=2)
    failed(rs(broker_address, "job", "submit", "--env", "NOEQUALS", "python"), code=2)
    failed(rs(broker_address, "job", "submit"), code=2)  # no command
    failed(rs(broker_address, "job", "list", "--state", "SLEEPING"), code=2)


def test_get_unknown_job(broker_address: str) -> None:
    result = failed(rs(broker_address, "job", "get", "does-not-exist"))
    assert result.stderr.startswith("error: NOT_FOUND")


def test_cancel(broker_address: str) -> None:
    job = submit(broker_address)
    result = ok(rs(broker_address, "job", "cancel", job["name"]))
    assert result.stdout == f"{job['name']} CANCELLED\n"
    again = as_json(rs(broker_address, "job", "cancel", job["name"], "--json"))  # a no-op
    assert again["state"] == "CANCELLED"
    got = as_json(rs(broker_address, "job", "get", job["name"], "--json"))
    assert got["state"] == "CANCELLED"
    assert [h["to_state"] for h in got["history"]][-1] == "CANCELLED"


def test_list_state_filter(broker_address: str) -> None:
    pending = submit(broker_address)
    cancelled = submit(broker_address)
    ok(rs(broker_address, "job", "cancel", cancelled["name"]))

    only_pending = as_json(
        rs(broker_address, "job", "list", "--state", "pending", "--limit", "1000", "--json")
    )
    names = [j["name"] for j in only_pending["jobs"]]
    assert pending["name"] in names and cancelled["name"] not in names
    assert {j["state"] for j in only_pending["jobs"]} == {"PENDING"}

    both = as_json(
        rs(
            broker_address,
            "job",
            "list",
            "--state",
            "PENDING",
            "--state",
            "CANCELLED",
            "--limit",
            "1000",
            "--json",
        )
    )
    names = [j["name"] for j in both["jobs"]]
    assert pending["name"] in names and cancelled["name"] in names


def test_watch_and_logs_of_a_finished_job(broker_address: str) -> None:
    job = submit(broker_address)
    ok(rs(broker_address, "job", "cancel", job["name"]))
    lines = ok(rs(broker_address, "job", "watch", job["name"])).stdout.splitlines()
    assert lines and "CANCELLED" in lines[-1]
    updates = ok(rs(broker_address, "job", "watch", job["name"], "--json")).stdout.splitlines()
    assert json.loads(updates[-1])["state"] == "CANCELLED"
    assert ok(rs(broker_address, "job", "logs", job["name"])).stdout == ""


def test_working_dir_upload(broker_address: str, tmp_path: Path) -> None:
    workdir = tmp_path / "train"
    (workdir / "data").mkdir(parents=True)
    (workdir / "train.py").write_text("print('hello')\n")
    (workdir / "data" / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))  # > 1 MiB chunk
    archive = build_working_dir_archive(workdir, max_bytes=100 * 1024 * 1024)
    os.utime(workdir / "train.py", (0, 12345))  # mtimes do not change the archive
    assert build_working_dir_archive(workdir, max_bytes=100 * 1024 * 1024) == archive
    expected = hashlib.sha256(archive).hexdigest()

    result = rs(
        broker_address,
        "job",
        "submit",
        "--working-dir",
        str(workdir),
        "--json",
        "--",
        "python",
        "train.py",
    )
    job = as_json(result)  # the upload notice goes to stderr, stdout stays pure JSON
    assert job["spec"]["working_dir_sha256"] == expected
    assert expected in result.stderr


def test_working_dir_over_the_limit_is_refused_locally(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(os.urandom(4096))
    with pytest.raises(InvalidArgument) as info:
        build_working_dir_archive(tmp_path, max_bytes=1024)
    assert info.value.reason == "WORKING_DIR_TOO_LARGE"


# -- broker address ------------------------------------------------------------


def test_broker_from_env_and_after_the_command(broker_address: str) -> None:
    runner = CliRunner()
    env = {"RIGSHIFT_BROKER": broker_address}
    ok(runner.invoke(main, ["job", "list", "--json"], env=env))
    ok(runner.invoke(main, ["job", "list", "--broker", broker_address, "--json"]))


def test_unreachable_broker() -> None:
    """A call that is safe to repeat (submit, with its request id) retries for the budget
    and says so once; the others fail at once. The budget is cut to 1 s here (default 60)."""
    address = f"127.0.0.1:{free_port()}"
    cannot = f"error: cannot reach the broker at {address} (is `rigshift broker serve` running?)\n"
    env = {"RIGSHIFT_RETRY_BUDGET_S": "1"}
    for args in (["job", "list"], ["farm", "workers"]):
        assert failed(rs(address, *args, env=env)).stderr == cannot
    result = failed(rs(address, "job", "submit", "--", "true", env=env))
    retrying = (
        f"broker at {address}: cannot reach it; retrying for up to 1 s "
        "(RIGSHIFT_RETRY_BUDGET_S; Ctrl-C stops)\n"
    )
    assert result.stderr == retrying + cannot


def test_a_retry_budget_that_is_not_a_number_is_a_usage_error() -> None:
    result = rs("127.0.0.1:1", "job", "submit", "--", "true", env={"RIGSHIFT_RETRY_BUDGET_S": "x"})
    assert result.exit_code == 2 and "RIGSHIFT_RETRY_BUDGET_S='x'" in result.stderr


# -- the SDK underneath ----------------------------------------------------------


def test_sdk_pages_and_watch(broker_address: str) -> None:
    with Client(broker_address, timeout_s=10) as client:
        names = {client.create_job(["python", "train.py"]).name for _ in range(5)}
        seen = [j.name for j in client.iter_jobs(["PENDING"], page_size=2)]
        assert names <= set(seen) and len(seen) == len(set(seen))

        job = sorted(names)[0]
        updates = client.watch_job(job)
        assert next(updates).state == job_pb2.Job.PENDING  # the job as it is now
        client.cancel_job(job.split("/")[1])
        assert [u.state for u in updates][-1] == job_pb2.Job.CANCELLED  # then the stream ends
