"""Tests of broker.scheduler: table-driven choices and rejections, and a property test.

Prices are micro-dollars per GPU-hour. The choice key is
(price, -locality, leftover = free in group - gpu_count, -reliability, worker_id, vram_mb,
model); the comment on each case works out the parts that decide it.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.scheduler import (
    JobRequest,
    Placement,
    Rejection,
    SchedulingResult,
    Snapshot,
    WorkerCapacity,
    choice_key,
    locality_score,
    place,
)
from harness.broker_fixtures import make_gpu, make_job, make_snapshot, make_worker

W3090 = 24_576
W3060 = 12_288


# --- which GPUs a job gets -----------------------------------------------------------------------

CHOICES = [
    pytest.param(
        # w-a: (300000, 8-1=7, "w-a")  w-b: (200000, 8-1=7, "w-b")  -> w-b, cheaper
        [
            make_worker("w-a", price_micros_per_gpu_hour=300_000),
            make_worker("w-b", model="RTX 3060", price_micros_per_gpu_hour=200_000),
        ],
        [make_job("j1", 1)],
        [Placement("j1", "w-b", (0,), 200_000)],
        id="cheapest-first",
    ),
    pytest.param(
        # same price; w-a: leftover 8-2=6, w-b (free 5,6,7): 3-2=1  -> w-b, best fit
        [make_worker("w-a"), make_worker("w-b", busy={0, 1, 2, 3, 4})],
        [make_job("j1", 2)],
        [Placement("j1", "w-b", (5, 6), 250_000)],
        id="best-fit",
    ),
    pytest.param(
        # w-a: (300000, 2-2=0)  w-b: (250000, 8-2=6)  -> w-b; price outranks fit
        [
            make_worker("w-a", price_micros_per_gpu_hour=300_000, busy=range(6)),
            make_worker("w-b"),
        ],
        [make_job("j1", 2)],
        [Placement("j1", "w-b", (0, 1), 250_000)],
        id="price-beats-fit",
    ),
    pytest.param(
        # both (250000, 8-1=7); "w-a" < "w-b" -> w-a, whatever the snapshot order
        [make_worker("w-b"), make_worker("w-a")],
        [make_job("j1", 1)],
        [Placement("j1", "w-a", (0,), 250_000)],
        id="tie-lowest-worker-id",
    ),
    pytest.param(
        # one rig: 3090 x2 free (leftover 2-2=0) and 3060 x4 free (4-2=2), same price -> 3090s
        [
            make_worker(
                "w-a",
                gpus=[make_gpu(i, "RTX 3090") for i in (0, 1)]
                + [make_gpu(i, "RTX 3060") for i in (2, 3, 4, 5)],
            )
        ],
        [make_job("j1", 2)],
        [Placement("j1", "w-a", (0, 1), 250_000)],
        id="best-fit-across-groups-of-one-worker",
    ),
    pytest.param(
        # 3090 x2 (250000, 0, "w-a", 24576) vs 3060 x2 (250000, 0, "w-a", 12288) -> 3060s
        [
            make_worker(
                "w-a",
                gpus=[make_gpu(i, "RTX 3090") for i in (0, 1)]
                + [make_gpu(i, "RTX 3060") for i in (2, 3)],
            )
        ],
        [make_job("j1", 2)],
        [Placement("j1", "w-a", (2, 3), 250_000)],
        id="tie-smaller-vram",
    ),
    pytest.param(
        # GPUs listed out of order: the gang is the lowest free indices, sorted
        [make_worker("w-a", gpus=[make_gpu(i) for i in (7, 3, 5, 1)])],
        [make_job("j1", 3)],
        [Placement("j1", "w-a", (1, 3, 5), 250_000)],
        id="lowest-indices-sorted",
    ),
    pytest.param(
        # 3060 @200000 would win on price, but the job asks for a 3090
        [
            make_worker("w-a", model="RTX 3060", price_micros_per_gpu_hour=200_000),
            make_worker("w-b"),
        ],
        [make_job("j1", 1, gpu_model="RTX 3090")],
        [Placement("j1", "w-b", (0,), 250_000)],
        id="filter-model",
    ),
    pytest.param(
        # 3060 has 12288 MB < 16000; 3090 has 24576 MB >= 16000 -> w-b
        [
            make_worker("w-a", model="RTX 3060", price_micros_per_gpu_hour=200_000),
            make_worker("w-b"),
        ],
        [make_job("j1", 1, min_vram_mb=16_000)],
        [Placement("j1", "w-b", (0,), 250_000)],
        id="filter-vram",
    ),
    pytest.param(
        # cap 250000: w-a asks 300000 > cap, w-b asks 250000 <= cap (cap is inclusive)
        [
            make_worker("w-a", price_micros_per_gpu_hour=300_000, busy=range(7)),
            make_worker("w-b"),
        ],
        [make_job("j1", 1, max_price_micros_per_gpu_hour=250_000)],
        [Placement("j1", "w-b", (0,), 250_000)],
        id="filter-price-cap-inclusive",
    ),
    pytest.param(
        # w-a free 5,6,7. j1 wants 4 > 3: skipped; j2 backfills 5,6 (3-2=1 left); j3 takes 7
        [make_worker("w-a", busy={0, 1, 2, 3, 4})],
        [make_job("j1", 4), make_job("j2", 2), make_job("j3", 1), make_job("j4", 1)],
        [Placement("j2", "w-a", (5, 6), 250_000), Placement("j3", "w-a", (7,), 250_000)],
        id="greedy-with-backfill",
    ),
    pytest.param(
        # j1 (2): w-a 8-2=6 vs w-b 3-2=1 -> w-b (free 0,1,2 -> 2 left)
        # j2 (2): w-a 8-2=6 vs w-b 1 < 2, does not fit -> w-a
        # j3 (1): w-a 6-1=5 vs w-b 1-1=0 -> w-b takes its last GPU, 2
        [make_worker("w-a"), make_worker("w-b", gpu_count=3)],
        [make_job("j1", 2), make_job("j2", 2), make_job("j3", 1)],
        [
            Placement("j1", "w-b", (0, 1), 250_000),
            Placement("j2", "w-a", (0, 1), 250_000),
            Placement("j3", "w-b", (2,), 250_000),
        ],
        id="packing-sequence",
    ),
]


@pytest.mark.parametrize(("workers", "jobs", "expected"), CHOICES)
def test_choice(
    workers: list[WorkerCapacity], jobs: list[JobRequest], expected: list[Placement]
) -> None:
    result = place(make_snapshot(jobs, workers))
    assert list(result.placements) == expected
    assert {u.job_id for u in result.unplaced} == {j.job_id for j in jobs} - {
        p.job_id for p in expected
    }


# --- why a job is not placed ----------------------------------------------------------------------

FLEET = [
    make_worker("w-a", model="RTX 3060", price_micros_per_gpu_hour=200_000, busy=range(6)),
    make_worker("w-b", busy=range(6)),  # RTX 3090, $0.25, free 6 and 7
]

REJECTIONS = [
    pytest.param(
        make_job("j", 1, gpu_model="A100", min_vram_mb=80_000),  # model is checked first
        Rejection(
            "gpu_model",
            "A100",
            "RTX 3060, RTX 3090",
            False,
            "no GPU of model A100 is registered (fleet has RTX 3060, RTX 3090)",
        ),
        id="model",
    ),
    pytest.param(
        # RTX 3060 has 12288 < 16384 MB; the cap of 1 micro-dollar would fail too, but later
        make_job("j", 1, gpu_model="RTX 3060", min_vram_mb=16_384, max_price_micros_per_gpu_hour=1),
        Rejection(
            "min_vram",
            "16384 MB",
            "12288 MB",
            False,
            "no RTX 3060 has 16384 MB VRAM or more (largest has 12288 MB)",
        ),
        id="vram-before-price",
    ),
    pytest.param(
        # matching: 3090 @250000 (3060 has too little VRAM); 250000 > cap 200000
        make_job("j", 4, min_vram_mb=20_000, max_price_micros_per_gpu_hour=200_000),
        Rejection(
            "max_price",
            "$0.200000/GPU-hour",
            "$0.250000/GPU-hour",
            False,
            "cheapest matching GPU asks $0.250000/GPU-hour, above the cap $0.200000",
        ),
        id="price-before-count",
    ),
    pytest.param(
        # w-b has 8 RTX 3090, 2 free: 2 < 4 now, but 4 <= 8 once jobs finish
        make_job("j", 4, gpu_model="RTX 3090"),
        Rejection(
            "gpu_count", "4 x RTX 3090", "2", True, "no worker has 4 free RTX 3090: best has 2"
        ),
        id="count-resolvable",
    ),
    pytest.param(
        # 16 > 8 = most RTX 3090 on any worker: waiting cannot help
        make_job("j", 16, gpu_model="RTX 3090"),
        Rejection(
            "gpu_count",
            "16 x RTX 3090",
            "2",
            False,
            "no worker has 16 free RTX 3090: best has 2, and none has more than 8 in total",
        ),
        id="count-unresolvable",
    ),
    pytest.param(
        # both groups pass (3060: 12288 >= 10000, 200000 <= 300000); best is 2 free on one worker
        make_job("j", 3, min_vram_mb=10_000, max_price_micros_per_gpu_hour=300_000),
        Rejection(
            "gpu_count",
            "3 x GPU",
            "2",
            True,
            "no worker has 3 free GPUs (>= 10000 MB, <= $0.300000/GPU-hour): best has 2",
        ),
        id="count-with-qualifiers",
    ),
    pytest.param(
        # 0 GPUs is never placeable; available is still the best single worker: 2 free
        make_job("j", 0),
        Rejection("gpu_count", "0", "2", False, "gpu_count must be >= 1, got 0"),
        id="count-not-positive",
    ),
]


@pytest.mark.parametrize(("job", "expected"), REJECTIONS)
def test_rejection(job: JobRequest, expected: Rejection) -> None:
    result = place(make_snapshot([job], FLEET))
    assert result.placements == ()
    assert [(u.job_id, u.reasons) for u in result.unplaced] == [(job.job_id, (expected,))]


def test_busy_gpus_count_as_registered() -> None:
    # every RTX 3090 is busy: the model exists, so the job waits (resolvable), best has 0
    result = place(
        make_snapshot([make_job("j", 1, gpu_model="RTX 3090")], [make_worker(busy=range(8))])
    )
    assert result.unplaced[0].reasons == (
        Rejection(
            "gpu_count", "1 x RTX 3090", "0", True, "no worker has 1 free RTX 3090: best has 0"
        ),
    )


def test_empty_fleet() -> None:
    result = place(make_snapshot([make_job("j", 1)], []))
    assert result.unplaced[0].reasons == (
        Rejection(
            "gpu_count", "1 x GPU", "0", False, "no worker has 1 free GPU: the fleet has no GPUs"
        ),
    )


def test_reason_reflects_capacity_left_when_the_job_is_considered() -> None:
    # j1 takes 6 of w-b's 8 (8-6=2 left); j2 (4) then sees best has 2; j3 (4) is cached but
    # j4 (1) takes one more, so j5 (4) must see best has 1, not the cached 2
    jobs = [
        make_job("j1", 6),
        make_job("j2", 4),
        make_job("j3", 4),
        make_job("j4", 1),
        make_job("j5", 4),
    ]
    result = place(make_snapshot(jobs, [make_worker("w-b")]))
    assert [(u.job_id, u.reasons[0].available) for u in result.unplaced] == [
        ("j2", "2"),
        ("j3", "2"),
        ("j5", "1"),
    ]


def test_duplicate_worker_id_is_refused() -> None:
    with pytest.raises(ValueError, match="duplicate worker_id"):
        place(make_snapshot([], [make_worker("w"), make_worker("w")]))


def test_duplicate_gpu_index_is_refused() -> None:
    with pytest.raises(ValueError, match="duplicate GPU index"):
        place(make_snapshot([], [make_worker("w", gpus=[make_gpu(0), make_gpu(0)])]))


# --- properties --------------------------------------------------------------------------------

ENVS = ("e" * 64, "f" * 64)  # requirements_sha256 of two Python environments
KINDS = [  # (model, vram_mb, price): a few homogeneous groups, two sharing a model
    ("RTX 3060", W3060, 150_000),
    ("RTX 3090", W3090, 250_000),
    ("RTX 3090", W3090, 300_000),
    ("A4000", 16_384, 250_000),
]


@st.composite
def workers(draw: st.DrawFn) -> WorkerCapacity:
    size = draw(st.integers(0, 9))
    indices = draw(st.permutations(range(size)))
    gpus = [
        make_gpu(
            i,
            model,
            vram_mb=vram,
            price_micros_per_gpu_hour=price,
            free=draw(st.booleans()),
        )
        for i in indices
        for model, vram, price in [draw(st.sampled_from(KINDS))]
    ]
    worker = make_worker(gpus=gpus, environments=draw(st.sets(st.sampled_from(ENVS))))
    return dataclasses.replace(worker, containers=draw(st.booleans()))


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    ids = draw(st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=6))
    fleet = [dataclasses.replace(draw(workers()), worker_id=f"w-{i}") for i in ids]
    jobs = [
        dataclasses.replace(
            make_job(
                f"j{k}",
                draw(st.integers(0, 9)),
                gpu_model=draw(st.sampled_from(["", "", "RTX 3090", "RTX 3060", "A100"])),
                min_vram_mb=draw(st.sampled_from([0, 0, 10_000, 16_384, 30_000])),
                max_price_micros_per_gpu_hour=draw(
                    st.sampled_from([0, 0, 200_000, 250_000, 100_000])
                ),
                environment=draw(st.sampled_from(["", "", *ENVS])),
            ),
            containers=draw(st.sampled_from([False, False, True])),
        )
        for k in range(draw(st.integers(0, 14)))
    ]
    return make_snapshot(jobs, fleet)


def _reference(snapshot: Snapshot) -> list[tuple[str, object]]:
    """Brute force over every worker for every job; (job_id, placement or reason fields)."""
    free = {(w.worker_id, g.index): g.free for w in snapshot.workers for g in w.gpus}
    envs = {w.worker_id: w.environments for w in snapshot.workers}
    runs = {w.worker_id: w.containers for w in snapshot.workers}
    everything = [(w.worker_id, g) for w in snapshot.workers for g in w.gpus]
    out: list[tuple[str, object]] = []
    for job in snapshot.pending:
        n = job.gpu_count
        eligible = [(w, g) for w, g in everything if runs[w] or not job.containers]
        model_ok = [(w, g) for w, g in eligible if not job.gpu_model or g.model == job.gpu_model]
        vram_ok = [(w, g) for w, g in model_ok if g.vram_mb >= job.min_vram_mb]
        cap = job.max_price_micros_per_gpu_hour
        price_ok = [(w, g) for w, g in vram_ok if not cap or g.price_micros_per_gpu_hour <= cap]
        groups: dict[tuple[str, str, int, int], list[int]] = {}
        totals: dict[tuple[str, str, int, int], int] = {}
        for w, g in price_ok:
            key = (w, g.model, g.vram_mb, g.price_micros_per_gpu_hour)
            totals[key] = totals.get(key, 0) + 1
            if free[(w, g.index)]:
                groups.setdefault(key, []).append(g.index)
        best_free = max((len(v) for v in groups.values()), default=0)
        if everything and not eligible:
            out.append((job.job_id, ("container_runtime", False)))
        elif everything and not model_ok:
            out.append((job.job_id, ("gpu_model", False)))
        elif everything and not vram_ok:
            out.append((job.job_id, ("min_vram", False)))
        elif everything and not price_ok:
            out.append((job.job_id, ("max_price", False)))
        elif n < 1 or best_free < n:
            resolvable = n >= 1 and any(t >= n for t in totals.values())
            out.append((job.job_id, ("gpu_count", str(best_free), resolvable)))
        else:
            fits = [(k, v) for k, v in groups.items() if len(v) >= n]
            (w, _, _, price), idx = min(
                fits,
                key=lambda kv: _key(
                    kv[0], len(kv[1]), n, locality_score(envs[kv[0][0]], job.environment)
                ),
            )
            taken = tuple(sorted(idx)[:n])
            for i in taken:
                free[(w, i)] = False
            out.append((job.job_id, Placement(job.job_id, w, taken, price)))
    return out


def _key(
    group: tuple[str, str, int, int], free: int, n: int, locality: int = 0
) -> tuple[int, int, int, int, str, int, str]:
    worker_id, model, vram, price = group
    return choice_key(price, free, n, worker_id, vram, model, locality=locality)


def _flatten(result: SchedulingResult) -> dict[str, object]:
    out: dict[str, object] = {p.job_id: p for p in result.placements}
    for u in result.unplaced:
        r = u.reasons[0]
        out[u.job_id] = (
            (r.resource, r.resolvable)
            if r.resource != "gpu_count"
            else (
                r.resource,
                r.available,
                r.resolvable,
            )
        )
    return out


@settings(max_examples=400, deadline=None)
@given(snapshots(), st.randoms(use_true_random=False))
def test_properties(snapshot: Snapshot, rnd: random.Random) -> None:
    result = place(snapshot)
    gpus = {(w.worker_id, g.index): g for w in snapshot.workers for g in w.gpus}
    jobs = {j.job_id: j for j in snapshot.pending}
    runs = {w.worker_id: w.containers for w in snapshot.workers}

    # every job is either placed or unplaced, exactly once, in pending order
    order = [j.job_id for j in snapshot.pending]
    assert [p.job_id for p in result.placements] == [j for j in order if j in _placed(result)]
    assert [u.job_id for u in result.unplaced] == [j for j in order if j not in _placed(result)]

    taken: set[tuple[str, int]] = set()
    for p in result.placements:
        job = jobs[p.job_id]
        slots = [gpus[(p.worker_id, i)] for i in p.gpu_indices]  # one worker, by construction
        assert list(p.gpu_indices) == sorted(set(p.gpu_indices))
        assert len(slots) == job.gpu_count
        assert all(s.free for s in slots)
        assert len({(s.model, s.vram_mb, s.price_micros_per_gpu_hour) for s in slots}) == 1
        assert not job.gpu_model or slots[0].model == job.gpu_model
        assert slots[0].vram_mb >= job.min_vram_mb
        cap = job.max_price_micros_per_gpu_hour
        assert not cap or slots[0].price_micros_per_gpu_hour <= cap
        assert p.price_micros_per_gpu_hour == slots[0].price_micros_per_gpu_hour
        assert not job.containers or runs[p.worker_id]
        for i in p.gpu_indices:  # no GPU placed twice
            assert (p.worker_id, i) not in taken
            taken.add((p.worker_id, i))

    for u in result.unplaced:
        assert u.reasons and all(r.message for r in u.reasons)

    # deterministic, and independent of the order workers and GPUs are listed in
    shuffled = [
        dataclasses.replace(w, gpus=tuple(rnd.sample(w.gpus, len(w.gpus))))
        for w in snapshot.workers
    ]
    rnd.shuffle(shuffled)
    assert place(snapshot) == result
    assert place(dataclasses.replace(snapshot, workers=tuple(shuffled))) == result

    # and the same answer as brute force over every worker
    assert _flatten(result) == dict(_reference(snapshot))


def _placed(result: SchedulingResult) -> set[str]:
    return {p.job_id for p in result.placements}


def test_more_reliable_worker_wins_a_tie_on_price_and_fit():
    # Same price, same leftover (8 - 1 = 7 on both): reliability decides (-990 < -700),
    # even though "w-a" sorts first by id.
    flaky = WorkerCapacity("w-a", make_worker("w-a").gpus, reliability_permille=700)
    solid = WorkerCapacity("w-b", make_worker("w-b").gpus, reliability_permille=990)
    result = place(make_snapshot([make_job("j1")], [flaky, solid]))
    assert result.placements[0].worker_id == "w-b"
    # Price still comes first: a cheaper flaky worker beats a dearer reliable one.
    cheap = WorkerCapacity(
        "w-a", make_worker("w-a", price_micros_per_gpu_hour=100_000).gpus, reliability_permille=700
    )
    result = place(make_snapshot([make_job("j1")], [cheap, solid]))
    assert result.placements[0].worker_id == "w-a"
