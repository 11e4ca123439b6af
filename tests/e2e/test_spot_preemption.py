"""Spot preemption end to end: real broker, real agents on Ray, a real checkpoint (issue 4).

rig-b (2 x RTX 3060) is the only capacity with RTX 3060s. A spot job takes both;
a guaranteed job for one RTX 3060 arrives; the broker preempts the spot attempt,
the guaranteed job runs, then the spot job is placed again and resumes from the
checkpoint it wrote before it was stopped. Both succeed, the spot job is charged
for the GPU time it ran and no more, the ledger balances, and the interruption
and the lost work are on the job.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from e2e_cluster import Cluster, wait_until

from harness.fleet import rigshift_argv
from rigshift.v1 import job_pb2

S = job_pb2.Job
A = job_pb2.Attempt
K = job_pb2.SlaEvent

# The spot job: resume from the checkpoint if there is one, save step 1 and keep
# "training" (until preempted); an attempt that found step 1 finishes at once.
SPOT = [
    "import json, os, sys, time",
    "d = os.environ['RIGSHIFT_CHECKPOINT_DIR']",
    "attempt = os.environ['RIGSHIFT_ATTEMPT']",
    "path = os.path.join(d, 'state.json')",
    "seen = json.load(open(path)) if os.path.exists(path) else None",
    "rec = {'attempt': attempt, 'seen': seen, 'start': time.time()}",
    "out = os.path.join(os.environ['E2E_OUT'], 'spot-' + os.environ['RIGSHIFT_JOB_ID'])",
    "open(out + '-' + attempt, 'w').write(json.dumps(rec))",
    "print('attempt', attempt, 'resumed from', seen, flush=True)",
    "if seen is not None:",
    "    sys.exit(0)",
    "open(path + '.tmp', 'w').write(json.dumps({'step': 1, 'weights': 'w-after-step-1'}))",
    "os.replace(path + '.tmp', path)",  # the agent uploads a change stable for one 2 s scan
    "time.sleep(120)",
]


def _ledger(cluster: Cluster) -> dict[str, object]:
    db = cluster.fleet.root / "broker" / "broker.db"
    out = subprocess.run(
        [*rigshift_argv(), "admin", "verify-ledger", "--db", f"sqlite:///{db}", "--json"],
        env={**os.environ, **cluster.fleet.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def _charge(gpu_ms: int, price: int) -> int:
    """docs/economics.md: GPU-milliseconds x price per GPU-hour / 3,600,000, half up."""
    return (gpu_ms * price + 1_800_000) // 3_600_000


def test_spot_job_is_preempted_resumes_from_its_checkpoint_and_pays_for_what_ran(
    cluster: Cluster,
) -> None:
    client = cluster.client
    model = {"gpu_model": "RTX 3060"}  # rig-b has exactly two, and nobody else has any
    t0 = time.monotonic()
    spot = cluster.submit(SPOT, gpu_count=2, tier="spot", **model)
    cluster.wait(spot, {S.RUNNING})
    wait_until(
        lambda: len(client.get_job(spot).checkpoint_sha256) == 64,
        20,
        "the spot job's checkpoint to reach the broker",
    )
    checkpoint = client.get_job(spot).checkpoint_sha256

    guaranteed = cluster.submit(
        ["import os, time", "print('gpus', os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(1)"],
        gpu_count=1,
        **model,
    )
    done = cluster.wait(guaranteed, timeout_s=40)
    assert done.state == S.SUCCEEDED, done.status_message
    assert done.attempt_count == 1 and done.attempts[0].state == A.SUCCEEDED

    job = cluster.wait(spot, timeout_s=40)
    assert job.state == S.SUCCEEDED, job.status_message
    first, *rest = job.attempts
    last = job.attempts[-1]
    assert first.state == A.PREEMPTED and last.state == A.SUCCEEDED and rest
    # The guaranteed job ran between the two spot attempts, on rig-b's GPUs.
    g = done.attempts[0]
    assert first.end_time.ToNanoseconds() <= g.start_time.ToNanoseconds()
    assert g.end_time.ToNanoseconds() <= last.start_time.ToNanoseconds()
    assert first.worker == g.worker == last.worker

    # The resumed attempt saw what the first one saved.
    rec = json.loads((cluster.out / f"spot-{spot.split('/')[1]}-{last.number}").read_text())
    assert rec["seen"] == {"step": 1, "weights": "w-after-step-1"}
    assert job.checkpoint_sha256 == checkpoint  # the resumed attempt wrote no new one
    first_rec = json.loads((cluster.out / f"spot-{spot.split('/')[1]}-1").read_text())
    assert first_rec["seen"] is None

    # Charged only for the GPU time each attempt ran, at the spot price (60 % of the ask).
    ask = 90_000  # the simulated RTX 3060's default ask, micro-dollars per GPU-hour
    for attempt in job.attempts:
        assert attempt.price_micros_per_gpu_hour == ask * 60 // 100
        span_ms = (attempt.end_time.ToNanoseconds() - attempt.start_time.ToNanoseconds()) / 1e6
        assert abs(attempt.gpu_milliseconds - 2 * span_ms) <= 2 * 5, (attempt, span_ms)
        assert attempt.charge_micros == _charge(
            attempt.gpu_milliseconds, attempt.price_micros_per_gpu_hour
        )
    assert job.cost_micros == sum(a.charge_micros for a in job.attempts)
    # The preempted attempt stopped being billed at the preemption: it ran about as
    # long as it took to save the checkpoint and bring the guaranteed job in.
    assert first.gpu_milliseconds < 2 * 30_000
    assert done.attempts[0].price_micros_per_gpu_hour == ask  # guaranteed pays the ask

    # SLA: the interruption and the work lost since the checkpoint (no credit for spot).
    kinds = [(e.kind, e.attempt) for e in job.sla_events]
    assert (K.INTERRUPTION, 1) in kinds and (K.LOST_WORK, 1) in kinds, job.sla_events
    lost = next(e for e in job.sla_events if e.kind == K.LOST_WORK)
    assert lost.credit_micros == 0 and job.credit_micros == 0
    assert 0 <= lost.seconds <= first.gpu_milliseconds / 2 / 1000 + 1

    ledger = _ledger(cluster)
    assert ledger["ok"] is True and ledger["problems"] == []
    assert time.monotonic() - t0 < 60
