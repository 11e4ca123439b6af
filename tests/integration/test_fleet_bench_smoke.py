"""A smoke run of the fleet benchmark, and the broker changes its profiles motivated.

* ``benchmarks/fleet_bench.py`` against a real broker process (20 agents, 5 s), with the
  agents on Session and on the old Heartbeat + StreamInstructions: the JSON has every
  figure, heartbeats flow and every submitted job reaches an agent. Not a timed test.
* ``Store.save`` writes only what changed after its first write of a worker or job: the
  database ends up exactly as with the merge-everything path (fresh stores), including after
  a failed commit.
* ``BrokerService``: the scheduling loop rests after a long pass; ``tune_gc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlmodel
from sqlalchemy import create_engine, text

from broker.core import BrokerCore
from broker.economics import FarmTerms
from broker.errors import BrokerError
from broker.events import (
    AttemptCheckpointed,
    AttemptFinished,
    AttemptLog,
    AttemptProgress,
    AttemptStarted,
    CancelRequested,
    DrainRequested,
    Event,
    FarmConfigured,
    Heartbeat,
    JobSubmitted,
    SchedulePass,
    Tick,
    WorkerRegistered,
    Writes,
)
from broker.forget import forgettable
from broker.model import GpuInfo, JobSpec, Tier
from broker.service import GC_YOUNG_THRESHOLD, SCHEDULE_REST, BrokerService, tune_gc
from broker.store import FarmRow, Store
from harness.broker_fixtures import healthy

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = (
    "agents",
    "heartbeats_per_s",
    "heartbeat_p50_ms",
    "heartbeat_p99_ms",
    "submit_to_assign_p50_ms",
    "submit_to_assign_p99_ms",
    "broker_rss_mb",
    "broker_cpu_percent",
    "errors",
)


# --- the benchmark -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["session", "unary"])
def test_fleet_bench_smoke_run(protocol: str):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fleet_bench.py"), "--protocol", protocol]
    cmd += ["--agents", "20", "--duration-s", "5", "--settle-s", "1", "--job-seconds", "0.5"]
    cmd += ["--submit-rate-per-s", "4", "--drain-s", "5", "--json"]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in REQUIRED:
        assert key in result, key
    assert result["protocol"] == protocol
    assert result["agents"] == result["registered"] == result["ready"] == 20
    assert result["heartbeats_per_s"] > 0
    assert result["heartbeat_p99_ms"] is not None
    assert result["jobs_submitted"] == 20  # 4/s for 5 s
    assert result["jobs_assigned"] == result["jobs_submitted"]
    assert result["submit_to_assign_p99_ms"] is not None
    assert result["broker_rss_mb"] > 0 and result["broker_cpu_percent"] > 0
    assert result["errors"] == {}
    assert result["broker_alive"]
    assert time.monotonic() - started < 60


# --- Store.save: only what changed, same database ---------------------------------------------


TABLES = ("workers", "gpus", "jobs", "attempts", "job_events", "sla_events", "ledger", "job_logs")


def dump(url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the core's tables (without autoincrement ids), sorted."""
    engine = create_engine(url)
    out = {}
    with engine.connect() as conn:
        for table in TABLES:
            rows = conn.execute(text(f"SELECT * FROM {table}")).mappings().all()
            skip = "id" if table in ("ledger", "job_logs") else ""
            out[table] = sorted(
                (tuple((k, v) for k, v in r.items() if k != skip) for r in rows), key=repr
            )
    engine.dispose()
    return out


def new_store(url: str) -> Store:
    store = Store(url)
    store.create_farm(FarmRow(id="f", display_name="f", enrollment_token_sha256="x"))
    return store


def gpus(worker: int, count: int) -> tuple[GpuInfo, ...]:
    model = ("RTX 3090", "RTX 3060")[worker % 2]
    return tuple(
        GpuInfo(
            i,
            f"u{worker}-{i}",
            model,
            24576,
            350,
            200_000 + 10_000 * worker,
            measurement=healthy(model, 24576),
        )
        for i in range(count)
    )


def random_events(rnd: random.Random, core: BrokerCore, now: float) -> list[Event]:
    """One plausible next event for the core's current state."""
    workers = sorted(core.workers)
    live = [(job, a) for job in core.jobs.values() for a in job.attempts if a.live]
    roll = rnd.random()
    if roll < 0.2 or not workers:
        n = len(core.jobs)
        tier = rnd.choice((Tier.GUARANTEED, Tier.SPOT))
        spec = JobSpec(command=("x",), gpu_count=rnd.choice((1, 1, 2, 3)), tier=tier)
        return [JobSubmitted(now, f"j{n:03d}", rnd.choice(("alice", "bob")), spec, f"r{n}")]
    if roll < 0.35:
        return [SchedulePass(now)]
    if roll < 0.6 and live:
        job, a = rnd.choice(live)
        base = (now, a.worker_id, job.job_id, a.number, a.last_sequence + 1)
        kind = rnd.random()
        if kind < 0.3:
            return [AttemptStarted(*base)]
        if kind < 0.45:
            return [AttemptLog(*base, data=f"line {a.last_sequence}\n")]
        if kind < 0.55:
            return [AttemptProgress(*base, energy_joules=rnd.randrange(10**6))]
        if kind < 0.6:
            return [AttemptCheckpointed(*base, sha256="ab" * 32)]
        return [AttemptFinished(*base, exit_code=rnd.choice((0, 0, 1)), energy_joules=7)]
    if roll < 0.7:
        return [Heartbeat(now, rnd.choice(workers))]
    if roll < 0.78:
        return [Tick(now)]
    if roll < 0.84 and core.jobs:
        return [CancelRequested(now, rnd.choice(sorted(core.jobs)))]
    if roll < 0.9:  # an agent restarts, maybe with a GPU fewer or more: GPU rows go and come
        w = rnd.choice(workers)
        return [WorkerRegistered(now, w, "f", f"rig-{w}", "2", gpus(int(w[1:]), rnd.randint(1, 4)))]
    if roll < 0.93:
        return [DrainRequested(now, rnd.choice(workers))]
    return [Heartbeat(now, w) for w in workers]


def drive(steps: int, seed: int) -> list[list[Event]]:
    """A reproducible event history over 5 workers (run on a scratch core to make it valid)."""
    rnd = random.Random(seed)
    core = BrokerCore(lease_ttl_s=30.0)
    history: list[list[Event]] = [
        [FarmConfigured(0.0, FarmTerms("f", broker_fee_permille=150))],
        [WorkerRegistered(0.0, f"w{i}", "f", f"rig-{i}", "1", gpus(i, 4)) for i in range(5)],
    ]
    for events in history:
        for ev in events:
            core.handle(ev)
    now = 0.0
    for _ in range(steps):
        now += rnd.choice((0.5, 1.0, 2.0, 12.0))
        events = random_events(rnd, core, now)
        for ev in events:
            with contextlib.suppress(BrokerError):
                core.handle(ev)
        history.append(events)
    return history


def replay(history: list[list[Event]], save) -> BrokerCore:  # type: ignore[no-untyped-def]
    core = BrokerCore(lease_ttl_s=30.0)
    for events in history:
        cmds = []
        for ev in events:
            with contextlib.suppress(BrokerError):
                cmds += core.handle(ev)
        save(core, Writes.of(cmds))
    return core


@pytest.mark.parametrize("seed", [1, 2])
def test_store_writes_only_changes_and_ends_like_full_merges(tmp_path: Path, seed: int):
    history = drive(200, seed)
    fast_url = f"sqlite:///{tmp_path / 'fast.db'}"
    ref_url = f"sqlite:///{tmp_path / 'ref.db'}"
    fast = new_store(fast_url)
    new_store(ref_url).close()

    def save_fresh(core, writes):  # type: ignore[no-untyped-def]
        store = Store(ref_url)  # nothing remembered: every row merged, as before the change
        store.save(core, writes)
        store.close()

    core = replay(history, fast.save)
    replay(history, save_fresh)
    assert fast._written.workers  # the fast path was taken
    fast.close()
    assert dump(fast_url) == dump(ref_url)
    again = BrokerCore(lease_ttl_s=30.0)
    reloaded = Store(fast_url)
    reloaded.load(again, now=1e6)
    # A restart loads the live work; the finished jobs are read from the store.
    live = {job_id for job_id, job in core.jobs.items() if not forgettable(job)}
    assert set(again.jobs) == live
    for job_id, job in core.jobs.items():
        loaded = again.jobs[job_id] if job_id in live else reloaded.load_job(job_id)
        assert loaded is not None
        assert (loaded.state, len(loaded.attempts), len(loaded.history)) == (
            job.state,
            len(job.attempts),
            len(job.history),
        )
    reloaded.close()


def test_store_remembers_only_committed_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url = f"sqlite:///{tmp_path / 'b.db'}"
    ref_url = f"sqlite:///{tmp_path / 'ref.db'}"
    store = new_store(url)
    ref = new_store(ref_url)
    core = BrokerCore()

    def step(*events: Event, fail: bool = False) -> Writes:
        cmds = []
        for ev in events:
            cmds += core.handle(ev)
        writes = Writes.of(cmds)
        if fail:
            with monkeypatch.context() as m:

                def boom(self):  # type: ignore[no-untyped-def]
                    raise RuntimeError("disk full")

                m.setattr(sqlmodel.Session, "commit", boom)
                with pytest.raises(RuntimeError):
                    store.save(core, writes)
            return writes
        store.save(core, writes)
        ref.save(core, writes)
        return writes

    step(WorkerRegistered(0.0, "w", "f", "rig", "1", gpus(0, 2)))
    step(JobSubmitted(1.0, "j", "alice", JobSpec(command=("x",)), ""), SchedulePass(1.0))
    # The start is lost with its transaction; the store must not believe it was written.
    lost = step(AttemptStarted(2.0, "w", "j", 1, 1), fail=True)
    writes = step(AttemptFinished(3.0, "w", "j", 1, 2, 0, energy_joules=5))
    # the shell would save again what it failed to save; here: the same ids (the ledger
    # entries went with the second batch), now with both changes
    again = Writes(lost.job_ids | writes.job_ids, lost.worker_ids | writes.worker_ids)
    store.save(core, again)
    ref.save(core, again)
    store.close()
    ref.close()
    got, want = dump(url), dump(ref_url)
    assert got == want
    row = got["attempts"][0]
    assert dict(row)["state"] == "SUCCEEDED" and dict(row)["start_time"] == 2.0  # the lost write


# --- BrokerService ------------------------------------------------------------------------


def test_tune_gc_raises_the_young_threshold_once():
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(GC_YOUNG_THRESHOLD * 2, 5, 5)
        tune_gc()  # never lowers a higher setting
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD * 2, 5, 5)
    finally:
        gc.set_threshold(*before)


def test_schedule_loop_rests_after_a_long_pass(tmp_path: Path):
    pass_s = 0.02
    store = new_store(f"sqlite:///{tmp_path / 'b.db'}")
    core = BrokerCore()
    starts: list[float] = []
    handle = core.handle

    def slow_pass(event: Event):  # type: ignore[no-untyped-def]
        if isinstance(event, SchedulePass):
            starts.append(time.perf_counter())
            time.sleep(pass_s)  # a pass over a large fleet
        return handle(event)

    core.handle = slow_pass  # type: ignore[method-assign]

    async def main() -> None:
        svc = BrokerService(core, store)
        await svc.apply(WorkerRegistered(0.0, "w", "f", "rig", "1", gpus(0, 8)))
        svc.start_loops(tick_interval_s=60.0)
        try:
            for i in range(8):  # submissions every 5 ms while passes take 20 ms
                spec = JobSpec(command=("x",))
                await svc.apply(JobSubmitted(time.time(), f"j{i}", "alice", spec, ""))
                await asyncio.sleep(0.005)
            deadline = time.monotonic() + 5
            while core.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            await svc.stop_loops()

    before = gc.get_threshold()
    try:
        asyncio.run(main())
    finally:
        gc.set_threshold(*before)
        store.close()
    assert not core.pending  # all eight placed on the eight GPUs
    assert sum(len(j.attempts) for j in core.jobs.values()) == 8
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps and min(gaps) >= pass_s * (1 + SCHEDULE_REST) * 0.9
    # eight submissions shared far fewer passes than one each
    assert len(starts) < 8
