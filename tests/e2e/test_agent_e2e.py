"""The marketplace end to end: real broker, two real agent processes, real Ray (issue 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from e2e_cluster import Cluster, wait_until

from harness.fleet import rigshift_argv
from rigshift.v1 import farm_pb2, job_pb2
from worker_agent.process import alive as _alive

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
S = job_pb2.Job


def test_jobs_run_and_succeed(cluster: Cluster) -> None:
    client = cluster.client
    sha = client.upload_working_dir(EXAMPLES / "mlp_numpy")
    mlp = client.create_job(
        [sys.executable, "train.py", "--epochs", "3", "--samples", "4000", "--min-accuracy", "0.5"],
        gpu_count=2,
        working_dir_sha256=sha,
    ).name
    small = [
        cluster.submit(
            ["import os", "print('gpus', os.environ['CUDA_VISIBLE_DEVICES'])"], gpu_count=n
        )
        for n in (1, 2, 1)
    ]
    for name in [mlp, *small]:
        job = cluster.wait(name)
        assert job.state == S.SUCCEEDED, (name, job.status_message)
        assert job.attempts[-1].gpu_milliseconds > 0
    # Two RTX 3090s draw 25 W idle and up to 337 W training: the mean watts per GPU over
    # the attempt must lie in between (loosely: the agent's metering window starts at the
    # assignment, the broker's GPU-seconds at the start report).
    attempt = cluster.client.get_job(mlp).attempts[-1]
    watts_per_gpu = attempt.energy_joules / (attempt.gpu_milliseconds / 1000)
    assert 20 < watts_per_gpu < 450, watts_per_gpu
    logs = "".join(c.data for c in client.stream_logs(mlp))
    assert "epoch 3/3" in logs and "final test accuracy" in logs and "checkpoint saved" in logs


def test_logs_follow_shows_output_while_the_job_runs(cluster: Cluster) -> None:
    name = cluster.submit(
        ["import time", "for i in range(8):", "    print('tick', i, flush=True); time.sleep(0.5)"]
    )
    cluster.wait(name, {S.RUNNING})
    follow = subprocess.Popen(
        [
            *rigshift_argv(),
            "job",
            "logs",
            "--follow",
            name.split("/")[1],
            "--broker",
            cluster.address,
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, **cluster.fleet.env},
        text=True,
    )
    try:
        assert follow.stdout is not None
        first = follow.stdout.readline()
        state_at_first_line = cluster.client.get_job(name).state
        rest = follow.stdout.read()
        assert follow.wait(timeout=20) == 0
    finally:
        follow.kill()
    assert first.startswith("tick ")
    assert state_at_first_line == S.RUNNING  # output arrived while the job still ran
    assert rest.endswith("tick 7\n")
    assert cluster.wait(name).state == S.SUCCEEDED


def test_a_cancelled_job_is_gone_within_5_s(cluster: Cluster) -> None:
    pid_file = cluster.out / "cancel.pid"
    name = cluster.submit(
        [
            "import os, signal, subprocess, sys, time",
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)",  # only SIGKILL stops it
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])",
            f"open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}')",
            "time.sleep(600)",
        ]
    )
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), 30, "the job's pid")
    pids = [int(p) for p in pid_file.read_text().split()]
    t0 = time.monotonic()
    subprocess.run(
        [*rigshift_argv(), "job", "cancel", name.split("/")[1], "--broker", cluster.address],
        check=True,
        env={**os.environ, **cluster.fleet.env},
        capture_output=True,
    )
    wait_until(lambda: not any(_alive(p) for p in pids), 5.0, "the process tree to be gone")
    took = time.monotonic() - t0
    job = cluster.wait(name)
    assert job.state == S.CANCELLED and took < 5.0
    wait_until(
        lambda: cluster.client.get_job(name).attempts[-1].state == job_pb2.Attempt.CANCELLED,
        10,
        "the attempt to end as CANCELLED (the agent confirmed the kill)",
    )


def test_a_4_gpu_job_sees_4_distinct_gpus_that_no_other_job_uses_meanwhile(
    cluster: Cluster,
) -> None:
    record = [
        "import json, os, time",
        "t0 = time.time()",
        "time.sleep(float(os.environ['HOLD_S']))",
        "rec = {'gpus': os.environ['CUDA_VISIBLE_DEVICES'], 'start': t0, 'end': time.time(),",
        "       'job': os.environ['RIGSHIFT_JOB_ID']}",
        "path = os.path.join(os.environ['E2E_OUT'], 'gang-' + rec['job'])",
        "open(path, 'w').write(json.dumps(rec))",
    ]
    model = {"gpu_model": "RTX 3090"}  # all on rig-a, which has exactly 4
    singles_before = [cluster.submit(record, env={"HOLD_S": "1.0"}, **model) for _ in range(2)]
    gang = cluster.submit(record, gpu_count=4, env={"HOLD_S": "1.5"}, **model)
    singles_after = [cluster.submit(record, env={"HOLD_S": "0.5"}, **model) for _ in range(2)]
    names = [*singles_before, gang, *singles_after]
    for name in names:
        assert cluster.wait(name).state == S.SUCCEEDED
    recs = {n: json.loads((cluster.out / f"gang-{n.split('/')[1]}").read_text()) for n in names}
    gang_ids = recs[gang]["gpus"].split(",")
    assert len(gang_ids) == 4 and len(set(gang_ids)) == 4
    assert sorted(cluster.client.get_job(gang).attempts[-1].gpu_indices) == [0, 1, 2, 3]
    for n in names:
        if n == gang:
            continue
        other = recs[n]
        shares = set(other["gpus"].split(",")) & set(gang_ids)
        overlaps = other["start"] < recs[gang]["end"] and recs[gang]["start"] < other["end"]
        assert not (shares and overlaps), f"{n} used GPU {shares} while the gang job ran"


def test_an_agent_that_loses_its_broker_keeps_its_job_and_reconnects(cluster: Cluster) -> None:
    ticks = cluster.out / "outage.ticks"
    name = cluster.submit(
        [
            "import time",
            f"f = open({str(ticks)!r}, 'a')",
            "for i in range(16):",
            "    print('tick', i, flush=True); f.write(f'{time.time()}\\n'); f.flush()",
            "    time.sleep(0.5)",
        ],
        gpu_model="RTX 3060",  # rig-b: behind the proxy
    )
    cluster.wait(name, {S.RUNNING})
    cut_at = time.time()
    cluster.proxy.cut()
    time.sleep(3.0)  # less than the 6 s lease: the broker must not requeue the job
    during = [float(t) for t in ticks.read_text().split() if float(t) > cut_at]
    cluster.proxy.restore()
    assert len(during) >= 4, "the job stopped while the broker was unreachable"
    job = cluster.wait(name, timeout_s=40)
    assert job.state == S.SUCCEEDED and job.attempt_count == 1
    logs = "".join(c.data for c in cluster.client.stream_logs(name))
    assert logs == "".join(f"tick {i}\n" for i in range(16))  # nothing lost across the outage
    rig_b = [w for w in cluster.client.iter_workers() if w.hostname == "rig-b"]
    assert rig_b and rig_b[0].state == farm_pb2.Worker.ONLINE
    assert "broker reachable again" in cluster.rig_b.log_path.read_text()


def test_a_checkpoint_leaves_the_rig(cluster: Cluster) -> None:
    name = cluster.submit(
        [
            "import os, time",
            "d = os.environ['RIGSHIFT_CHECKPOINT_DIR']",
            "open(os.path.join(d, 'tmp'), 'w').write('weights after epoch 1')",
            "os.replace(os.path.join(d, 'tmp'), os.path.join(d, 'ckpt.bin'))",
            "time.sleep(5)",  # the agent scans every 2 s and uploads a change stable for one scan
        ]
    )
    job = cluster.wait(name)
    assert job.state == S.SUCCEEDED
    assert len(job.checkpoint_sha256) == 64  # the broker knows it: a next attempt could resume


def test_the_agent_exports_gpu_metrics(cluster: Cluster) -> None:
    rig_a = next(w for w in cluster.client.iter_workers() if w.hostname == "rig-a")
    assert rig_a.metrics_address
    body = urllib.request.urlopen(f"http://{rig_a.metrics_address}/metrics", timeout=5).read()
    text = body.decode()
    assert 'rigshift_gpu_power_watts{gpu="0",gpu_model="RTX 3090"}' in text
    assert "rigshift_gpu_energy_joules_total" in text
    assert 'rigshift_gpu_state{gpu="3",gpu_model="RTX 3090",state="idle"}' in text
    assert "rigshift_agent_heartbeat_rtt_seconds_count" in text


def test_agents_reconnect_after_the_broker_is_killed_and_restarted(cluster: Cluster) -> None:
    """Runs last: it replaces the shared broker process (same port, same database)."""
    name = cluster.submit(
        ["import time", "for i in range(12):", "    print('tick', i, flush=True); time.sleep(0.5)"],
        gpu_model="RTX 3090",
    )
    cluster.wait(name, {S.RUNNING})
    cluster.fleet.restart_broker(kill=True)  # kill -9, then start again on the same address
    job = cluster.wait(name, timeout_s=40)
    assert job.state == S.SUCCEEDED and job.attempt_count == 1, job.status_message
    logs = "".join(c.data for c in cluster.client.stream_logs(name))
    assert logs == "".join(f"tick {i}\n" for i in range(12))
    after = cluster.submit(["print('after the restart')"], gpu_count=2)
    assert cluster.wait(after).state == S.SUCCEEDED
    online = [w for w in cluster.client.iter_workers() if w.state == farm_pb2.Worker.ONLINE]
    assert {w.hostname for w in online} == {"rig-a", "rig-b"}
