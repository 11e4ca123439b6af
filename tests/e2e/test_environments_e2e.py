"""A client's project end to end (issue 11): its own Python environment built on the rig,
data in as an input, results out as the attempt's outputs. Real broker, real agents, real
Ray, real uv; torch comes from the CPU wheel in ``$PIP_FIND_LINKS``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from e2e_cluster import Cluster

from rigshift.v1 import job_pb2

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torch_ddp"
S, A = job_pb2.Job, job_pb2.Attempt
RIG_A = "RTX 3090"  # every job here goes to rig-a, so the second one finds the environment


def _torch_wheel_on_disk() -> bool:
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    return any(Path(d).is_dir() and any(Path(d).glob("torch-2.13.0*.whl")) for d in dirs)


needs_torch_wheel = pytest.mark.skipif(
    not _torch_wheel_on_disk(),
    reason="needs torch 2.13.0 in $PIP_FIND_LINKS (anything else downloads gigabytes)",
)


def _logs(cluster: Cluster, job: str) -> str:
    return "".join(c.data for c in cluster.client.stream_logs(job))


@needs_torch_wheel
@pytest.mark.timeout(900)
def test_torch_project_with_requirements_input_and_outputs(cluster: Cluster, tmp_path: Path):
    client = cluster.client
    reqs = (EXAMPLE / "requirements.txt").read_text()
    workdir = client.upload_working_dir(EXAMPLE)
    spec = dict(gpu_model=RIG_A, working_dir_sha256=workdir, python_requirements=reqs)

    # 1. Cold: the rig builds the environment, then the job writes its data set as output.
    make = client.create_job(
        ["sh", "-c", 'python make_data.py --samples 2048 --out "$RIGSHIFT_OUTPUT_DIR/data.pt"'],
        **spec,
    ).name
    job = cluster.wait(make, timeout_s=700)
    assert job.state == S.SUCCEEDED, (job.status_message, _logs(cluster, make)[-3000:])
    cold = job.attempts[-1]
    assert cold.setup_milliseconds > 0
    assert job.spec.environment.requirements_sha256  # the broker named the environment
    logs = _logs(cluster, make)
    assert "installing" in logs and "nothing installed" not in logs
    data = client.download_outputs(make, tmp_path / "made")
    assert (data / "data.pt").stat().st_size > 2048 * 9 * 4  # 2048 x (8 + 1) float32

    # 2. Warm: the same requirements install nothing; the data goes in as an input; DDP on
    #    the job's 2 GPUs; the model and metrics come back as outputs.
    train = client.create_job(
        ["sh", "run.sh", "--epochs", "2"],
        gpu_count=2,
        inputs={"data": data / "data.pt"},
        **spec,
    ).name
    job = cluster.wait(train, timeout_s=300)
    logs = _logs(cluster, train)
    assert job.state == S.SUCCEEDED, (job.status_message, logs[-3000:])
    assert "reused (cached), nothing installed" in logs
    assert "epoch 2/2" in logs
    out = client.download_outputs(train, tmp_path / "trained")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2
    listed = client.list_outputs(train)
    assert [o.attempt for o in listed] == [1] and listed[0].size_bytes > 0

    # The model loads, in the environment the rig built (the test's own Python has no torch).
    pythons = sorted(cluster.fleet.root.glob("agents/*/environments/*/bin/python"))
    assert pythons, "no environment on the rig"
    check = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from train import Regressor; "
        "m = Regressor(); m.load_state_dict(torch.load(sys.argv[2])); print('loaded')"
    )
    done = subprocess.run(
        [str(pythons[0]), "-c", check, str(EXAMPLE), str(out / "model.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "loaded", done.stderr[-2000:]


@pytest.mark.timeout(300)
def test_unresolvable_requirement_fails_after_one_attempt_naming_it(cluster: Cluster):
    job = cluster.client.create_job(
        ["python", "-c", "print('never runs')"],
        gpu_model=RIG_A,
        max_attempts=3,
        python_requirements="rigshift-no-such-package-for-tests==9.9\n",
    )
    got = cluster.wait(job.name, timeout_s=240)
    assert got.state == S.FAILED
    assert len(got.attempts) == 1, "a client's setup fault uses no further attempts"
    assert got.attempts[0].state == A.FAILED
    assert "rigshift-no-such-package-for-tests" in got.status_message
    assert got.status_message.startswith("setup failed")
    assert got.attempts[0].gpu_milliseconds == 0 and got.attempts[0].charge_micros == 0
    assert "never runs" not in _logs(cluster, job.name)
