"""Inputs, outputs and resumable uploads over real gRPC with real SQLite.

One broker (small limits) with farm one and its worker rig-1 (one RTX 3090), clients
alice and bob, an operator of farm one and the admin. Alice's job ``done`` ran twice on
rig-1 (a ProtocolAgent): attempt 1 reported an output over the limit and was lost when
the agent registered again; attempt 2 uploaded its output (purpose OUTPUT, as rig-1)
and reported it with the agent's ``output`` event, then succeeded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import tarfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from broker_harness import start_broker
from click.testing import CliRunner
from protocol_agent import ProtocolAgent, authed_channel, gpus

from client.errors import InvalidArgument, from_rpc_error
from client.sdk import Client
from rigshift.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    farm_pb2,
    farm_service_pb2,
    farm_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)
from rigshift.v1 import worker_service_pb2 as ws
from rigshift_cli import main

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
art = artifact_service_pb2
js = job_service_pb2


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A tar.gz holding ``files`` (name -> content)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def chunks(data: bytes, *, offset: int = 0, purpose: int = 0, size: int | None = None):
    """UploadArtifactRequests sending ``data[offset:]``."""
    sha = hashlib.sha256(data).hexdigest()
    first = True
    for pos in range(offset, max(len(data), offset + 1), MiB):
        if first:
            yield art.UploadArtifactRequest(
                sha256=sha,
                size_bytes=len(data) if size is None else size,
                offset=offset,
                purpose=purpose,
                data=data[pos : pos + MiB],
            )
            first = False
        else:
            yield art.UploadArtifactRequest(data=data[pos : pos + MiB])


def code(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__next__"):
            next(result, None)
        return OK
    except grpc.RpcError as err:
        return err.code()


class World:
    """See the module docstring."""

    def __init__(self, rb) -> None:
        self.rb = rb
        self.admin = rb.admin_key
        admin = self.stubs(self.admin)
        self.farm = admin["farm"].CreateFarm(
            farm_service_pb2.CreateFarmRequest(farm=farm_pb2.Farm(display_name="one"))
        )

        def key(role, principal, farm=""):
            request = admin_service_pb2.CreateApiKeyRequest(
                role=role, principal=principal, farm=farm
            )
            return admin["admin"].CreateApiKey(request).key

        self.alice = key(admin_service_pb2.ApiKey.CLIENT, "alice")
        self.bob = key(admin_service_pb2.ApiKey.CLIENT, "bob")
        self.op = key(admin_service_pb2.ApiKey.OPERATOR, "op", self.farm.name)
        self.agent = ProtocolAgent(rb.address, self.farm.enrollment_token, gpus(1), "rig-1")
        self.agent.register()
        self.agent.connect()
        alice = self.stubs(self.alice)
        self.waiting = alice["job"].CreateJob(
            js.CreateJobRequest(
                spec=job_pb2.JobSpec(gpu_count=1, command=["x"], gpu_model="none-such")
            )
        )
        self.done = alice["job"].CreateJob(
            js.CreateJobRequest(
                spec=job_pb2.JobSpec(gpu_count=1, command=["train"], gpu_model="RTX 3090")
            )
        )
        name = self.done.name
        first = next_assignment(self.agent)
        assert (first.job, first.attempt) == (name, 1)
        self.agent.start(name, 1)
        over = ws.OutputUploaded(size_bytes=5 * MiB, over_limit=True, message="5 MiB > 2 MiB")
        self.agent.report(self.agent.event(name, 1, output=over))
        worker = self.agent.worker
        self.agent.close()  # a new agent process: attempt 1 is LOST, the job requeued
        self.agent = ProtocolAgent(rb.address, self.farm.enrollment_token, gpus(1), "rig-1")
        self.agent.register(worker=worker)
        self.agent.connect()
        second = next_assignment(self.agent)
        assert (second.job, second.attempt) == (name, 2)
        self.agent.start(name, 2)
        self.output = tar_gz({"model.txt": b"weights " * 1000, "metrics.json": b"{}"})
        self.output_sha = hashlib.sha256(self.output).hexdigest()
        self.stubs(self.agent.credential)["artifact"].UploadArtifact(
            chunks(self.output, purpose=art.OUTPUT)
        )
        kept = ws.OutputUploaded(sha256=self.output_sha, size_bytes=len(self.output))
        self.agent.report(self.agent.event(name, 2, output=kept))
        self.agent.finish(name, 2)
        self.callers = {
            "nobody": None,
            "alice": self.alice,
            "bob": self.bob,
            "op": self.op,
            "admin": self.admin,
            "rig-1": self.agent.credential,
        }

    def stubs(self, key):
        ch = authed_channel(self.rb.address, key) if key else grpc.insecure_channel(self.rb.address)
        return {
            "job": job_service_pb2_grpc.JobServiceStub(ch),
            "farm": farm_service_pb2_grpc.FarmServiceStub(ch),
            "artifact": artifact_service_pb2_grpc.ArtifactServiceStub(ch),
            "admin": admin_service_pb2_grpc.AdminServiceStub(ch),
        }


def next_assignment(agent: ProtocolAgent) -> ws.Assignment:
    """The next attempt given to the agent, whether pushed or in a Reconcile."""
    while True:
        instruction = agent.next_instruction()
        kind = instruction.WhichOneof("kind")
        if kind == "assignment":
            return instruction.assignment
        if kind == "reconcile" and instruction.reconcile.assignments:
            return instruction.reconcile.assignments[-1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rb = start_broker(
        tmp_path_factory.mktemp("io"),
        max_input_bytes=4 * MiB,
        max_output_bytes=2 * MiB,
        artifact_retention_days=0,  # the retention tests collect on their own
    )
    w = World(rb)
    yield w
    w.agent.close()
    rb.stop()


# -- authorisation -------------------------------------------------------------------

CALLERS = ("nobody", "alice", "bob", "op", "admin", "rig-1")
#                     nobody  alice   bob     op      admin   rig-1
MATRIX = {
    "ListJobOutputs": (UNAUTH, OK, DENIED, DENIED, OK, DENIED),
    "DownloadJobOutput": (UNAUTH, OK, DENIED, DENIED, OK, DENIED),
    "GetUploadStatus": (UNAUTH, OK, OK, DENIED, OK, OK),
    "UploadArtifact(OUTPUT)": (UNAUTH, DENIED, DENIED, DENIED, DENIED, OK),
    "DownloadArtifact(alice's output)": (UNAUTH, DENIED, DENIED, DENIED, OK, DENIED),
}


def _calls(w: World):
    job = w.done.name
    return {
        "ListJobOutputs": lambda s: s["job"].ListJobOutputs(js.ListJobOutputsRequest(name=job)),
        "DownloadJobOutput": lambda s: s["job"].DownloadJobOutput(
            js.DownloadJobOutputRequest(name=job)
        ),
        "GetUploadStatus": lambda s: s["artifact"].GetUploadStatus(
            art.GetUploadStatusRequest(sha256=w.output_sha)
        ),
        "UploadArtifact(OUTPUT)": lambda s: s["artifact"].UploadArtifact(
            chunks(os.urandom(100), purpose=art.OUTPUT)
        ),
        "DownloadArtifact(alice's output)": lambda s: s["artifact"].DownloadArtifact(
            art.DownloadArtifactRequest(sha256=w.output_sha)
        ),
    }


@pytest.mark.parametrize("method", sorted(MATRIX))
def test_authorisation_cells(world: World, method: str) -> None:
    call = _calls(world)[method]
    got = {c: code(lambda c=c: call(world.stubs(world.callers[c]))) for c in CALLERS}
    assert got == dict(zip(CALLERS, MATRIX[method], strict=True))


def test_naming_another_clients_output_as_input_does_not_make_it_readable(world: World) -> None:
    bob = world.stubs(world.bob)
    spec = job_pb2.JobSpec(
        gpu_count=1, command=["x"], gpu_model="none-such", inputs={"x": world.output_sha}
    )
    bob["job"].CreateJob(js.CreateJobRequest(spec=spec))
    with pytest.raises(grpc.RpcError) as exc:
        next(bob["artifact"].DownloadArtifact(art.DownloadArtifactRequest(sha256=world.output_sha)))
    assert exc.value.code() == DENIED
    assert from_rpc_error(exc.value).reason == "NOT_YOUR_ARTIFACT"


def test_a_worker_reads_the_inputs_of_its_live_attempt_only(world: World) -> None:
    alice = world.stubs(world.alice)
    data = tar_gz({"rows.csv": b"1,2\n"})
    sha = hashlib.sha256(data).hexdigest()
    alice["artifact"].UploadArtifact(chunks(data, purpose=art.INPUT))
    job = alice["job"].CreateJob(
        js.CreateJobRequest(
            spec=job_pb2.JobSpec(
                gpu_count=1, command=["x"], gpu_model="RTX 3090", inputs={"rows": sha}
            )
        )
    )
    assert next_assignment(world.agent).job == job.name
    rig = world.stubs(world.agent.credential)["artifact"]
    got = b"".join(c.data for c in rig.DownloadArtifact(art.DownloadArtifactRequest(sha256=sha)))
    assert got == data
    # ...and alice may read what her job refers to.
    got = alice["artifact"].DownloadArtifact(art.DownloadArtifactRequest(sha256=sha))
    assert b"".join(c.data for c in got) == data
    world.agent.start(job.name, 1)
    world.agent.finish(job.name, 1)
    assert code(lambda: rig.DownloadArtifact(art.DownloadArtifactRequest(sha256=sha))) == DENIED


# -- ListJobOutputs / DownloadJobOutput -------------------------------------------------


def test_list_outputs_one_per_reporting_attempt_oldest_first(world: World) -> None:
    outputs = (
        world.stubs(world.alice)["job"]
        .ListJobOutputs(js.ListJobOutputsRequest(name=world.done.name))
        .outputs
    )
    assert [(o.attempt, o.sha256, o.size_bytes, o.over_limit) for o in outputs] == [
        (1, "", 5 * MiB, True),
        (2, world.output_sha, len(world.output), False),
    ]
    assert outputs[0].message == "5 MiB > 2 MiB"
    assert all(o.create_time.seconds > 0 for o in outputs)


def test_download_latest_output_and_resume_at_an_offset(world: World) -> None:
    jobs = world.stubs(world.admin)["job"]
    stream = list(jobs.DownloadJobOutput(js.DownloadJobOutputRequest(name=world.done.name)))
    first = stream[0]
    assert (first.sha256, first.size_bytes, first.attempt) == (
        world.output_sha,
        len(world.output),
        2,
    )
    assert b"".join(c.data for c in stream) == world.output
    tail = jobs.DownloadJobOutput(
        js.DownloadJobOutputRequest(name=world.done.name, attempt=2, offset=100)
    )
    assert b"".join(c.data for c in tail) == world.output[100:]
    end = list(
        jobs.DownloadJobOutput(
            js.DownloadJobOutputRequest(name=world.done.name, offset=len(world.output))
        )
    )
    assert [(c.sha256, c.data) for c in end] == [(world.output_sha, b"")]


@pytest.mark.parametrize(
    ("job", "attempt", "status", "reason"),
    [
        ("done", 1, grpc.StatusCode.FAILED_PRECONDITION, "OUTPUT_OVER_LIMIT"),
        ("done", 7, grpc.StatusCode.NOT_FOUND, "NO_OUTPUT"),
        ("waiting", 0, grpc.StatusCode.NOT_FOUND, "NO_OUTPUT"),
    ],
)
def test_download_output_errors(world: World, job, attempt, status, reason) -> None:
    name = getattr(world, job).name
    jobs = world.stubs(world.alice)["job"]
    with pytest.raises(grpc.RpcError) as exc:
        list(jobs.DownloadJobOutput(js.DownloadJobOutputRequest(name=name, attempt=attempt)))
    err = from_rpc_error(exc.value)
    assert (exc.value.code(), err.reason) == (status, reason)
    if reason == "OUTPUT_OVER_LIMIT":
        assert "5 MiB > 2 MiB" in err.message


def test_sdk_lists_and_downloads_outputs(world: World, tmp_path: Path) -> None:
    with Client(world.rb.address, api_key=world.alice) as rs:
        assert [o.attempt for o in rs.list_outputs(world.done.name)] == [1, 2]
        seen = []
        dest = rs.download_outputs(
            world.done.name, tmp_path / "out", progress=lambda *a: seen.append(a)
        )
        assert sorted(p.name for p in dest.iterdir()) == ["metrics.json", "model.txt"]
        assert (dest / "model.txt").read_bytes() == b"weights " * 1000
        assert seen[0] == (0, len(world.output)) and seen[-1] == (len(world.output),) * 2
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "keep.txt").write_text("mine")
        with pytest.raises(InvalidArgument) as exc:
            rs.download_outputs(world.done.name, tmp_path / "full")
        assert exc.value.reason == "DOWNLOAD_DIR_NOT_EMPTY"
        assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "out"]  # no leftovers


# -- resumable, purpose-limited uploads ---------------------------------------------------


def _status(stub, sha: str) -> art.UploadStatus:
    return stub.GetUploadStatus(art.GetUploadStatusRequest(sha256=sha))


def _upload_error(stub, requests):
    """The SDK error an upload ends with, or None when it succeeds."""
    try:
        stub.UploadArtifact(requests)
    except grpc.RpcError as err:
        return from_rpc_error(err)
    return None


def test_an_interrupted_upload_resumes_where_the_broker_stopped(world: World) -> None:
    stub = world.stubs(world.alice)["artifact"]
    data = os.urandom(3 * MiB + 123)
    sha = hashlib.sha256(data).hexdigest()
    sent_two, release = threading.Event(), threading.Event()

    def two_chunks_then_hang():
        for i, request in enumerate(chunks(data, purpose=art.INPUT)):
            if i == 2:
                sent_two.set()
                release.wait(10)
                return
            yield request

    call = stub.UploadArtifact.future(two_chunks_then_hang())
    assert sent_two.wait(10)
    deadline = time.monotonic() + 10
    while _status(stub, sha).received_bytes < 2 * MiB and time.monotonic() < deadline:
        time.sleep(0.02)
    call.cancel()
    release.set()
    status = _status(stub, sha)
    assert not status.complete and status.received_bytes == 2 * MiB
    deadline = time.monotonic() + 10
    while True:  # a wrong offset, once the broker has noticed the cancellation
        err = _upload_error(stub, chunks(data, offset=MiB, purpose=art.INPUT))
        assert err is not None and err.reason in ("UPLOAD_IN_PROGRESS", "UPLOAD_OFFSET_MISMATCH")
        if err.reason == "UPLOAD_OFFSET_MISMATCH" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.metadata["received_bytes"] == str(2 * MiB)

    done = stub.UploadArtifact(chunks(data, offset=2 * MiB, purpose=art.INPUT))
    assert (done.sha256, done.size_bytes) == (sha, len(data))
    assert _status(stub, sha).complete
    stored = world.rb.broker.artifacts.path(sha).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == sha


def test_sdk_upload_resumes_from_the_broker_count_and_skips_a_stored_archive(
    world: World,
) -> None:
    stub = world.stubs(world.bob)["artifact"]
    data = os.urandom(2 * MiB + 5)
    sha = hashlib.sha256(data).hexdigest()
    halfway = list(chunks(data, purpose=art.INPUT))[:1]
    with pytest.raises(grpc.RpcError):  # the stream ends short: kept for a resume
        stub.UploadArtifact(iter(halfway))
    assert _status(stub, sha).received_bytes == MiB
    with Client(world.rb.address, api_key=world.bob) as rs:
        seen: list[tuple[int, int]] = []
        assert rs.upload_archive(data, purpose=art.INPUT, progress=lambda *a: seen.append(a)) == sha
        assert seen[0] == (MiB, len(data)) and seen[-1] == (len(data), len(data))
        again: list[tuple[int, int]] = []
        assert (
            rs.upload_archive(data, purpose=art.INPUT, progress=lambda *a: again.append(a)) == sha
        )
        assert again == [(len(data), len(data))]  # already stored: nothing sent


@pytest.mark.parametrize(
    ("purpose", "size", "limit"),
    [
        (art.INPUT, 4 * MiB + 1, 4 * MiB),
        (art.ARTIFACT_PURPOSE_UNSPECIFIED, (100 << 20) + 1, 100 << 20),
    ],
)
def test_uploads_over_their_purposes_limit_are_resource_exhausted(
    world: World, purpose, size, limit
) -> None:
    stub = world.stubs(world.alice)["artifact"]
    with pytest.raises(grpc.RpcError) as exc:
        stub.UploadArtifact(chunks(b"x" * 10, purpose=purpose, size=size))
    err = from_rpc_error(exc.value)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (err.reason, err.metadata["limit_bytes"]) == ("ARTIFACT_TOO_LARGE", str(limit))


def test_an_output_over_the_output_limit_is_refused(world: World) -> None:
    rig = world.stubs(world.agent.credential)["artifact"]
    with pytest.raises(grpc.RpcError) as exc:
        rig.UploadArtifact(chunks(b"x", purpose=art.OUTPUT, size=2 * MiB + 1))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert world.rb.broker.artifacts.limit_for(art.OUTPUT) == 2 * MiB


class CuttingProxy:
    """A TCP proxy to the broker that drops its first connection after ``cut_after``
    bytes from the client, as a flaky network would."""

    def __init__(self, target: str, cut_after: int) -> None:
        self.target = target.rsplit(":", 1)
        self.cut_after = cut_after
        self.cuts = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        first = True
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            limit = self.cut_after if first else None
            first = False
            threading.Thread(target=self._pipe, args=(client, upstream, limit), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        moved = 0
        try:
            while data := src.recv(65536):
                moved += len(data)
                if limit is not None and moved > limit:
                    self.cuts += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.server.close()


def test_sdk_upload_survives_a_dropped_connection(world: World) -> None:
    proxy = CuttingProxy(world.rb.address, cut_after=int(2.5 * MiB))
    data = os.urandom(4 * MiB - 100)
    streams: list[int] = []  # where each UploadArtifact stream started

    def progress(done: int, total: int) -> None:
        # Within one stream each call moves forward by a chunk; a stream's first call repeats
        # its start offset, which can equal the last count when the cut dropped no data bytes.
        if not streams or done <= last[0]:
            streams.append(done)
        last[0] = done

    last = [0]
    try:
        with Client(proxy.address, api_key=world.alice) as rs:
            sha = rs.upload_archive(data, purpose=art.INPUT, progress=progress)
    finally:
        proxy.close()
    assert proxy.cuts == 1 and len(streams) == 2
    assert hashlib.sha256(world.rb.broker.artifacts.path(sha).read_bytes()).hexdigest() == sha


# -- CLI -------------------------------------------------------------------------------


def rs_cli(world: World, *args: str, key: str | None = None):
    env = {"RIGSHIFT_API_KEY": key or world.alice}
    return CliRunner().invoke(main, ["job", "--broker", world.rb.address, *args], env=env)


def test_cli_outputs_json_and_table(world: World) -> None:
    result = rs_cli(world, "outputs", world.done.name, "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [sorted(o) for o in listed] == [
        ["attempt", "create_time", "message", "over_limit", "sha256", "size_bytes"]
    ] * 2
    assert [(o["attempt"], o["sha256"], o["size_bytes"], o["over_limit"]) for o in listed] == [
        (1, "", 5 * MiB, True),
        (2, world.output_sha, len(world.output), False),
    ]
    assert listed[1]["create_time"].endswith("Z")
    table = rs_cli(world, "outputs", world.done.name.removeprefix("jobs/"))
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ATTEMPT", "SIZE", "SHA256", "CREATED", "NOTE"]
    assert "over limit, not kept: 5 MiB > 2 MiB" in lines[1]
    assert world.output_sha[:12] in lines[2]
    bob = rs_cli(world, "outputs", world.done.name, key=world.bob)
    assert bob.exit_code == 1 and "PERMISSION_DENIED" in bob.stderr


def test_cli_outputs_download(world: World, tmp_path: Path) -> None:
    dest = tmp_path / "results"
    result = rs_cli(world, "outputs", world.done.name, "--download", str(dest))
    assert result.exit_code == 0, result.output
    assert (dest / "model.txt").read_bytes() == b"weights " * 1000
    assert f"into {dest}" in result.stdout
    refused = rs_cli(world, "outputs", world.done.name, "--download", str(dest))
    assert refused.exit_code == 1
    assert "exists and is not an empty directory" in refused.stderr
    a1 = str(tmp_path / "a1")
    over = rs_cli(world, "outputs", world.done.name, "--download", a1, "--attempt", "1")
    assert over.exit_code == 1
    assert "FAILED_PRECONDITION: 5 MiB > 2 MiB" in over.stderr
    assert not (tmp_path / "a1").exists()


def test_cli_submit_with_file_and_directory_inputs(world: World, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("1,2\n")
    (tmp_path / "tokenizer.json").write_text("{}")
    result = rs_cli(
        world,
        "submit",
        "--json",
        "--gpu-model",
        "none-such",
        "--input",
        f"data={tmp_path / 'data'}",
        "--input",
        f"tok={tmp_path / 'tokenizer.json'}",
        "--",
        "python",
        "train.py",
    )
    assert result.exit_code == 0, result.output
    inputs = json.loads(result.stdout)["spec"]["inputs"]
    assert sorted(inputs) == ["data", "tok"]
    assert "uploaded input tok" in result.stderr
    alice = world.stubs(world.alice)["artifact"]
    for name, member in (("data", "a.csv"), ("tok", "tokenizer.json")):
        got = alice.DownloadArtifact(art.DownloadArtifactRequest(sha256=inputs[name]))
        with tarfile.open(fileobj=io.BytesIO(b"".join(c.data for c in got))) as tar:
            assert tar.getnames() == [member]
    bad = rs_cli(world, "submit", "--input", "../x=/tmp", "--", "true")
    assert bad.exit_code == 2 and "input name" in bad.stderr
