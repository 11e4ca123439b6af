"""Container images on the broker's side: the reference's syntax, the registry credentials'
shape, the ``container_runtime`` filter and the image's locality score, in the scheduler and
through the core (placement, preemption, QuoteJob, the assignment's payload)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from broker.convert import assignment_pb, spec_pb, worker_pb
from broker.core import BrokerCore
from broker.errors import InvalidArgument
from broker.events import Assign, JobSubmitted, SchedulePass, WorkerRegistered
from broker.model import GpuInfo, JobSpec, Tier
from broker.scheduler import Rejection, place
from broker.store.rows import spec_from_json, spec_to_json
from broker.validation import check_image, check_job_spec, check_registry_auth
from harness.broker_fixtures import healthy, make_job, make_snapshot, make_worker
from rigshift.v1 import job_pb2

DIGEST = "sha256:" + "0123456789abcdef" * 4
ENV = "e" * 64  # a requirements_sha256


# --- the reference ------------------------------------------------------------------------------

VALID = [
    "busybox",
    "busybox:1.36",
    "library/busybox",
    "ghcr.io/org/train:1.4",
    "registry.local:5000/x@" + DIGEST,
    "127.0.0.1:5055/rs-test:1",
    "localhost/rs-test:1",
    "localhost:5000/a/b/c:v1.2.3-rc_1",
    "docker.io/library/python:3.11-slim@" + DIGEST,
    "my-registry.example.com/team/my_image__x.y-z:LATEST",
    "a" * 63,  # not 64 hex digits: a name
    "x/" + "a" * 64,  # 64 hex digits are only refused as the whole name
    "r/" + "n" * 508 + ":t",  # 512 characters
]


@pytest.mark.parametrize("ref", VALID)
def test_valid_references(ref: str) -> None:
    assert check_image(ref) == ""


INVALID = [
    # (reference, what the violation says)
    ("Busybox", "path component 'Busybox' must be lower-case"),
    ("ghcr.io/Org/train", "path component 'Org' must be lower-case"),
    ("org//train", "path component '' must be lower-case"),
    ("org/train/", "path component '' must be lower-case"),
    ("org/-train", "path component '-train' must be lower-case"),
    ("org/tr..ain", "path component 'tr..ain' must be lower-case"),
    ("org/tr___ain", "path component 'tr___ain' must be lower-case"),
    ("train:", "tag '' must be 1-128"),
    ("train:.hidden", "tag '.hidden' must be 1-128"),
    ("train:" + "t" * 129, "tag 'tttt"),
    ("train:a/b", "registry 'train:a' must be a host name"),  # a ':' in the first component
    ("train@sha256:abc", "digest 'sha256:abc' must be sha256: and 64 lowercase hex"),
    ("train@md5:" + "0" * 32, "digest 'md5:"),
    ("train@" + DIGEST.upper(), "digest 'SHA256:"),
    ("-bad.io/x", "registry '-bad.io' must be a host name"),
    ("reg.io:port/x", "registry 'reg.io:port' must be a host name"),
    ("reg_io.com/x", "registry 'reg_io.com' must be a host name"),
    ("with space", "must not contain whitespace"),
    ("tab\tx", "must not contain whitespace"),
    ("0123456789abcdef" * 4, "must not be 64 hex digits"),
    ("r/" + "n" * 509 + ":t", "must be at most 512 characters (got 513)"),
]


@pytest.mark.parametrize(("ref", "reason"), INVALID)
def test_invalid_references(ref: str, reason: str) -> None:
    assert reason in check_image(ref)


def test_an_invalid_image_is_a_field_violation_on_spec_environment_image() -> None:
    spec = job_pb2.JobSpec(command=["x"], gpu_count=1, environment=job_pb2.Environment(image="Bad"))
    with pytest.raises(InvalidArgument) as err:
        check_job_spec(spec, 3)
    (violation,) = err.value.violations
    assert violation.field == "spec.environment.image"
    assert "path component 'Bad'" in violation.description


def test_the_image_goes_into_the_spec_and_back_out() -> None:
    ref = "ghcr.io/org/train:1.4"
    spec = check_job_spec(
        job_pb2.JobSpec(command=["x"], gpu_count=1, environment=job_pb2.Environment(image=ref)), 3
    )
    assert spec.image == ref
    assert spec_pb(spec).environment.image == ref
    assert spec_from_json(spec_to_json(spec)) == spec
    old_row = json.loads(spec_to_json(spec))
    del old_row["image"]  # a row written before images existed
    assert spec_from_json(json.dumps(old_row)).image == ""
    assert not spec_pb(JobSpec(command=("x",))).HasField("environment")


# --- registry credentials ---------------------------------------------------------------------

AUTH = json.dumps({"auths": {"127.0.0.1:5055": {"auth": "dTpw"}}}).encode()


@pytest.mark.parametrize(
    ("auth", "image", "reason"),
    [
        (AUTH, "", "is allowed only with spec.environment.image"),
        (b"x" * (64 * 1024 + 1), "a", "must be at most 65536 bytes (got 65537)"),
        (b"not json", "a", 'with an "auths" object'),
        (b"\xff\xfe", "a", 'with an "auths" object'),
        (b"[]", "a", 'with an "auths" object'),
        (b'{"auths": []}', "a", 'with an "auths" object'),
        (b'{"credHelpers": {}}', "a", 'with an "auths" object'),
    ],
)
def test_invalid_registry_auth(auth: bytes, image: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_registry_auth(auth, image)
    (violation,) = err.value.violations
    assert violation.field == "registry_auth"
    assert reason in violation.description
    assert b"dTpw" not in violation.description.encode()  # never quoted


@pytest.mark.parametrize("auth", [b"", AUTH, b'{"auths": {}}'])
def test_valid_registry_auth(auth: bytes) -> None:
    check_registry_auth(auth, "busybox")


# --- the container_runtime filter ---------------------------------------------------------------


def runs(worker_id: str, **kw: object):
    """A worker with a container runtime."""
    return dataclasses.replace(make_worker(worker_id, **kw), containers=True)  # type: ignore[arg-type]


def image_job(job_id: str = "j", n: int = 1, *, image: str = "ghcr.io/org/train:1.4", **kw):
    return dataclasses.replace(make_job(job_id, n, environment=image, **kw), containers=True)


@pytest.mark.parametrize(
    ("workers", "job", "winner"),
    [
        # Only w-b runs containers: the image job goes there though w-a is cheaper
        # (the filter comes before any score).
        (
            [make_worker("w-a", price_micros_per_gpu_hour=100_000), runs("w-b")],
            image_job(),
            "w-b",
        ),
        # A job without an image may go anywhere: w-a by id, both at $0.25.
        ([make_worker("w-a"), runs("w-b")], make_job("j"), "w-a"),
        # Both run containers: the usual key, cheapest first.
        ([runs("w-a"), runs("w-b", price_micros_per_gpu_hour=100_000)], image_job(), "w-b"),
    ],
)
def test_an_image_job_goes_only_to_a_worker_with_a_container_runtime(workers, job, winner):
    result = place(make_snapshot([job], workers))
    assert [p.worker_id for p in result.placements] == [winner]


def test_no_worker_runs_containers_is_a_structured_rejection_not_resolved_by_waiting():
    fleet = [make_worker(f"w-{i:02}") for i in range(12)]
    result = place(make_snapshot([image_job()], fleet))
    (unplaced,) = result.unplaced
    assert unplaced.reasons == (
        Rejection(
            "container_runtime",
            "a container runtime",
            "0",
            False,
            "no worker runs containers: 0 of 12 have a container runtime",
        ),
    )


def test_later_filters_look_only_at_workers_that_run_containers():
    # The A100s are on a worker without a runtime: for an image job there are none.
    fleet = [make_worker("w-a", model="A100"), runs("w-b")]
    (unplaced,) = place(make_snapshot([image_job(gpu_model="A100")], fleet)).unplaced
    assert unplaced.reasons[0].resource == "gpu_model"
    assert unplaced.reasons[0].available == "RTX 3090"


def test_busy_container_workers_make_the_image_job_wait():
    # w-b runs containers but all 8 GPUs are busy: 1 <= 8 in total, waiting helps.
    fleet = [make_worker("w-a"), runs("w-b", busy=range(8))]
    (unplaced,) = place(make_snapshot([image_job()], fleet)).unplaced
    reason = unplaced.reasons[0]
    assert (reason.resource, reason.available, reason.resolvable) == ("gpu_count", "0", True)


# --- locality of an image -----------------------------------------------------------------------

IMAGE = "ghcr.io/org/train:1.4"
PINNED = "ghcr.io/org/train@" + DIGEST


@pytest.mark.parametrize(
    ("a", "b", "job", "winner"),
    [
        # Same price: holding the image beats a tighter fit. w-a: (250000, 0, 3, ...) vs
        # w-b holding it: (250000, -1, 7, ...) -> -1 < 0, w-b wins.
        (dict(gpu_count=4), dict(environments={IMAGE}), image_job(), "w-b"),
        # A pinned job matches the digest form the rig reports: locality 1 on w-b.
        (dict(), dict(environments={IMAGE, PINNED}), image_job(image=PINNED), "w-b"),
        # Another tag of the same repository is another image: locality 0 on both, by id.
        (dict(), dict(environments={"ghcr.io/org/train:1.3"}), image_job(), "w-a"),
        # Price first: w-b holds it but asks 300000 > 250000 -> w-a wins.
        (
            dict(),
            dict(environments={IMAGE}, price_micros_per_gpu_hour=300_000),
            image_job(),
            "w-a",
        ),
        # Image + requirements: the image counts. w-a holds the environment only (0),
        # w-b the image (1): (.., -1, ..) < (.., 0, ..), w-b.
        (dict(environments={ENV}), dict(environments={IMAGE}), image_job(), "w-b"),
    ],
)
def test_an_image_job_prefers_a_worker_holding_the_image(a, b, job, winner):
    workers = [runs("w-a", **a), runs("w-b", **b)]
    result = place(make_snapshot([job], workers))
    assert [p.worker_id for p in result.placements] == [winner]


# --- through the core ---------------------------------------------------------------------------


def gpus(n: int, price: int = 300_000) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"u{i}", "RTX 3090", 24576, 350, price, measurement=healthy()) for i in range(n)
    )


def register(core: BrokerCore, worker_id: str, runtime: str = "", price: int = 300_000) -> None:
    version = "4.3.1" if runtime else ""
    core.handle(
        WorkerRegistered(0.0, worker_id, "f", "rig", "1", gpus(2, price), "", runtime, version)
    )


def test_core_places_an_image_job_on_the_podman_worker_and_the_assign_carries_the_image():
    core = BrokerCore(lease_ttl_s=1e9)
    register(core, "w-plain", price=100_000)
    register(core, "w-podman", "podman")
    spec = JobSpec(command=("/bin/script",), image=IMAGE)
    core.handle(JobSubmitted(0.0, "j1", "alice", spec))
    cmds = core.handle(SchedulePass(0.0))
    assert Assign("w-podman", "j1", 1, (0,), spec, 300_000) in cmds
    msg = assignment_pb(Assign("w-podman", "j1", 1, (0,), spec, 300_000))
    assert msg.spec.image == IMAGE and msg.spec.registry_auth == b""  # the shell adds it
    shown = worker_pb(core.worker("w-podman"))
    assert (shown.container_runtime.name, shown.container_runtime.version) == ("podman", "4.3.1")
    assert not worker_pb(core.worker("w-plain")).HasField("container_runtime")


def test_core_keeps_an_image_job_pending_with_the_reason_and_quote_agrees():
    core = BrokerCore(lease_ttl_s=1e9)
    for i in range(12):
        register(core, f"w-{i:02}")
    spec = JobSpec(command=("x",), image=IMAGE)
    core.handle(JobSubmitted(0.0, "j1", "alice", spec))
    core.handle(SchedulePass(0.0))
    (reason,) = core.job("j1").pending_reasons
    assert (reason.resource, reason.resolvable) == ("container_runtime", False)
    assert reason.message == "no worker runs containers: 0 of 12 have a container runtime"
    quote = core.quote(spec)
    assert quote.reasons == (reason,)
    assert (quote.matching_gpus, quote.placeable_now) == (0, False)
    assert core.quote(JobSpec(command=("x",))).matching_gpus == 24


def test_a_guaranteed_image_job_preempts_only_on_a_worker_that_runs_containers():
    core = BrokerCore(lease_ttl_s=1e9)
    register(core, "w-plain")
    register(core, "w-podman", "podman")
    spot = JobSpec(command=("s",), gpu_count=2, tier=Tier.SPOT)
    core.handle(JobSubmitted(0.0, "s1", "bob", spot))
    core.handle(JobSubmitted(0.0, "s2", "bob", spot))
    core.handle(SchedulePass(0.0))  # both workers full of spot work
    guaranteed = JobSpec(command=("g",), gpu_count=2, image=IMAGE)
    core.handle(JobSubmitted(1.0, "g1", "alice", guaranteed))
    cmds = core.handle(SchedulePass(1.0))
    assigns = [c for c in cmds if isinstance(c, Assign)]
    assert [(a.job_id, a.worker_id) for a in assigns] == [("g1", "w-podman")]
