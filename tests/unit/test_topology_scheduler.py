"""Issue 15's scheduler: the verification and topology filters, the topology score, and the
kept index against a fresh snapshot and brute force on fleets that mix risers and x16 rigs.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.scheduler import (
    FleetIndex,
    GpuSlot,
    JobRequest,
    Placement,
    Rejection,
    Snapshot,
    WorkerCapacity,
    choice_key,
    passes,
    place,
    preemption_plan,
)
from broker.scheduler.filters import count_rejection, gbps
from broker.scheduler.preemption import PreemptionCandidate, PreemptionPlan, Victim
from broker.scheduler.scores import topology_score
from harness.broker_fixtures import make_job, make_snapshot

RISER = 800  # MB/s, a gen-3 x1 mining riser
X16 = 12_800  # MB/s, a gen-3 x16 slot


def rig(
    worker_id: str,
    gpus: int = 4,
    *,
    pcie: int = X16,
    verified: bool = True,
    score: int = 100,
    ram: int = 16,
    cpu: int = 2000,
    price: int = 250_000,
    busy: frozenset[int] = frozenset(),
    model: str = "RTX 3090",
) -> WorkerCapacity:
    """A rig of ``gpus`` identical GPUs with these figures."""
    slots = tuple(
        GpuSlot(i, model, 24_576, price, i not in busy, verified, score, pcie) for i in range(gpus)
    )
    return WorkerCapacity(worker_id, slots, ram_gb_per_gpu=ram, cpu_millicores_per_gpu=cpu)


def job(job_id: str = "j", n: int = 1, **fields: object) -> JobRequest:
    return dataclasses.replace(make_job(job_id, n), **fields)  # type: ignore[arg-type]


def reasons(workers: list[WorkerCapacity], request: JobRequest) -> tuple[Rejection, ...]:
    (unplaced,) = place(make_snapshot([request], workers)).unplaced
    return unplaced.reasons


# --- the filters, one row each -----------------------------------------------------------------

FILTERS = [
    (
        "verification",
        [rig("w-a", verified=False), rig("w-b", 2, verified=False)],
        job(),
        Rejection(
            "verification",
            "VERIFIED",
            "6 unverified",
            False,
            "no verified GPU: 6 unverified (use --allow-unverified)",
        ),
    ),
    (
        "verification names the model",
        [rig("w-a", 3, verified=False)],
        job(gpu_model="RTX 3090"),
        Rejection(
            "verification",
            "VERIFIED",
            "3 unverified",
            False,
            "no verified RTX 3090: 3 unverified (use --allow-unverified)",
        ),
    ),
    (
        "min_score",
        [rig("w-a", score=95), rig("w-b", score=60)],
        job(min_score=100),
        Rejection("min_score", "100", "95", False, "no GPU scores 100 or more: best scores 95"),
    ),
    (
        "min_pcie",
        [rig("w-a", 8, pcie=900), rig("w-b", pcie=700)],
        job(n=4, min_pcie_mbps=8000),
        Rejection(
            "min_pcie",
            "8 GB/s",
            "0.9 GB/s",
            False,
            "no worker has 4 GPUs with >= 8 GB/s PCIe: best has 0.9 (x1 riser)",
        ),
    ),
    (
        "min_pcie, a single GPU, a wide best",
        [rig("w-a", pcie=3_900)],
        job(min_pcie_mbps=12_500),
        Rejection(
            "min_pcie",
            "12.5 GB/s",
            "3.9 GB/s",
            False,
            "no worker has 1 GPU with >= 12.5 GB/s PCIe: best has 3.9",
        ),
    ),
    (
        "min_host_ram_per_gpu",
        [rig("w-a", ram=8), rig("w-b", ram=4)],
        job(n=2, min_ram_gb_per_gpu=32),
        Rejection(
            "min_host_ram_per_gpu",
            "32 GB",
            "8 GB",
            False,
            "no worker has 2 GPUs with >= 32 GB host RAM per GPU: best has 8",
        ),
    ),
    (
        "min_cpu_per_gpu",
        [rig("w-a", cpu=500), rig("w-b", cpu=250)],
        job(min_cpu_millicores_per_gpu=1500),
        Rejection(
            "min_cpu_per_gpu",
            "1.5",
            "0.5",
            False,
            "no worker has 1 GPU with >= 1.5 CPU cores per GPU: best has 0.5",
        ),
    ),
    (
        "unreported host figures meet no minimum",
        [rig("w-a", ram=0)],
        job(min_ram_gb_per_gpu=1),
        Rejection(
            "min_host_ram_per_gpu",
            "1 GB",
            "0 GB",
            False,
            "no worker has 1 GPU with >= 1 GB host RAM per GPU: best has 0",
        ),
    ),
    (
        "the earlier filters come first: price before verification",
        [rig("w-a", verified=False, price=300_000)],
        job(max_price_micros_per_gpu_hour=200_000),
        Rejection(
            "max_price",
            "$0.200000/GPU-hour",
            "$0.300000/GPU-hour",
            False,
            "cheapest matching GPU asks $0.300000/GPU-hour, above the cap $0.200000",
        ),
    ),
    (
        "verification before score",
        [rig("w-a", verified=False, score=200), rig("w-b", score=50)],
        job(min_score=100),
        Rejection("min_score", "100", "50", False, "no GPU scores 100 or more: best scores 50"),
    ),
    (
        "survivors too few on one worker: the count names the minimums",
        [rig("w-a", 2, pcie=X16), rig("w-b", 8, pcie=RISER)],
        job(n=4, min_pcie_mbps=8000, min_score=90),
        Rejection(
            "gpu_count",
            "4 x GPU",
            "2",
            False,
            "no worker has 4 free GPUs (score >= 90, >= 8 GB/s PCIe): best has 2, "
            "and none has more than 2 in total",
        ),
    ),
]


@pytest.mark.parametrize(
    ("workers", "request_", "expected"),
    [row[1:] for row in FILTERS],
    ids=[row[0] for row in FILTERS],
)
def test_each_filter_rejects_with_its_reason(
    workers: list[WorkerCapacity], request_: JobRequest, expected: Rejection
) -> None:
    assert reasons(workers, request_) == (expected,)
    # the kept index words it the same
    (unplaced,) = FleetIndex(workers).place([request_]).unplaced
    assert unplaced.reasons == (expected,)


PASSING = [
    (
        "allow_unverified takes an unverified GPU",
        rig("w", verified=False),
        job(allow_unverified=True),
    ),
    ("score at the minimum", rig("w", score=100), job(min_score=100)),
    ("bandwidth at the minimum", rig("w", pcie=8000), job(min_pcie_mbps=8000)),
    ("RAM at the minimum", rig("w", ram=32), job(min_ram_gb_per_gpu=32)),
    ("cores at the minimum", rig("w", cpu=1500), job(min_cpu_millicores_per_gpu=1500)),
]


@pytest.mark.parametrize(
    ("worker", "request_"), [r[1:] for r in PASSING], ids=[r[0] for r in PASSING]
)
def test_a_gpu_at_each_minimum_passes(worker: WorkerCapacity, request_: JobRequest) -> None:
    assert passes(request_, worker.gpus[0], worker)
    (placement,) = place(make_snapshot([request_], [worker])).placements
    assert placement.worker_id == "w"


@pytest.mark.parametrize(
    "below", [{"verified": False}, {"score": 99}, {"pcie_mbps": 7900}], ids=str
)
def test_passes_refuses_a_gpu_below_a_minimum(below: dict[str, Any]) -> None:
    request_ = job(min_score=100, min_pcie_mbps=8000)
    worker = rig("w", score=100, pcie=8000)
    assert passes(request_, worker.gpus[0], worker)
    assert not passes(request_, dataclasses.replace(worker.gpus[0], **below), worker)


def test_gbps_words_risers() -> None:
    assert gbps(900, hint=True) == "0.9 (x1 riser)"
    assert gbps(12_000, hint=True) == "12"
    assert gbps(8000) == "8"
    assert gbps(1_500) == "1.5"


def test_count_rejection_lists_every_minimum() -> None:
    request_ = job(n=2, min_ram_gb_per_gpu=16, min_cpu_millicores_per_gpu=2500)
    r = count_rejection(request_, 1, 8, True)
    assert r.message == (
        "no worker has 2 free GPUs (>= 16 GB RAM/GPU, >= 2.5 cores/GPU): best has 1"
    )
    assert r.resolvable


# --- the score ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pcie", "n", "min_pcie", "expected"),
    [
        (800, 1, 0, 800),  # one GPU, no bandwidth asked: narrowest first
        (12_800, 1, 0, 12_800),
        (800, 2, 0, -800),  # a gang: widest first
        (12_800, 8, 0, -12_800),
        (800, 1, 1000, -800),  # asks for bandwidth: widest first
        (0, 1, 0, 0),
    ],
)
def test_topology_score(pcie: int, n: int, min_pcie: int, expected: int) -> None:
    assert topology_score(pcie, n, min_pcie) == expected


def test_choice_key_orders_price_then_topology_then_locality() -> None:
    cheap_riser = choice_key(200_000, 1, 1, "w-z", 24_576, "RTX 3090", topology=800)
    dear_x16 = choice_key(250_000, 1, 1, "w-a", 24_576, "RTX 3090", topology=-12_800)
    local_wide = choice_key(200_000, 1, 1, "w-a", 24_576, "RTX 3090", locality=1, topology=-800)
    remote_wider = choice_key(200_000, 8, 1, "w-b", 24_576, "RTX 3090", topology=-12_800)
    assert cheap_riser < dear_x16  # price first
    assert remote_wider < local_wide  # then topology, before locality and fit
    assert choice_key(1, 1, 1, "w", 1, "m")[1] == 0  # no topology term by default


def test_single_gpus_go_to_risers_and_gangs_to_x16() -> None:
    fleet = [rig("w-riser", 8, pcie=RISER), rig("w-x16", 8, pcie=X16)]
    single, gang, wants_bw = job("single"), job("gang", 4), job("bw", 1, min_pcie_mbps=1000)
    result = place(make_snapshot([single, gang, wants_bw], fleet))
    where = {p.job_id: p.worker_id for p in result.placements}
    assert where == {"single": "w-riser", "gang": "w-x16", "bw": "w-x16"}


def test_without_topology_the_order_is_todays() -> None:
    # best fit: the x16 rig with one GPU free wins a single-GPU job over the roomy riser
    fleet = [rig("w-riser", 8, pcie=RISER), rig("w-x16", 8, pcie=X16, busy=frozenset(range(7)))]
    snapshot = make_snapshot([job("single")], fleet)
    assert place(snapshot, topology=False).placements[0].worker_id == "w-x16"
    assert place(snapshot).placements[0].worker_id == "w-riser"
    assert FleetIndex(fleet).place(snapshot.pending, topology=False).placements[0].worker_id == (
        "w-x16"
    )


def test_price_stays_first() -> None:
    fleet = [rig("w-x16", 8, pcie=X16, price=200_000), rig("w-riser", 8, pcie=RISER)]
    (p,) = place(make_snapshot([job("single")], fleet)).placements
    assert p.worker_id == "w-x16"


def test_quarantine_free_matching_shows_groups_with_their_figures() -> None:
    fleet = [rig("w-a", 2, pcie=RISER, verified=False, score=95), rig("w-b", 4, pcie=X16)]
    groups = FleetIndex(fleet).matching(job(allow_unverified=True))
    assert [(g.pcie_mbps, g.verified, g.score, g.gpus) for g in groups] == [
        (800, False, 95, 2),
        (12_800, True, 100, 4),
    ]
    assert [g.gpus for g in FleetIndex(fleet).matching(job())] == [4]


def test_preemption_respects_the_new_filters() -> None:
    busy = frozenset(range(4))
    worker = rig("w-a", 4, pcie=RISER, busy=busy)
    victim = Victim("spot", 1, (0, 1, 2, 3), 10.0)
    candidates = [PreemptionCandidate(worker, (victim,))]
    plan = preemption_plan(job("g", 2), candidates)
    assert isinstance(plan, PreemptionPlan) and plan.gpu_indices == (0, 1)
    refused = preemption_plan(job("g", 2, min_pcie_mbps=8000), candidates)
    assert isinstance(refused, Rejection) and refused.resource == "preemption"


# --- equivalence: kept index == fresh snapshot == brute force ---------------------------------

PCIE = (RISER, 1_600, X16)


@st.composite
def topo_workers(draw: st.DrawFn, worker_id: str) -> WorkerCapacity:
    size = draw(st.integers(0, 8))
    kinds = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["RTX 3090", "RTX 3060"]),
                st.sampled_from([200_000, 250_000]),
                st.booleans(),  # verified
                st.sampled_from([60, 100]),
                st.sampled_from(PCIE),
            ),
            min_size=1,
            max_size=2,
        )
    )
    gpus = []
    for i in range(size):
        model, price, verified, score, pcie = kinds[i % len(kinds)]
        gpus.append(GpuSlot(i, model, 24_576, price, draw(st.booleans()), verified, score, pcie))
    return WorkerCapacity(
        worker_id,
        tuple(gpus),
        draw(st.sampled_from([1000, 900])),
        ram_gb_per_gpu=draw(st.sampled_from([0, 8, 32])),
        cpu_millicores_per_gpu=draw(st.sampled_from([500, 2000])),
    )


topo_jobs = st.builds(
    JobRequest,
    job_id=st.just(""),
    gpu_count=st.integers(0, 5),
    gpu_model=st.sampled_from(["", "RTX 3090"]),
    max_price_micros_per_gpu_hour=st.sampled_from([0, 200_000]),
    allow_unverified=st.booleans(),
    min_score=st.sampled_from([0, 0, 100]),
    min_pcie_mbps=st.sampled_from([0, 0, 1_000, 8_000]),
    min_ram_gb_per_gpu=st.sampled_from([0, 0, 16]),
    min_cpu_millicores_per_gpu=st.sampled_from([0, 0, 1000]),
)


def brute_force(snapshot: Snapshot, topology: bool = True) -> list[object]:
    """Every (worker, group) scored with choice_key, for every job in order."""
    free = {(w.worker_id, g.index): g.free for w in snapshot.workers for g in w.gpus}
    out: list[object] = []
    for request_ in snapshot.pending:
        n = request_.gpu_count
        best = None
        for w in snapshot.workers:
            groups: dict[tuple, list[int]] = {}
            for g in sorted(w.gpus, key=lambda s: s.index):
                if passes(request_, g, w) and free[(w.worker_id, g.index)]:
                    key = (g.price_micros_per_gpu_hour, g.model, g.vram_mb, g.verified, g.score)
                    groups.setdefault((*key, g.pcie_mbps), []).append(g.index)
            for (price, model, vram, verified, score, pcie), indices in groups.items():
                if n < 1 or len(indices) < n:
                    continue
                topo = topology_score(pcie, n, request_.min_pcie_mbps) if topology else 0
                key = choice_key(
                    price,
                    len(indices),
                    n,
                    w.worker_id,
                    vram,
                    model,
                    w.reliability_permille,
                    0,
                    topo,
                )
                # exact ties between groups of one worker: unverified, then lower scores, then
                # narrower links first (the index's group order when topology is off)
                key = (*key, verified, score, pcie)
                if best is None or key < best[0]:
                    best = (key, Placement(request_.job_id, w.worker_id, tuple(indices[:n]), price))
        if best is None:
            out.append(request_.job_id)
            continue
        out.append(best[1])
        for i in best[1].gpu_indices:
            free[(best[1].worker_id, i)] = False
    return out


def _flat(result: object) -> list[object]:
    placed = {p.job_id: p for p in result.placements}  # type: ignore[attr-defined]
    order = [p.job_id for p in result.placements] + [u.job_id for u in result.unplaced]  # type: ignore[attr-defined]
    return [placed.get(j, j) for j in sorted(order, key=lambda j: int(j[1:]))]


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    pending=st.lists(topo_jobs, max_size=10),
    topology=st.booleans(),
)
def test_index_equals_snapshot_equals_brute_force(
    data: st.DataObject, pending: list[JobRequest], topology: bool
) -> None:
    ids = data.draw(st.lists(st.sampled_from("abcdef"), unique=True, max_size=5))
    fleet = [data.draw(topo_workers(f"w-{i}")) for i in ids]
    # reliability differences make brute force and the index rank alike (both use it)
    pending = [dataclasses.replace(j, job_id=f"j{k}") for k, j in enumerate(pending)]
    snapshot = Snapshot(1.0, tuple(pending), tuple(fleet))
    expected = place(snapshot, topology=topology)
    # an index built one worker at a time, in another order, with stale entries on the way
    kept = FleetIndex()
    rnd = random.Random(len(fleet))
    gone = data.draw(topo_workers("w-gone"))  # a worker that leaves before the pass
    kept.update(gone)
    for w in rnd.sample(fleet, len(fleet)):
        kept.update(
            dataclasses.replace(w, gpus=tuple(dataclasses.replace(g, free=True) for g in w.gpus))
        )
        kept.update(w)
    kept.remove("w-gone")
    assert kept.place(pending, topology=topology) == expected
    assert _flat(expected) == brute_force(snapshot, topology)
