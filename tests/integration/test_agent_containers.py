"""Image jobs on a real podman, against the scripted broker of ``scripted_broker``: the
agent pulls from a real loopback registry (Debian's ``docker-registry``) in PREPARING,
runs the job in its image with its directories mounted, reports the image in its
heartbeat, classifies failed pulls, removes containers, evicts images past its cache.

podman is configured through its own files only (``CONTAINERS_CONF``,
``CONTAINERS_REGISTRIES_CONF``, ``CONTAINERS_STORAGE_CONF`` with a storage of this test
module's own), which the agent passes on from its environment. Skipped where podman,
runc, docker-registry or busybox are missing; in CI (``CI`` set) that fails instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from scripted_broker import FakeBroker, run_session, until
from test_agent_environments import write_wheel

from harness.agent_fixtures import make_assignment
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.agent import Agent
from worker_agent.config import ContainersConfig

pytestmark = pytest.mark.timeout(180)

TOOLS = ("podman", "runc", "docker-registry", "busybox")

HELLO = """#!/bin/sh
echo "hello from the image, in $(pwd)"
echo made-in-image > "$RIGSHIFT_OUTPUT_DIR/result.txt"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Podman:
    """The test's podman setup: its environment, registry address, and pushed images."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.registry = f"127.0.0.1:{self.port}"
        (root / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        )
        (root / "registries.conf").write_text(
            f'[[registry]]\nlocation = "{self.registry}"\ninsecure = true\n'
        )
        (root / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/storage"\nrunroot = "{root}/run"\n'
        )
        self.env = {
            "CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def push(self, name: str, extra: str = "") -> str:
        """Build an image holding busybox and /bin/hello, push it, drop it locally."""
        rootfs = self.root / f"rootfs-{name.replace(':', '-')}"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy(shutil.which("busybox") or "", rootfs / "bin" / "busybox")
        (rootfs / "bin" / "sh").symlink_to("busybox")
        (rootfs / "bin" / "hello").write_text(HELLO)
        (rootfs / "bin" / "hello").chmod(0o755)
        (rootfs / "extra").write_text(extra or name)
        tar = self.root / f"{rootfs.name}.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
        ref = f"{self.registry}/{name}"
        self.run("import", "-q", str(tar), ref)
        self.run("push", "-q", ref)
        self.run("rmi", "-f", ref)
        return ref

    def containers(self) -> list[str]:
        return self.run("ps", "-a", "--format", "{{.Names}}").stdout.split()


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} not installed (`.ci/run` installs them)")
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install {' '.join(TOOLS)})")
    root = tmp_path_factory.mktemp("podman")
    pm = Podman(root)
    (root / "reg.yml").write_text(
        "version: 0.1\n"
        f"storage: {{filesystem: {{rootdirectory: {root}/registry}}}}\n"
        f"http: {{addr: {pm.registry}}}\n"
    )
    registry = subprocess.Popen(
        ["docker-registry", "serve", str(root / "reg.yml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{pm.registry}/v2/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or registry.poll() is not None:
                    raise
                time.sleep(0.1)
        yield pm
    finally:
        registry.terminate()
        registry.wait(timeout=10)
        subprocess.run(
            ["podman", "system", "reset", "--force"],
            env={**os.environ, **pm.env},
            capture_output=True,
            check=False,
            timeout=120,
        )


@pytest.fixture
def env(podman: Podman, monkeypatch: pytest.MonkeyPatch) -> Podman:
    for key, value in podman.env.items():
        monkeypatch.setenv(key, value)
    return podman


def _image_job(job: str, image: str, command: list[str], **kw: object) -> ws.Assignment:
    a = make_assignment(job, command=command, **kw)  # type: ignore[arg-type]
    a.spec.image = image
    return a


def test_an_image_job_runs_in_its_image_and_the_second_pulls_nothing(
    env: Podman, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = env.push("hello:1")
    statuses: list[ws.WorkerStatus] = []
    heartbeat = FakeBroker.Heartbeat

    async def record(self, request, context):  # type: ignore[no-untyped-def]
        if request.HasField("status"):
            statuses.append(request.status)
        return await heartbeat(self, request, context)

    monkeypatch.setattr(FakeBroker, "Heartbeat", record)
    state = tmp_path / "agent"
    # Only the mount points of the job's own directories exist under the state directory
    # inside the container: not its identity, its fence file, nor the image cache.
    peek = (
        f"echo state holds: $(ls {state}); "
        f"cat {state}/identity.json >/dev/null 2>&1 && echo IDENTITY-READ || echo no-identity"
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(
            assignment=_image_job(
                "jobs/c1", ref, ["/bin/hello"], max_output_bytes=1 << 20, env={"EPOCHS": "3"}
            )
        )
        await until(lambda: fake.finished("jobs/c1"), 60, "the first image job")
        fake.push(assignment=_image_job("jobs/c2", ref, ["/bin/sh", "-c", peek], gpus=[1]))
        await until(lambda: fake.finished("jobs/c2"), 60, "the second image job")
        # The status rides on a renewal: a Session message (or a Heartbeat call).
        await until(
            lambda: (
                any(r.status.images for r in fake.session_requests)
                or any(s.images for s in statuses)
            ),
            10,
            "the images in a heartbeat",
        )

    fake = run_session(tmp_path, body)
    first, second = fake.output("jobs/c1"), fake.output("jobs/c2")
    assert fake.finished("jobs/c1").exit_code == 0, first
    assert fake.registrations[0].container_runtime.name == "podman"
    assert fake.registrations[0].container_runtime.version
    assert f"pulling image {ref}" in first and "hello from the image" in first
    assert f"in {state}" in first  # the working directory at the same path as on the rig
    started = next(e for e in fake.applied[("jobs/c1", 1)] if e.HasField("started"))
    assert started.started.setup_milliseconds > 0
    out = next(e.output for e in fake.applied[("jobs/c1", 1)] if e.HasField("output"))
    assert out.sha256 in fake.artifacts  # written inside the container, uploaded after
    # The second job pulled nothing, and saw nothing of the agent's state directory.
    assert fake.finished("jobs/c2").exit_code == 0, second
    assert "pulling image" not in second and f"image {ref} held on this rig" in second
    assert "no-identity" in second and "IDENTITY-READ" not in second
    holds = next(line for line in second.splitlines() if line.startswith("state holds:"))
    assert "identity" not in holds and "containers" not in holds and "lease" not in holds
    assert (state / "identity.json").exists()  # it is there, on the rig
    sent = [r.status for r in fake.session_requests] + statuses
    images = [s.images for s in sent if s.images][-1]
    assert images[0] == ref and images[1].startswith(f"{env.registry}/hello@sha256:")
    assert not [c for c in env.containers() if c.startswith("rigshift-")]


def test_registry_auth_goes_to_the_pull_only(env: Podman, tmp_path: Path) -> None:
    ref = env.push("auth:1")
    secret = b'{"auths": {"%s": {"auth": "dXNlcjpzM2NyM3QtcGFzcw=="}}}' % env.registry.encode()

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = _image_job("jobs/a", ref, ["/bin/sh", "-c", "env; ls -a /"])
        a.spec.registry_auth = secret
        fake.push(assignment=a)
        await until(lambda: fake.finished("jobs/a"), 60, "the image job")

    fake = run_session(tmp_path, body)
    assert fake.finished("jobs/a").exit_code == 0, fake.output("jobs/a")
    assert b"dXNlcjpzM2NyM3QtcGFzcw" not in fake.output("jobs/a").encode()
    containers = tmp_path / "agent" / "containers"
    assert not list(containers.glob("auth-*"))  # deleted right after the pull
    assert containers.stat().st_mode & 0o777 == 0o700


def test_a_missing_image_fails_the_job_naming_it(env: Podman, tmp_path: Path) -> None:
    env.push("present:1")
    ref = f"{env.registry}/present:does-not-exist"

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=_image_job("jobs/m", ref, ["/bin/hello"]))
        await until(lambda: fake.finished("jobs/m"), 60, "the failed pull")

    fake = run_session(tmp_path, body)
    finished = fake.finished("jobs/m")
    assert finished.cause == ws.Finished.SETUP_CLIENT, finished
    assert f"image {ref} not found" in finished.message
    assert "started" not in fake.kinds("jobs/m")


def test_an_unreachable_registry_is_the_rigs_fault(env: Podman, tmp_path: Path) -> None:
    ref = f"127.0.0.1:{_free_port()}/nothing:1"  # nothing listens there

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=_image_job("jobs/u", ref, ["/bin/hello"]))
        await until(lambda: fake.finished("jobs/u"), 60, "the failed pull")

    fake = run_session(tmp_path, body)
    finished = fake.finished("jobs/u")
    assert finished.cause == ws.Finished.SETUP_RIG, finished
    assert f"registry of image {ref} unreachable" in finished.message


def test_cancel_stops_and_removes_the_container(env: Podman, tmp_path: Path) -> None:
    ref = env.push("sleeper:1")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=_image_job("jobs/k", ref, ["/bin/sh", "-c", "echo UP-NOW; sleep 60"]))
        await until(lambda: "UP-NOW" in fake.output("jobs/k"), 60, "the container to run")
        assert "rigshift-k-1" in env.containers()
        fake.push(cancellation=ws.Cancellation(job="jobs/k", attempt=1, reason="by client"))
        await until(lambda: fake.finished("jobs/k"), 30, "the cancelled attempt to end")

    fake = run_session(tmp_path, body)
    assert "by client" in fake.finished("jobs/k").message
    assert "rigshift-k-1" not in env.containers()


def test_the_cache_evicts_the_least_recently_used_image_not_in_use(
    env: Podman, tmp_path: Path
) -> None:
    old, new = env.push("lru:1", "one"), env.push("lru:2", "two")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=_image_job("jobs/l1", old, ["/bin/hello"]))
        await until(lambda: fake.finished("jobs/l1"), 60, "the first job")
        fake.push(assignment=_image_job("jobs/l2", new, ["/bin/hello"]))
        await until(lambda: fake.finished("jobs/l2"), 60, "the second job")
        assert agent.runner is not None and agent.runner.images is not None
        # Over a 1-byte cache: the image in use stays, the older one goes.
        assert list(agent.runner.images.images) == [new]

    fake = run_session(tmp_path, body, containers=_tiny_cache())
    assert fake.finished("jobs/l1").exit_code == 0 and fake.finished("jobs/l2").exit_code == 0
    assert env.run("image", "exists", old, check=False).returncode != 0
    assert env.run("image", "exists", new, check=False).returncode == 0


def _tiny_cache() -> ContainersConfig:
    return ContainersConfig(max_cache_gb=1e-9)


def test_doctor_runs_a_trivial_container(env: Podman) -> None:
    from worker_agent.doctor.containers import check_containers

    finding = check_containers()  # the test's podman configuration, from the environment
    assert finding.status in ("PASS", "WARN"), finding  # WARN: under 20 GiB free for images
    assert "ran a trivial container" in finding.finding and env.root.name in finding.finding


def test_requirements_on_an_image_without_python3_are_the_clients(
    env: Podman, tmp_path: Path
) -> None:
    ref = env.push("nopython:1")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = _image_job("jobs/r", ref, ["/bin/hello"])
        a.spec.python_requirements, a.spec.requirements_sha256 = "six\n", "0" * 64
        fake.push(assignment=a)
        await until(lambda: fake.finished("jobs/r"), 60, "the failed setup")

    fake = run_session(tmp_path, body)
    finished = fake.finished("jobs/r")
    assert finished.cause == ws.Finished.SETUP_CLIENT, finished
    assert f"image {ref} has no python3 to install python_requirements into" in finished.message
    assert "hello from the image" not in fake.output("jobs/r")  # it never ran
    assert not [c for c in env.containers() if c.startswith("rigshift-")]  # the probe's gone


#: The host's Debian Python, copied into an image with what it links to (no pip, no
#: site-packages): an image whose python3 is not the agent's (``/usr/bin/python3.11``).
HOST_PYTHON = Path("/usr/bin/python3.11")
_SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data"}


def _push_python_image(pm: Podman, name: str) -> str:
    rootfs = pm.root / f"rootfs-{name.replace(':', '-')}"
    for tool in ("bin", "usr/bin", "tmp"):
        (rootfs / tool).mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "", rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    (rootfs / "usr/bin/env").symlink_to("/bin/busybox")  # console scripts' #!/usr/bin/env
    shutil.copy(HOST_PYTHON, rootfs / "usr/bin/python3.11")
    (rootfs / "usr/bin/python3").symlink_to("python3.11")
    ldd = subprocess.run(["ldd", str(HOST_PYTHON)], capture_output=True, text=True, check=True)
    for lib in re.findall(r"(/\S+\.so[.\d]*)", ldd.stdout):
        real = Path(lib)
        (rootfs / real.parent.relative_to("/")).mkdir(parents=True, exist_ok=True)
        shutil.copy(real.resolve(), rootfs / real.relative_to("/"))
    stdlib = Path("/usr/lib/python3.11")
    shutil.copytree(
        stdlib,
        rootfs / "usr/lib/python3.11",
        ignore=lambda d, names: [
            n
            for n in names
            if n == "__pycache__"
            or n in ("site-packages", "dist-packages")
            or (Path(d) == stdlib and n in _SKIP_STDLIB)
        ],
        symlinks=True,
    )
    tar = pm.root / f"{rootfs.name}.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    ref = f"{pm.registry}/{name}"
    pm.run("import", "-q", "--change", "ENV=PATH=/usr/bin:/bin", str(tar), ref)
    pm.run("push", "-q", ref)
    pm.run("rmi", "-f", ref)
    return ref


@pytest.mark.skipif(not HOST_PYTHON.exists(), reason="no Debian python3.11 to build an image of")
def test_requirements_are_installed_on_top_of_the_images_python(
    env: Podman, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = _push_python_image(env, "py:1")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels)
    # The rig's package sources (as for any environment): only this directory, offline.
    for name, value in {
        "PIP_FIND_LINKS": str(wheels),
        "PIP_NO_INDEX": "1",
        "UV_OFFLINE": "1",
        "UV_NO_CONFIG": "1",
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
    }.items():
        monkeypatch.setenv(name, value)
    requirements = "rigshift-testpkg==1.0\n"
    digest = hashlib.sha256(requirements.encode()).hexdigest()
    job = (
        "import os, sys, rigshift_testpkg; "
        "print('in image', sys.executable, sys.version_info[:2], rigshift_testpkg.VALUE, "
        "rigshift_testpkg.__file__); "
        "open(os.environ['RIGSHIFT_OUTPUT_DIR'] + '/site.txt', 'w').write('ok')"
    )
    state = tmp_path / "agent"

    # The second job: the console script, on PATH, run by the image's python3.
    script = ["/bin/sh", "-c", "rigshift-testpkg; touch /opt/rigshift/site/x"]

    async def body(fake: FakeBroker, agent: Agent) -> None:
        for name, command in (("jobs/p1", ["python3", "-c", job]), ("jobs/p2", script)):
            a = _image_job(name, ref, command, max_output_bytes=1 << 20)
            a.spec.python_requirements, a.spec.requirements_sha256 = requirements, digest
            fake.push(assignment=a)
            await until(functools.partial(fake.finished, name), 90, name)

    fake = run_session(tmp_path, body)
    first, second = fake.output("jobs/p1"), fake.output("jobs/p2")
    assert fake.finished("jobs/p1").exit_code == 0, first
    assert "python3 -c" not in first  # the probe's code is not logged
    assert f"image {ref}: cpython 3.11 (x86_64, glibc " in first
    assert "installing 1 requirement for the image's Python (--python-version 3.11" in first
    assert "in image /usr/bin/python3 (3, 11) 42 /opt/rigshift/site/rigshift_testpkg" in first
    # The second job built nothing and probed nothing; the site is read-only inside.
    assert fake.finished("jobs/p2").exit_code != 0, second
    assert "hello 42" in second and "Read-only file system" in second
    assert "reused (cached), nothing installed" in second and "installing" not in second
    assert f"image {ref}: cpython" not in second
    pythons = json.loads((state / "containers" / "pythons.json").read_text())
    assert [p["version"] for p in pythons.values()] == ["3.11"]
    sites = [p for p in (state / "environments").iterdir() if p.is_dir()]
    assert len(sites) == 1 and (sites[0] / "rigshift_testpkg" / "__init__.py").exists()
    assert not [c for c in env.containers() if c.startswith("rigshift-")]


def test_a_restarted_agent_removes_the_containers_it_left(env: Podman, tmp_path: Path) -> None:
    ref = env.push("orphan:1")
    env.run("pull", "-q", ref)
    state = tmp_path / "agent"

    async def body(fake: FakeBroker, agent: Agent) -> None:
        return None

    run_session(tmp_path, body)  # creates the rig's identity
    rig = json.loads((state / "identity.json").read_text())["rig_id"]
    # What a killed agent leaves: a container of this rig that no attempt runs.
    env.run(
        "run",
        "-d",
        "--name",
        "rigshift-left-1",
        "--label",
        f"rigshift.rig={rig}",
        ref,
        "/bin/sh",
        "-c",
        "sleep 60",
    )
    env.run(
        "run",
        "-d",
        "--name",
        "other-rig-1",
        "--label",
        "rigshift.rig=other",
        ref,
        "/bin/sh",
        "-c",
        "sleep 60",
    )
    try:
        run_session(tmp_path, body)
        names = env.containers()
        assert "rigshift-left-1" not in names and "other-rig-1" in names
    finally:
        env.run("rm", "-f", "--time", "0", "rigshift-left-1", "other-rig-1", check=False)


def test_the_lease_fence_removes_the_container(env: Podman, tmp_path: Path) -> None:
    """The agent cannot act (frozen): the fence kills ``podman run`` and removes the
    container, which would outlive its client (the job ignores SIGTERM)."""
    from worker_agent.containers import podman_run_argv
    from worker_agent.fence import clock, write_deadline
    from worker_agent.process import ProcExited, ProcOutput, run_process

    ref = env.push("fenced:1")
    env.run("pull", "-q", ref)
    fence = tmp_path / "lease-deadline"
    write_deadline(fence, clock() + 3600)
    argv = podman_run_argv(
        podman=shutil.which("podman") or "podman",
        name="rigshift-fenced-1",
        image=ref,
        command=["/bin/sh", "-c", "trap '' TERM; echo READY; while true; do sleep 1; done"],
        network="none",
        gpu_indices=[0],
        nvml=False,
        cwd=str(tmp_path),
        writable=[],
        readonly=[],
        env={},
    )
    gen = run_process(
        argv,
        dict(os.environ),
        str(tmp_path),
        kill_grace_s=1.0,
        fence_file=str(fence),
        container="rigshift-fenced-1",
    )
    output = b""
    for event in gen:
        if isinstance(event, ProcOutput):
            output += event.data
            if b"READY" in output:
                break
    assert "rigshift-fenced-1" in env.containers()
    write_deadline(fence, clock() - 1)
    exited = list(gen)[-1]
    assert isinstance(exited, ProcExited) and exited.message.startswith("lease lost")
    assert "rigshift-fenced-1" not in env.containers()


def test_images_kept_across_restarts_unless_removed(env: Podman, tmp_path: Path) -> None:
    ref = env.push("kept:1")
    held: list[list[str]] = []

    async def pull(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=_image_job("jobs/p", ref, ["/bin/hello"]))
        await until(lambda: fake.finished("jobs/p"), 60, "the image job")

    async def look(fake: FakeBroker, agent: Agent) -> None:
        assert agent.runner is not None and agent.runner.images is not None
        held.append(agent.runner.images.held())

    run_session(tmp_path, pull)
    run_session(tmp_path, look)  # the index survives the restart
    env.run("rmi", "-f", ref)  # an operator removes the image
    run_session(tmp_path, look)
    assert held[0][0] == ref and held[1] == []
