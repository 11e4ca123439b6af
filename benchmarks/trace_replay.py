"""Replay a job trace through the real broker core, in virtual time, on simulated mining farms.

    .venv/bin/python benchmarks/trace_replay.py ../shared/traces/philly.csv --json
    .venv/bin/python benchmarks/trace_replay.py TRACE.csv --submit-col submitted \\
        --duration-col runtime --gpus-col gpus --fleet fleet.json --policy fifo --limit 5000

**Trace.** Any CSV with a submit time (a naive datetime, read as UTC, or seconds), a run
time in seconds and a GPU count; rows may be unsorted. ``--owner-col`` (default
``cluster`` when present) names the client a job belongs to. Rows that cannot be parsed
are counted as invalid. Jobs asking for more GPUs than the largest homogeneous group of
one rig cannot run on a marketplace that gangs a job on one rig; they are skipped and
counted, never dropped silently.

**What runs.** A ``BrokerCore`` (``broker/core.py``; :class:`ReplayCore` changes only the
queue order and what the scheduler is shown, plus three exact shortcuts) receives the
events a live broker would: ``FarmConfigured`` and ``WorkerRegistered`` at the start;
``JobSubmitted`` at each submit time; one ``SchedulePass`` after each batch of events
that share a virtual second (skipped when it could place nothing); ``AttemptStarted`` as
soon as an ``Assign`` comes out; ``AttemptFinished`` (exit 0) the job's run time later,
with the energy of a simple power model: board watts of the GPU model
(``broker.economics.BOARD_WATTS``, or the rig's ``watts``) x run time x GPUs. So pricing,
settlement into the ledger, SLA events and reliability run for real. No rig fails and no
job is spot, so there are no preemptions.

**Fleet file** (``--fleet``), JSON; money as strings or numbers in USD (converted to
integer micro-dollars exactly), optional keys in brackets::

    {"farms": [{
        "farm_id": "quebec",
        "tariff_usd_per_kwh": "0.045",           "pue": "1.10",
        ["tariff_windows": [[17, 21, "0.14"]],]   # UTC hours [start, end) at their own price
        ["broker_fee_percent": "10",]  ["margin_usd_per_gpu_hour": "0.005",]
        "mining_usd_per_kwh": {"RTX 3090": "0.11"},       # the mining alternative per model
        "ask_usd_per_gpu_hour": {"RTX 3090": "0.24"},      # per model; must be >= the floor
        "rigs": [{"model": "RTX 3090", "gpus": 8, "count": 6, ["watts": 350,] ["vram_mb": 24576]}]
    }]}

Without ``--fleet`` the :data:`DEFAULT_FLEET` below is used (six farms, 87 rigs, 600 GPUs);
``--fleet-scale X`` multiplies every rig count (to see how the figures move with contention).

**Policies** (``--policy``, repeatable; all but the oracle by default):

* ``fifo`` — strict FIFO first fit, no backfilling: a pass stops at the first job that
  does not fit (head-of-line blocking);
* ``default`` — the core as it is: guaranteed before spot, FIFO order, greedy backfill,
  price then best fit then reliability;
* ``short-first`` — ``broker.policy.SHORT_FIRST``: smallest expected GPU time first with
  bounded aging; run times estimated online from the owner's finished jobs
  (``broker.policy.DurationEstimator``), never from the trace's durations;
* ``short-first-oracle`` — the same order fed the true run times: an oracle, a bound no
  broker can reach.

Policies run in parallel processes (``--processes``, default 2).

**Figures per policy.** Utilisation (GPU-seconds run / (fleet GPUs x (last finish - first
submit))); job completion time (JCT = finish - submit) mean/p50/p99; queueing delay (first
start - submit) mean/p99/max; SLA breaches (``START_DEADLINE_MISSED`` events, 60 s deadline)
and their credits; farm revenue per kWh against the mining alternative per kWh, both from
``broker.earnings``; jobs finished and skipped. ``--json``: the last line is
``{"policies": {"fifo": {"mean_jct_s": ...}, ...}, ...}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from heapq import heapify, heappop, heappush
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.core import BrokerCore, Job, Worker
from broker.earnings import earnings
from broker.economics import BOARD_WATTS, FarmTerms, TariffWindow, floor_price
from broker.events import (
    Assign,
    AttemptFinished,
    AttemptStarted,
    Command,
    Event,
    FarmConfigured,
    JobSubmitted,
    SchedulePass,
    Transition,
    WorkerRegistered,
)
from broker.invariants import ledger_problems
from broker.model import GpuInfo, JobSpec, JobState, SlaKind, Tier, WorkerState
from broker.policy import FIFO, SHORT_FIRST, DurationEstimator, QueuedJob
from broker.scheduler import GpuSlot, JobRequest, Snapshot, WorkerCapacity, place
from broker.testing import VRAM_MB

POLICIES = ("fifo", "default", "short-first", "short-first-oracle")
DEFAULT_POLICIES = POLICIES[:3]  # the oracle only when asked for

_MINING = {  # USD the GPU earns mining per kWh it draws, post-halving
    "RTX 3060": "0.14",
    "RTX 3070": "0.15",
    "RTX 3080": "0.10",
    "RTX 3090": "0.11",
    "RX 6800 XT": "0.13",
    "A4000": "0.16",
}
_ASK = {  # USD per GPU-hour, what such cards rent for on open marketplaces
    "RTX 3060": "0.10",
    "RTX 3070": "0.13",
    "RTX 3080": "0.17",
    "RTX 3090": "0.24",
    "RX 6800 XT": "0.12",
    "A4000": "0.15",
}


def _farm(farm_id: str, tariff: str, pue: str, rigs: list[tuple[str, int, int]], **extra: Any):
    return {
        "farm_id": farm_id,
        "tariff_usd_per_kwh": tariff,
        "pue": pue,
        "broker_fee_percent": "10",
        "margin_usd_per_gpu_hour": "0.005",
        "mining_usd_per_kwh": _MINING,
        "ask_usd_per_gpu_hour": _ASK,
        "rigs": [{"model": m, "gpus": g, "count": c} for m, g, c in rigs],
        **extra,
    }


#: Six farms, 87 rigs, 600 GPUs: 54 rigs of 8, 18 of 6 and 15 of 4. Philly's jobs of at
#: most 8 GPUs keep 323 GPUs busy on average (offered load 0.54), but in bursts of days
#: several times that: queues build up, and FIFO's build up for days.
DEFAULT_FLEET: dict[str, Any] = {
    "farms": [
        _farm("quebec", "0.045", "1.10", [("RTX 3090", 8, 9), ("RTX 3080", 6, 6)]),
        _farm(
            "texas",
            "0.06",
            "1.25",
            [("RTX 3080", 8, 9), ("RTX 3070", 8, 6), ("A4000", 4, 6)],
            tariff_windows=[[17, 21, "0.14"]],
        ),
        _farm("iceland", "0.05", "1.05", [("RTX 3090", 8, 6), ("RX 6800 XT", 6, 6)]),
        _farm("paraguay", "0.04", "1.30", [("RTX 3060", 8, 9), ("RTX 3070", 6, 6)]),
        _farm("kazakhstan", "0.035", "1.35", [("RTX 3060", 8, 6), ("RX 6800 XT", 8, 6)]),
        _farm("georgia", "0.055", "1.20", [("A4000", 4, 9), ("RTX 3080", 8, 3)]),
    ]
}


# --- trace and fleet ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One row of the trace."""

    job_id: str
    submit_s: float
    duration_s: float
    gpus: int
    owner: str


@dataclass(frozen=True, slots=True)
class Trace:
    """Runnable jobs sorted by submit time, and what was left out and why."""

    jobs: tuple[TraceJob, ...]
    rows: int
    invalid: int
    too_wide: int  # asked for more GPUs than any rig's largest homogeneous group


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        stamp = datetime.fromisoformat(text)
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def load_trace(
    path: str | Path,
    *,
    submit_col: str = "timestamp",
    duration_col: str = "duration",
    gpus_col: str = "num_gpus",
    owner_col: str = "cluster",
    max_gang: int = 8,
    limit: int = 0,
) -> Trace:
    """Read, validate and sort a trace; ``limit`` keeps the first N rows by submit time."""
    parsed: list[tuple[float, int, float, int, str]] = []
    invalid = 0
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for col in (submit_col, duration_col, gpus_col):
            if col not in header:
                raise SystemExit(f"{path}: no column {col!r} (has {header})")
        s, d, g = (header.index(c) for c in (submit_col, duration_col, gpus_col))
        o = header.index(owner_col) if owner_col in header else None
        for n, row in enumerate(reader):
            if not row:
                continue  # a blank line
            try:
                submit, duration, gpus = _parse_time(row[s]), float(row[d]), int(float(row[g]))
                owner = row[o] if o is not None else "trace"
            except (IndexError, ValueError):
                invalid += 1
                continue
            if not (math.isfinite(submit) and math.isfinite(duration)) or duration < 0 or gpus < 1:
                invalid += 1
                continue
            parsed.append((submit, n, duration, gpus, owner))
    parsed.sort()
    rows = len(parsed) + invalid
    if limit:
        parsed = parsed[:limit]
        rows = len(parsed)
        invalid = 0
    jobs = tuple(
        TraceJob(f"j{n:07d}", submit, duration, gpus, owner or "trace")
        for submit, n, duration, gpus, owner in parsed
        if gpus <= max_gang
    )
    return Trace(jobs, rows, invalid, len(parsed) - len(jobs))


def _micros(usd: object) -> int:
    return int(Decimal(str(usd)) * 1_000_000)


def _permille(value: object) -> int:
    return int(Decimal(str(value)) * 1000)


@dataclass(frozen=True, slots=True)
class Rig:
    """One simulated rig: a worker with ``gpus`` GPUs of one model."""

    worker_id: str
    farm_id: str
    model: str
    gpus: int
    watts: int
    vram_mb: int


@dataclass(frozen=True, slots=True)
class Fleet:
    """Farm terms and rigs, ready to be fed to the core."""

    farms: tuple[FarmTerms, ...]
    rigs: tuple[Rig, ...]

    @property
    def gpus(self) -> int:
        """GPUs in the fleet."""
        return sum(r.gpus for r in self.rigs)

    @property
    def max_gang(self) -> int:
        """Most GPUs one job can get (one rig, one model)."""
        return max((r.gpus for r in self.rigs), default=0)


def build_fleet(spec: dict[str, Any], scale: float = 1.0) -> Fleet:
    """Fleet from the JSON structure documented above, every rig ``count`` times ``scale``
    (rounded); refuses asks under the floor."""
    farms: list[FarmTerms] = []
    rigs: list[Rig] = []
    for f in spec["farms"]:
        terms = FarmTerms(
            farm_id=f["farm_id"],
            tariff_micros_per_kwh=_micros(f.get("tariff_usd_per_kwh", 0)),
            pue_permille=_permille(f.get("pue", 1)),
            broker_fee_permille=_permille(f.get("broker_fee_percent", 10)) // 100,
            margin_micros_per_gpu_hour=_micros(f.get("margin_usd_per_gpu_hour", 0)),
            mining_micros_per_kwh=tuple(
                (m, _micros(v)) for m, v in sorted(f.get("mining_usd_per_kwh", {}).items())
            ),
            ask_micros_per_gpu_hour=tuple(
                (m, _micros(v)) for m, v in sorted(f.get("ask_usd_per_gpu_hour", {}).items())
            ),
            tariff_windows=tuple(
                TariffWindow(int(a), int(b), _micros(p)) for a, b, p in f.get("tariff_windows", ())
            ),
        )
        farms.append(terms)
        for r in f["rigs"]:
            model = r["model"]
            watts = int(r.get("watts", BOARD_WATTS.get(model, 250)))
            ask = terms.ask_for(model)
            floor = floor_price(terms, model, watts).floor_micros
            if ask is not None and ask < floor:
                raise SystemExit(f"farm {terms.farm_id}: ask {ask} for {model} under floor {floor}")
            for _ in range(round(int(r.get("count", 1)) * scale)):
                worker_id = f"{terms.farm_id}-{len(rigs):04d}"
                vram = int(r.get("vram_mb", VRAM_MB.get(model, 16_384)))
                rigs.append(Rig(worker_id, terms.farm_id, model, int(r["gpus"]), watts, vram))
    return Fleet(tuple(farms), tuple(rigs))


# --- the core, with a queue order ----------------------------------------------------------------


class ReplayCore(BrokerCore):
    """``BrokerCore`` with a pluggable queue order and a lean snapshot; the rest is the core.

    What differs from ``BrokerCore`` (all of it in the view the scheduler gets):

    * **order** -- pending jobs go by ``key(job)``, fixed when the job becomes PENDING, in
      place of ``BrokerCore._priority``; kept sorted, one list per gang size.
    * **head_of_line** (``fifo``) -- the view is cut after the first job that does not fit:
      strict FIFO first fit instead of the core's greedy backfill.
    * **lean** (default) -- the view holds only what can change the outcome, so a pass costs
      what it places rather than the queue length times the fleet. Jobs: those no wider
      than the most free GPUs on one rig, up to where the free GPUs run out (found by trial
      ``place()`` calls; place is greedy in order, so its first decisions do not depend on
      later jobs). Workers, for k jobs of at most N GPUs: groups (price, VRAM, model) in
      place()'s order, cheapest first, up to the price at which k rigs have N free GPUs
      (no job can end up dearer), and in each the k best-ranked rigs of every free-GPU
      bucket (place only ever takes a bucket's best); plus the rig with the most GPUs, so
      that "resolvable" in rejections is unchanged. Placements are exactly those of the
      full view (``lean=False``; the smoke test checks it); the "best has N" text of a
      rejection may differ. Jobs left out keep their last pending reasons, here always
      "gpu_count, resolvable", so SLA credits do not change. :meth:`worth_a_pass` is False
      when a pass could place nothing; the replay then skips it.

    Exact shortcuts for three hot spots of the core (``benchmarks/README.md``):
    ``_preemption_plan`` answers None at once while no spot job exists, :meth:`reliability`
    drops outcomes older than its window (the clock only moves on), and
    :meth:`_capacity_of` reuses the frozen ``GpuSlot`` values. Rigs must be homogeneous
    and stay online, and jobs name no model, VRAM or price cap, as :func:`replay` makes them.
    """

    def __init__(
        self, key: Callable[[Job], tuple], *, head_of_line: bool = False, lean: bool = True
    ) -> None:
        super().__init__()
        self._key = key
        self.head_of_line = head_of_line
        self.lean = lean
        self.spot_jobs = 0  # spot jobs ever submitted
        self.queues: dict[int, list[tuple[tuple, str]]] = {}  # gang size -> sorted (key, job)
        self.pending_sizes: dict[int, int] = {}  # gang size -> PENDING jobs
        self._keys: dict[str, tuple] = {}
        self._requests: dict[str, JobRequest] = {}
        self._changed: set[str] = set()  # workers changed since the last refresh
        self._free: dict[str, tuple] = {}  # online worker with free GPUs -> see _refresh
        self._by_group: dict[tuple, dict[str, tuple]] = {}  # the same, by group, cheapest first
        self._widest: str | None = None  # a rig with the most GPUs
        self._rigs_with: dict[int, int] = {}  # free GPUs -> online rigs with that many free
        self._room = 0  # free GPUs on online rigs
        self._slots: dict[tuple, GpuSlot] = {}

    # --- hooks into the core -------------------------------------------------------------

    def handle(self, event: Event) -> list[Command]:
        if type(event) is JobSubmitted and event.spec.tier == Tier.SPOT:
            self.spot_jobs += 1
        cmds = super().handle(event)
        for cmd in cmds:
            if type(cmd) is not Transition:
                continue
            if cmd.to_state == JobState.PENDING:
                job = self.jobs[cmd.job_id]
                n = job.spec.gpu_count
                self.pending_sizes[n] = self.pending_sizes.get(n, 0) + 1
                if job.job_id not in self._keys:  # else its entry is still queued
                    key = self._keys[job.job_id] = self._key(job)
                    insort(self.queues.setdefault(n, []), (key, job.job_id))
            elif cmd.from_state == JobState.PENDING:
                self.pending_sizes[self.jobs[cmd.job_id].spec.gpu_count] -= 1
        return cmds

    def _priority(self, job: Job) -> tuple:
        key = self._keys.get(job.job_id)
        return key if key is not None else self._key(job)

    def _worker_changed(self, worker_id: str) -> None:
        super()._worker_changed(worker_id)
        self._changed.add(worker_id)

    def _preemption_plan(self, job: Job) -> Any:
        # With no spot job there is nothing to preempt and the core's answer is None; it
        # finds that out by scanning every GPU of every worker, per unplaced guaranteed job
        # per pass (83% of a replay's time without this).
        return super()._preemption_plan(job) if self.spot_jobs else None

    def reliability(self, worker: Worker, now: float) -> int:
        # Outcomes older than the window never count again, but the core rescans the whole
        # history on every call (44% of a replay's time without this).
        outcomes = worker.outcomes
        horizon = now - self.reliability_window_s
        if outcomes and outcomes[0][0] < horizon:
            del outcomes[: bisect_left(outcomes, (horizon,))]
        return super().reliability(worker, now)

    def _capacity_of(self, worker: Worker, now: float) -> WorkerCapacity:
        # The core builds a new GpuSlot for every GPU of a worker whenever anything on it
        # changes (28% of a replay's time); the slots are frozen values, so reuse them.
        cap = self._capacity.get(worker.worker_id)
        if cap is None:
            slots = []
            for index in sorted(worker.gpus):
                gpu = worker.gpus[index]
                i = gpu.info
                k = (i.index, i.model, i.vram_mb, i.price_micros_per_gpu_hour, gpu.holder is None)
                slot = self._slots.get(k)
                if slot is None:
                    slot = self._slots[k] = GpuSlot(*k)
                slots.append(slot)
            cap = WorkerCapacity(worker.worker_id, tuple(slots), self.reliability(worker, now))
            self._capacity[worker.worker_id] = cap
        return cap

    # --- the view --------------------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        """Bring the free-capacity index up to date with the workers that changed."""
        for wid in self._changed:
            old = self._free.pop(wid, None)
            if old is not None:
                del self._by_group[old[4]][wid]
                self._rigs_with[old[3]] -= 1
                self._room -= old[3]
            worker = self.workers[wid]
            if worker.state != WorkerState.ONLINE:
                continue
            cap = self._capacity_of(worker, now)
            if self._widest is None or len(self.workers[self._widest].gpus) < len(cap.gpus):
                self._widest = wid
            free = sum(1 for g in cap.gpus if g.free)
            if free:
                g = cap.gpus[0]
                group = (g.price_micros_per_gpu_hour, g.vram_mb, g.model)  # place()'s group order
                entry = (-cap.reliability_permille, wid, cap, free, group)  # by place()'s rank
                self._free[wid] = entry
                self._rigs_with[free] = self._rigs_with.get(free, 0) + 1
                self._room += free
                if group not in self._by_group:
                    self._by_group = dict(sorted({**self._by_group, group: {}}.items()))
                self._by_group[group][wid] = entry
        self._changed.clear()

    def _head(self) -> tuple[tuple, str] | None:
        """The first PENDING job in queue order, dropping finished entries on the way."""
        best = None
        for q in self.queues.values():
            while q and q[0][1] not in self.pending:
                del self._keys[q.pop(0)[1]]
            if q and (best is None or q[0] < best):
                best = q[0]
        return best

    def worth_a_pass(self, now: float) -> bool:
        """False when a scheduling pass now could not place any job."""
        if not self.pending:
            return False
        if not self.lean:
            return True
        self._refresh(now)
        widest = max((f for f, rigs in self._rigs_with.items() if rigs), default=0)
        if self.head_of_line:
            head = self._head()
            return head is not None and self.jobs[head[1]].spec.gpu_count <= widest
        return 0 < min((n for n, c in self.pending_sizes.items() if c), default=0) <= widest

    def _workers(self, jobs: Sequence[JobRequest], now: float) -> tuple[WorkerCapacity, ...]:
        """The rigs a pass over ``jobs`` may touch, and the widest rig (see the class doc)."""
        k = len(jobs)
        widest_job = max((j.gpu_count for j in jobs), default=0)
        shown: list[WorkerCapacity] = []
        fitting = 0  # rigs, shown or not, that could take any of the jobs
        cutoff = None  # price of the group where ``fitting`` reached k
        for group, members in self._by_group.items():
            if cutoff is not None and group[0] > cutoff:
                break
            per_bucket: dict[int, int] = {}
            for e in sorted(members.values()):
                free = e[3]
                shown_here = per_bucket.get(free, 0)
                if shown_here < k:
                    per_bucket[free] = shown_here + 1
                    shown.append(e[2])
                fitting += free >= widest_job
            if cutoff is None and fitting >= k:
                cutoff = group[0]
        if self._widest is not None and self._widest not in {c.worker_id for c in shown}:
            shown.append(self._capacity_of(self.workers[self._widest], now))
        return tuple(shown)

    def snapshot(self, now: float) -> Snapshot:
        if not self.lean:
            snap = super().snapshot(now)
            if self.head_of_line and (result := place(snap)).unplaced:
                first = result.unplaced[0].job_id
                cut = next(i for i, r in enumerate(snap.pending) if r.job_id == first)
                return Snapshot(now, snap.pending[: cut + 1], snap.workers)
            return snap
        self._refresh(now)
        jobs = self._presented(now)
        return Snapshot(now, jobs, self._workers(jobs, now))

    def _presented(self, now: float) -> tuple[JobRequest, ...]:
        """The pending jobs to show, in order (see the class docstring)."""
        room = self._room
        widest = max(f for f, rigs in self._rigs_with.items() if rigs)
        if self.head_of_line:
            widest = max(self.queues)
        heap = [(q[0][0], n, 0) for n, q in self.queues.items() if q and n <= widest]
        heapify(heap)
        stale: list[tuple[int, int]] = []
        chosen: list[JobRequest] = []
        wanted = 0  # GPUs asked for by the jobs chosen since the last trial
        target = 2  # fifo: jobs to try next; doubles while they all fit
        while True:
            while heap and (
                len(chosen) < min(target, room + 1) if self.head_of_line else wanted < room
            ):
                _, n, pos = heappop(heap)
                q = self.queues[n]
                job_id = q[pos][1]
                if pos + 1 < len(q):
                    heappush(heap, (q[pos + 1][0], n, pos + 1))
                if job_id not in self.pending:
                    stale.append((n, pos))
                    continue
                request = self._requests.get(job_id)
                if request is None:
                    request = self._requests[job_id] = self._request(self.jobs[job_id])
                chosen.append(request)
                wanted += n
            if len(chosen) <= 1 or (not heap and not self.head_of_line):
                break  # one job, or every candidate is shown
            trial = tuple(chosen)
            result = place(Snapshot(now, trial, self._workers(trial, now)))
            if self.head_of_line:
                if result.unplaced or not heap or len(chosen) > room:
                    if result.unplaced:
                        first = result.unplaced[0].job_id
                        cut = next(i for i, r in enumerate(chosen) if r.job_id == first)
                        chosen = chosen[: cut + 1]
                    break
                target *= 2
                continue
            left = {wid: e[3] for wid, e in self._free.items()}
            for p in result.placements:
                left[p.worker_id] -= len(p.gpu_indices)
            room = sum(left.values())
            widest = max(left.values(), default=0)
            if widest < min((n for n, c in self.pending_sizes.items() if c), default=0):
                break
            heap = [h for h in heap if h[1] <= widest]
            heapify(heap)
            wanted = 0
        for n, pos in sorted(stale, reverse=True):
            del self._keys[self.queues[n].pop(pos)[1]]
        return tuple(chosen)


# --- the replay ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """Figures of one policy's replay."""

    policy: str
    rows: int = 0
    finished: int = 0
    skipped: int = 0
    invalid: int = 0
    utilisation: float = 0.0
    mean_jct_s: float = 0.0
    p50_jct_s: float = 0.0
    p99_jct_s: float = 0.0
    max_jct_s: float = 0.0
    mean_queue_s: float = 0.0
    p99_queue_s: float = 0.0
    max_queue_s: float = 0.0
    sla_breaches: int = 0
    sla_credits_usd: float = 0.0
    revenue_usd_per_kwh: float = 0.0
    mining_usd_per_kwh: float = 0.0
    revenue_usd: float = 0.0
    kwh: float = 0.0
    schedule_passes: int = 0
    replay_s: float = 0.0
    replay_cpu_s: float = 0.0
    ledger_problems: list[str] = field(default_factory=list)
    jct_s: list[float] = field(default_factory=list, repr=False)
    duration_s: list[float] = field(default_factory=list, repr=False)

    def figures(self) -> dict[str, Any]:
        """The JSON view (no per-job lists)."""
        out = {k: getattr(self, k) for k in self.__slots__ if k not in ("jct_s", "duration_s")}
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]


def make_key(policy: str, trace: Trace, estimator: DurationEstimator) -> Callable[[Job], tuple]:
    """The queue order of a policy name as a function of a core job."""
    if policy in ("fifo", "default"):
        return lambda job: FIFO.key(
            QueuedJob(job.job_id, job.create_time, spot=job.spec.tier == Tier.SPOT)
        )
    truth = {j.job_id: j.duration_s for j in trace.jobs}
    oracle = policy.endswith("-oracle")

    def key(job: Job) -> tuple:
        s = job.spec
        est = truth[job.job_id] if oracle else estimator.estimate(job.owner, s.gpu_count)
        return SHORT_FIRST.key(
            QueuedJob(job.job_id, job.create_time, s.gpu_count, est, s.tier == Tier.SPOT)
        )

    return key


def replay(
    trace: Trace, fleet: Fleet, policy: str, *, lean: bool = True
) -> tuple[Outcome, ReplayCore]:
    """Run the whole trace under one policy; returns the figures and the final core."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
    started, cpu = time.perf_counter(), time.process_time()
    estimator = DurationEstimator()
    key = make_key(policy, trace, estimator)
    core = ReplayCore(key, head_of_line=policy == "fifo", lean=lean)
    jobs = trace.jobs
    t0 = jobs[0].submit_s if jobs else 0.0
    for terms in fleet.farms:
        core.handle(FarmConfigured(t0, terms))
    rigs = {r.worker_id: r for r in fleet.rigs}
    for r in fleet.rigs:
        gpus = tuple(
            GpuInfo(i, f"{r.worker_id}-gpu{i}", r.model, r.vram_mb, r.watts) for i in range(r.gpus)
        )
        core.handle(WorkerRegistered(t0, r.worker_id, r.farm_id, r.worker_id, "replay", gpus))
    by_id = {j.job_id: j for j in jobs}
    specs = {n: JobSpec(command=("trace",), gpu_count=n) for n in {j.gpus for j in jobs}}
    finishes: list[tuple[float, str, str, int]] = []  # (end, job_id, worker_id, attempt)
    out = Outcome(policy, rows=trace.rows, skipped=trace.too_wide, invalid=trace.invalid)
    i, n = 0, len(jobs)
    handle = core.handle
    while i < n or finishes:
        now = min(jobs[i].submit_s if i < n else math.inf, finishes[0][0] if finishes else math.inf)
        second = math.floor(now) + 1  # everything in this virtual second is one batch
        while finishes and finishes[0][0] < second:
            end, job_id, worker_id, attempt = heappop(finishes)
            tj = by_id[job_id]
            rig = rigs[worker_id]
            joules = round(rig.watts * tj.duration_s * tj.gpus)
            handle(AttemptFinished(end, worker_id, job_id, attempt, 2, 0, joules))
            estimator.observe(tj.owner, tj.gpus, tj.duration_s)
            now = end
        while i < n and jobs[i].submit_s < second:
            tj = jobs[i]
            handle(JobSubmitted(tj.submit_s, tj.job_id, tj.owner, specs[tj.gpus]))
            now = max(now, tj.submit_s)
            i += 1
        if not core.worth_a_pass(now):
            continue
        out.schedule_passes += 1
        for cmd in handle(SchedulePass(now)):
            if type(cmd) is Assign:
                tj = by_id[cmd.job_id]
                handle(AttemptStarted(now, cmd.worker_id, cmd.job_id, cmd.attempt, 1))
                end = now + tj.duration_s
                heappush(finishes, (end, cmd.job_id, cmd.worker_id, cmd.attempt))
    _measure(out, core, trace, fleet)
    out.replay_s = time.perf_counter() - started
    out.replay_cpu_s = time.process_time() - cpu
    return out, core


def _measure(out: Outcome, core: ReplayCore, trace: Trace, fleet: Fleet) -> None:
    busy = 0.0
    last = trace.jobs[0].submit_s if trace.jobs else 0.0
    queue: list[float] = []
    for tj in trace.jobs:
        job = core.jobs[tj.job_id]
        attempt = job.current
        if attempt is None or attempt.end_time is None or job.state != "SUCCEEDED":
            continue
        out.finished += 1
        out.jct_s.append(attempt.end_time - tj.submit_s)
        out.duration_s.append(tj.duration_s)
        queue.append((job.attempts[0].start_time or 0.0) - tj.submit_s)
        busy += tj.duration_s * tj.gpus
        last = max(last, attempt.end_time)
        for ev in job.sla_events:
            if ev.kind == SlaKind.START_DEADLINE_MISSED:
                out.sla_breaches += 1
                out.sla_credits_usd += ev.credit_micros / 1e6
    span = last - trace.jobs[0].submit_s if trace.jobs else 0.0
    out.utilisation = busy / (fleet.gpus * span) if span > 0 else 0.0
    if out.jct_s:
        out.mean_jct_s = sum(out.jct_s) / len(out.jct_s)
        out.p50_jct_s = _pct(out.jct_s, 0.50)
        out.p99_jct_s = _pct(out.jct_s, 0.99)
        out.max_jct_s = max(out.jct_s)
        out.mean_queue_s = sum(queue) / len(queue)
        out.p99_queue_s = _pct(queue, 0.99)
        out.max_queue_s = max(queue)
    rows = earnings(core, group_by="farm")
    revenue = sum(r.revenue_micros for r in rows)
    joules = sum(r.energy_joules for r in rows)
    mining = sum(r.mining_micro_joules for r in rows)
    out.revenue_usd = revenue / 1e6
    out.kwh = joules / 3_600_000
    out.revenue_usd_per_kwh = revenue / 1e6 / out.kwh if joules else 0.0
    out.mining_usd_per_kwh = mining / joules / 1e6 if joules else 0.0
    out.ledger_problems = ledger_problems(core)


# --- command line --------------------------------------------------------------------------------


_JOB: tuple[Trace, Fleet] | None = None  # what forked worker processes replay


def _run_one(policy: str) -> Outcome:
    assert _JOB is not None
    outcome, _ = replay(*_JOB, policy)
    outcome.jct_s, outcome.duration_s = [], []
    return outcome


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f}"


def format_table(outcomes: Sequence[Outcome]) -> str:
    """Markdown table, one row per policy; times in hours."""
    head = (
        "| policy | util | mean JCT h | p50 JCT h | p99 JCT h | mean queue h | p99 queue h "
        "| max queue h | SLA breaches | credits $ | rev $/kWh | mining $/kWh | finished "
        "| skipped | replay s |"
    )
    lines = [head, "|---" + "|--:" * 14 + "|"]
    for o in outcomes:
        lines.append(
            f"| {o.policy} | {o.utilisation:.1%} | {_hours(o.mean_jct_s)} | {_hours(o.p50_jct_s)} "
            f"| {_hours(o.p99_jct_s)} | {_hours(o.mean_queue_s)} | {_hours(o.p99_queue_s)} "
            f"| {_hours(o.max_queue_s)} | {o.sla_breaches:,} | {o.sla_credits_usd:,.0f} "
            f"| {o.revenue_usd_per_kwh:.4f} | {o.mining_usd_per_kwh:.4f} | {o.finished:,} "
            f"| {o.skipped:,} | {o.replay_s:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--submit-col", default="timestamp")
    p.add_argument("--duration-col", default="duration")
    p.add_argument("--gpus-col", default="num_gpus")
    p.add_argument("--owner-col", default="cluster")
    p.add_argument("--fleet", help="JSON fleet file (format in the module docstring)")
    p.add_argument("--fleet-scale", type=float, default=1.0, help="multiply every rig count")
    p.add_argument(
        "--policy",
        action="append",
        choices=POLICIES,
        help="repeatable; default: " + ", ".join(DEFAULT_POLICIES),
    )
    p.add_argument("--limit", type=int, default=0, help="first N valid rows by submit time")
    p.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    wall = time.perf_counter()
    spec = json.loads(Path(a.fleet).read_text()) if a.fleet else DEFAULT_FLEET
    fleet = build_fleet(spec, a.fleet_scale)
    trace = load_trace(
        a.trace,
        submit_col=a.submit_col,
        duration_col=a.duration_col,
        gpus_col=a.gpus_col,
        owner_col=a.owner_col,
        max_gang=fleet.max_gang,
        limit=a.limit,
    )
    policies = a.policy or list(DEFAULT_POLICIES)
    global _JOB
    _JOB = (trace, fleet)
    if a.processes > 1 and len(policies) > 1:
        context = multiprocessing.get_context("fork")  # the workers inherit _JOB, unpickled
        with ProcessPoolExecutor(min(a.processes, len(policies)), mp_context=context) as pool:
            outcomes = list(pool.map(_run_one, policies))
    else:
        outcomes = [_run_one(name) for name in policies]
    wall = time.perf_counter() - wall
    print(
        f"{trace.rows:,} rows: {len(trace.jobs):,} replayed, {trace.too_wide:,} skipped (more than "
        f"{fleet.max_gang} GPUs, the largest rig), {trace.invalid:,} invalid; fleet "
        f"{len(fleet.farms)} farms, {len(fleet.rigs)} rigs, {fleet.gpus} GPUs; wall {wall:.1f} s"
    )
    print(format_table(outcomes))
    for o in outcomes:
        if o.ledger_problems:
            print(f"{o.policy}: LEDGER PROBLEMS {o.ledger_problems[:3]}")
    if a.json:
        summary = {
            "policies": {o.policy: o.figures() for o in outcomes},
            "rows": trace.rows,
            "skipped_too_wide": trace.too_wide,
            "invalid": trace.invalid,
            "fleet_gpus": fleet.gpus,
            "wall_s": round(wall, 2),
            "python": platform.python_version(),
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
