"""Image jobs through a real broker (real gRPC, real SQLite), its CLI and SDK, with
protocol-speaking agents: validation, the container-runtime capability, the locality of
held images, and registry credentials that only the job's assignments ever carry."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from broker_harness import start_broker
from click.testing import CliRunner, Result
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus
from test_broker_api import status_of

from client.errors import InvalidArgument
from client.sdk import Client
from rigshift.v1 import farm_pb2, farm_service_pb2, farm_service_pb2_grpc, job_pb2
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2 as ws
from rigshift_cli import main

pytestmark = pytest.mark.timeout(60)

IMAGE = "127.0.0.1:5055/rs-test:1"
SECRET = "cnMtdXNlcjpzM2NyM3QtcGFzcw=="  # base64 of user:password, as podman login writes it
AUTH = json.dumps({"auths": {"127.0.0.1:5055": {"auth": SECRET}}}).encode()
PENDING = job_pb2.Job.PENDING


def podman_agent(address: str, token: str, hostname: str = "rig-podman") -> ProtocolAgent:
    """A protocol agent that registers with podman 4.3.1 as its container runtime."""
    agent = ProtocolAgent(address, token, gpus(2), hostname=hostname)
    resp = agent.stub.RegisterWorker(
        ws.RegisterWorkerRequest(
            enrollment_token=token,
            hostname=hostname,
            agent_version="test",
            gpus=agent.gpu_infos,
            container_runtime=farm_pb2.ContainerRuntime(name="podman", version="4.3.1"),
        )
    )
    agent.worker, agent.credential = resp.worker, resp.credential
    return agent


@pytest.fixture
def jobs(broker_address):
    with authed_channel(broker_address) as ch:
        yield jsg.JobServiceStub(ch)


def create(jobs, image: str = IMAGE, auth: bytes = b"", **spec) -> job_pb2.Job:
    spec.setdefault("command", ["/bin/script"])
    env = job_pb2.Environment(image=image)
    request = js.CreateJobRequest(
        spec=job_pb2.JobSpec(gpu_count=1, environment=env, **spec), registry_auth=auth
    )
    return jobs.CreateJob(request)


def test_bad_image_and_misplaced_registry_auth_are_field_violations(jobs):
    with pytest.raises(grpc.RpcError) as err:
        create(jobs, image="ghcr.io/Org/train")
    code, _, fields = status_of(err.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "path component 'Org'" in fields["spec.environment.image"]
    with pytest.raises(grpc.RpcError) as err:
        create(jobs, image="", auth=AUTH)
    code, _, fields = status_of(err.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == {"registry_auth": "is allowed only with spec.environment.image"}
    with pytest.raises(grpc.RpcError) as err:
        create(jobs, auth=b'{"auth": "' + SECRET.encode() + b'"}')
    code, _, fields = status_of(err.value)
    assert set(fields) == {"registry_auth"} and SECRET not in str(err.value.details())


def test_registry_auth_reaches_only_the_assignment(running_broker, jobs, tmp_path):
    address = running_broker.address
    farm = create_farm(address)
    plain = ProtocolAgent(address, farm.enrollment_token, gpus(2), hostname="rig-plain")
    plain.register()
    agent = podman_agent(address, farm.enrollment_token)
    agent.connect()
    assert list(agent.next_of("reconcile").assignments) == []
    job = create(jobs, auth=AUTH)
    assert job.spec.environment.image == IMAGE

    assignment = agent.next_of("assignment")
    assert assignment.job == job.name
    assert (assignment.spec.image, assignment.spec.registry_auth) == (IMAGE, AUTH)
    # A new stream starts with a Reconcile that repeats it, credentials included.
    agent.close()
    again = podman_agent(address, farm.enrollment_token)
    again.worker, again.credential = agent.worker, agent.credential
    again.connect()
    (repeated,) = again.next_of("reconcile").assignments
    assert repeated.spec.registry_auth == AUTH

    # Nothing a client reads, and nothing the broker stores, holds it.
    shown = [
        jobs.GetJob(js.GetJobRequest(name=job.name)),
        jobs.ListJobs(js.ListJobsRequest()),
        job,
    ]
    for message in shown:
        assert SECRET.encode() not in message.SerializeToString()
    databases = [p for p in (tmp_path / "broker").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".db") for p in databases)
    for path in databases:
        assert SECRET.encode() not in path.read_bytes(), path

    # Once the job ends, the broker forgets the credentials.
    again.start(job.name, 1)
    again.finish(job.name, 1)
    service = running_broker.broker.service
    assert service is not None
    running_broker.scheduled()
    assert job.name.split("/")[1] not in service._registry_auth
    again.close()
    plain.close()


def test_list_workers_shows_the_runtime_and_held_images_win_the_placement(running_broker, jobs):
    address = running_broker.address
    farm = create_farm(address)
    one = podman_agent(address, farm.enrollment_token, hostname="rig-1")
    two = podman_agent(address, farm.enrollment_token, hostname="rig-2")
    # The warm rig is the one with the larger id: without locality the other would win.
    cold, warm = sorted([one, two], key=lambda a: a.worker)
    warm.stub.Heartbeat(
        ws.HeartbeatRequest(
            worker=warm.worker,
            status=ws.WorkerStatus(images=[IMAGE, "127.0.0.1:5055/rs-test@sha256:" + "a" * 64]),
        ),
        metadata=warm.metadata,
    )
    with authed_channel(address) as ch:
        listed = farm_service_pb2_grpc.FarmServiceStub(ch).ListWorkers(
            farm_service_pb2.ListWorkersRequest()
        )
    runtimes = {
        w.hostname: (w.container_runtime.name, w.container_runtime.version) for w in listed.workers
    }
    assert runtimes == {"rig-1": ("podman", "4.3.1"), "rig-2": ("podman", "4.3.1")}
    job = create(jobs)
    running_broker.scheduled()
    placed = jobs.GetJob(js.GetJobRequest(name=job.name))
    assert placed.attempts[-1].worker == warm.worker  # same price, same fit; it holds the image
    cold.close()
    warm.close()


# --- the CLI and the SDK ------------------------------------------------------------------------


def rs(address: str, group: str, *args: str) -> Result:
    return CliRunner().invoke(main, [group, "--broker", address, *args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def test_an_image_job_on_a_fleet_without_podman_stays_pending_with_the_reason(
    running_broker, tmp_path: Path
):
    address = running_broker.address
    farm = create_farm(address)
    agents = []
    for i in range(3):
        agent = ProtocolAgent(address, farm.enrollment_token, gpus(2), hostname=f"rig-{i}")
        agent.register()
        agents.append(agent)
    auth = tmp_path / "auth.json"
    auth.write_bytes(AUTH)
    submitted = json.loads(
        ok(
            rs(
                address,
                "job",
                "submit",
                "--json",
                "--image",
                IMAGE,
                "--registry-auth",
                str(auth),
                "--",
                "/bin/script",
            )
        ).stdout
    )
    assert SECRET not in json.dumps(submitted)
    running_broker.scheduled()
    client = Client(address)
    job = client.get_job(submitted["name"])
    assert job.state == PENDING
    (reason,) = job.pending_reasons
    assert (reason.resource, reason.resolvable) == ("container_runtime", False)
    assert reason.message == "no worker runs containers: 0 of 3 have a container runtime"

    shown = ok(rs(address, "job", "get", submitted["name"].split("/")[1])).stdout
    assert IMAGE in shown and "no worker runs containers" in shown
    quote = ok(rs(address, "job", "quote", "--image", IMAGE)).stdout
    assert "placeable now: no" in quote and "no worker runs containers" in quote
    assert client.quote_job(image=IMAGE).reasons[0].resource == "container_runtime"

    table = ok(rs(address, "farm", "workers")).stdout.splitlines()
    assert "RUNTIME" in table[0]
    podman_agent(address, farm.enrollment_token, hostname="rig-podman").close()
    table = ok(rs(address, "farm", "workers")).stdout
    assert "podman 4.3.1" in table
    listed = json.loads(ok(rs(address, "farm", "workers", "--json")).stdout)
    assert {"name": "podman", "version": "4.3.1"} in [
        w.get("container_runtime") for w in listed["workers"]
    ]
    for agent in agents:
        agent.close()


def test_cli_and_sdk_refuse_bad_image_input_before_or_at_the_broker(broker_address, tmp_path):
    result = rs(broker_address, "job", "submit", "--registry-auth", __file__, "--", "x")
    assert result.exit_code == 2 and "--registry-auth needs --image" in result.output
    result = rs(broker_address, "job", "submit", "--image", "Bad:Ref", "--", "x")
    assert result.exit_code == 1 and "spec.environment.image" in result.output
    client = Client(broker_address)
    with pytest.raises(InvalidArgument) as err:
        client.create_job(["x"], image=IMAGE, registry_auth=tmp_path / "missing.json")
    assert err.value.reason == "BAD_REGISTRY_AUTH_FILE"
    job = client.create_job(["x"], image=IMAGE, registry_auth=AUTH)
    assert job.spec.environment.image == IMAGE and job.state == PENDING


def test_a_restart_keeps_the_image_and_the_runtime_but_not_the_credentials(tmp_path: Path):
    home = tmp_path / "b"
    rb = start_broker(home)
    farm = create_farm(rb.address)
    agent = podman_agent(rb.address, farm.enrollment_token)
    agent.connect()
    with authed_channel(rb.address) as ch:
        job = create(jsg.JobServiceStub(ch), auth=AUTH)
    assert agent.next_of("assignment").spec.registry_auth == AUTH
    agent.close()
    rb.stop()

    rb2 = start_broker(home)
    try:
        with authed_channel(rb2.address) as ch:
            got = jsg.JobServiceStub(ch).GetJob(js.GetJobRequest(name=job.name))
            assert got.spec.environment.image == IMAGE
            (worker,) = (
                farm_service_pb2_grpc.FarmServiceStub(ch)
                .ListWorkers(farm_service_pb2.ListWorkersRequest())
                .workers
            )
            assert (worker.container_runtime.name, worker.container_runtime.version) == (
                "podman",
                "4.3.1",
            )
        back = ProtocolAgent(rb2.address, farm.enrollment_token, gpus(2))
        back.worker, back.credential = agent.worker, agent.credential
        back.heartbeat()
        back.connect()
        (assignment,) = back.next_of("reconcile").assignments
        # The credentials lived in the old process's memory only (the agent's pull fails,
        # naming the reason, if it still needs them).
        assert (assignment.spec.image, assignment.spec.registry_auth) == (IMAGE, b"")
        back.close()
    finally:
        rb2.stop()
