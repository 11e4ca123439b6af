"""The environment-locality score: a worker that already holds a job's Python environment
wins among equally priced candidates (Kubernetes' ImageLocality is the model)."""

from __future__ import annotations

import pytest

from broker.scheduler import FleetIndex, choice_key, locality_score, place
from harness.broker_fixtures import make_job, make_snapshot, make_worker

ENV = "a" * 64
OTHER = "b" * 64


@pytest.mark.parametrize(
    ("held", "wanted", "score"),
    [
        ({ENV}, ENV, 1),  # holds it: its setup installs nothing
        ({OTHER}, ENV, 0),  # holds another environment
        (set(), ENV, 0),  # holds none
        ({ENV}, "", 0),  # the job brings no environment: no worker is nearer
    ],
)
def test_locality_score(held, wanted, score):
    assert locality_score(frozenset(held), wanted) == score


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        # Same price: locality beats a tighter fit. w-a: (250000, 0, 3, ...) vs
        # w-b holding the environment: (250000, -1, 7, ...) -> -1 < 0, w-b wins.
        (dict(gpu_count=4), dict(gpu_count=8, environments={ENV}), "w-b"),
        # Price first: w-b holds it but asks 300000 > 250000 -> w-a wins.
        (dict(), dict(environments={ENV}, price_micros_per_gpu_hour=300_000), "w-a"),
        # Locality beats reliability: (.., -1, 7, -500, ..) < (.., 0, 7, -1000, ..).
        (dict(), dict(environments={ENV}, reliability_permille=500), "w-b"),
        # Both hold it: back to best fit, then reliability, then id.
        (dict(environments={ENV}), dict(environments={ENV}, gpu_count=2), "w-b"),
        # Neither holds it: ties go to the lower worker id.
        (dict(environments={OTHER}), dict(), "w-a"),
    ],
)
def test_placement_prefers_a_worker_holding_the_environment(a, b, winner):
    workers = [make_worker("w-a", **a), make_worker("w-b", **b)]
    result = place(make_snapshot([make_job("j", environment=ENV)], workers))
    assert [p.worker_id for p in result.placements] == [winner]


def test_choice_key_orders_locality_after_price_and_before_fit():
    local = choice_key(250_000, 8, 1, "w-z", 24576, "RTX 3090", 500, locality=1)
    tight = choice_key(250_000, 1, 1, "w-a", 24576, "RTX 3090", 1000, locality=0)
    cheaper = choice_key(200_000, 8, 1, "w-z", 24576, "RTX 3090", 500, locality=0)
    assert cheaper < local < tight


def test_kept_index_forgets_environments_of_updated_and_removed_workers():
    index = FleetIndex([make_worker("w-a", environments={ENV}), make_worker("w-b")])
    index.update(make_worker("w-a"))  # the rig evicted the environment
    result = index.place([make_job("j1", environment=ENV)])
    assert result.placements[0].worker_id == "w-a"  # by id: nobody holds it now
    index.update(make_worker("w-b", environments={ENV}))
    assert index.place([make_job("j2", environment=ENV)]).placements[0].worker_id == "w-b"
    index.remove("w-b")
    assert index.place([make_job("j3", environment=ENV)]).placements[0].worker_id == "w-a"


def test_gang_takes_the_holders_lowest_free_indices_and_counts_them_taken():
    index = FleetIndex(
        [make_worker("w-a", gpu_count=4), make_worker("w-b", gpu_count=4, environments={ENV})]
    )
    first = index.place([make_job("j1", 3, environment=ENV)])
    assert first.placements[0].worker_id == "w-b"
    assert first.placements[0].gpu_indices == (0, 1, 2)
    # w-b has one GPU left: a 2-GPU job with the environment must go to w-a.
    second = index.place([make_job("j2", 2, environment=ENV), make_job("j3", 1, environment=ENV)])
    assert [(p.worker_id, p.gpu_indices) for p in second.placements] == [
        ("w-a", (0, 1)),
        ("w-b", (3,)),
    ]
