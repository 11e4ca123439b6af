"""Jobs in container images end to end (issue 14): the real broker, a real agent with
simulated GPUs, real podman and a real local registry (:mod:`harness.containers`).

The images are built here from static busybox and pushed to a ``docker-registry`` on a
loopback port, then removed locally, so the agent must pull them. podman gets this
machine's configuration (runc, cgroupfs, ulimits at 4096) through ``CONTAINERS_CONF``
and ``CONTAINERS_REGISTRIES_CONF`` in the fleet's environment, which the agent passes
on. Without podman, the registry or a static busybox the tests are skipped; in CI
(``CI`` set) they fail instead (`.ci/run` installs them).

A second registry asks for a user and password (htpasswd), for the job that brings
``--registry-auth``. One fleet serves the module (broker, one agent ``rig-img`` with 2
simulated RTX 3090s);
the test of a fleet without podman starts a second, small one whose agent has
``[containers] enabled = false``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_cluster import TERMINAL, wait_until

from harness.containers import ContainerKit, missing_tools
from harness.fleet import LocalFleet, ManagedProcess, rigshift_argv
from rigshift.v1 import farm_pb2, job_pb2

S, A = job_pb2.Job, job_pb2.Attempt
pytestmark = pytest.mark.timeout(180)

#: The job of the first test: exists only inside the image; reads its input, writes its
#: output, and says what it saw.
TRAIN_SH = """#!/bin/sh
set -e
echo "train.sh inside the image $(cat /etc/rigshift-test-image)"
out="$RIGSHIFT_OUTPUT_DIR/result.txt"
echo "image=$(cat /etc/rigshift-test-image)" > "$out"
echo "gpus=$CUDA_VISIBLE_DEVICES" >> "$out"
echo "input=$(cat "$RIGSHIFT_INPUT_DIR/data/numbers.txt")" >> "$out"
if (echo x > "$RIGSHIFT_INPUT_DIR/data/numbers.txt") 2>/dev/null; then
    echo "input=writable" >> "$out"
else
    echo "input=read-only" >> "$out"
fi
echo "checkpoint-dir=$(test -d "$RIGSHIFT_CHECKPOINT_DIR" && echo yes)" >> "$out"
echo "train.sh done"
"""

#: Looks for the agent's secrets from inside the container (the state dir is argv[1]).
PROBE_SH = r"""#!/bin/sh
state="$1"
out="$RIGSHIFT_OUTPUT_DIR"
ls -a "$state" > "$out/ls-state.txt" 2>&1; echo "ls rc=$?" >> "$out/ls-state.txt"
for f in identity.json ray_auth_token; do
    cat "$state/$f" > "$out/cat-$f.txt" 2>&1; echo "cat rc=$?" >> "$out/cat-$f.txt"
done
env > "$out/env.txt"
cat /proc/net/dev > "$out/net.txt"
echo "probe done"
"""


@dataclass
class Images:
    """The module's kit, fleet and images."""

    kit: ContainerKit
    fleet: LocalFleet
    client: Any
    rig: ManagedProcess
    train: str  # /opt/train.sh, /opt/probe.sh
    again: str  # used by the pull-once test only
    private: str  # /opt/probe.sh, in the registry that asks for credentials

    @property
    def state_dir(self) -> Path:
        """The agent's state directory (its identity, tokens, every job's files)."""
        return self.fleet.root / "agents" / "rig-img"

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """``rigshift job --broker ADDRESS ARGS`` as a user runs it (the admin key from the
        fleet's RIGSHIFT_HOME)."""
        done = subprocess.run(
            [*rigshift_argv(), "job", "--broker", self.fleet.broker_address, *args],
            env=self.fleet.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def wait(self, job: str, states: set[int] | None = None, timeout_s: float = 60) -> Any:
        return _wait(self.client, job, states or TERMINAL, timeout_s, self.rig)

    def logs(self, job: str) -> str:
        return "".join(c.data for c in self.client.stream_logs(job))


def _wait(client: Any, job: str, states: set[int], timeout_s: float, rig: ManagedProcess) -> Any:
    """Poll the job until it is in one of ``states``; fail with the agent's log."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = client.get_job(job)
        if got.state in states:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{job} is {S.State.Name(got.state)} after {timeout_s} s: {got.status_message}"
                f"\n--- {rig.name} ---\n{rig.log_tail(40)}"
            )
        time.sleep(0.1)


def _kit_or_skip(root: Path) -> ContainerKit:
    missing = missing_tools()
    if missing:
        what = f"{', '.join(missing)} not installed (apt-get install {' '.join(missing)})"
        if os.environ.get("CI"):
            pytest.fail(f"{what}: `.ci/run` installs them")
        pytest.skip(what)
    return ContainerKit.start(root, private=True)


def _start_fleet(
    root: Path, env: dict[str, str], rig: str, **agent: object
) -> tuple[LocalFleet, ManagedProcess]:
    """A broker and one agent (2 simulated RTX 3090s) named ``rig``, online."""
    fleet = LocalFleet(root, env=env)
    fleet.start_broker(lease_ttl_s=6, heartbeat_interval_s=1)
    token = fleet.client().create_farm("farm-img").enrollment_token
    process = fleet.start_agent(
        rig,
        token,
        simulate="RTX3090x2",
        heartbeat_interval_s=1,
        lease_ttl_s=6,
        drain_grace_s=5,
        **agent,
    )
    fleet.wait_workers(1)
    return fleet, process


def _stop_fleet(fleet: LocalFleet) -> None:
    fleet.stop()
    left = fleet.leftovers()
    assert not left, f"processes left running: {left}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    root = tmp_path_factory.mktemp("images")
    kit = _kit_or_skip(root / "kit")
    fleet = None
    try:
        train = kit.build_image("train", {"opt/train.sh": TRAIN_SH, "opt/probe.sh": PROBE_SH})
        again = kit.build_image("again", {"opt/hello.sh": "#!/bin/sh\necho hello again\n"})
        private = kit.build_image("private", {"opt/probe.sh": PROBE_SH}, private=True)
        fleet, rig = _start_fleet(root / "fleet", kit.env, "rig-img")
        yield Images(kit, fleet, fleet.client(), rig, train, again, private)
    finally:
        if fleet is not None:
            _stop_fleet(fleet)
        kit.stop()


def _containers_of(kit: ContainerKit, job: str) -> list[str]:
    """Containers (running or not) named or labelled for the job."""
    job_id = job.rpartition("/")[2]
    found = []
    for c in kit.containers():
        names = [str(n) for n in c.get("Names") or []]
        labels = [str(v) for v in (c.get("Labels") or {}).values()]
        if any(job_id in s for s in names + labels):
            found.append(names[0] if names else str(c.get("Id")))
    return found


def test_image_job_runs_a_script_only_the_image_has_and_its_output_downloads(
    images: Images, tmp_path: Path
) -> None:
    worker = next(iter(images.client.iter_workers()))
    assert worker.container_runtime.name == "podman" and worker.container_runtime.version
    assert not Path("/opt/train.sh").exists()  # only the image has it
    data = tmp_path / "data"
    data.mkdir()
    (data / "numbers.txt").write_text("1 2 3")

    submitted = images.cli(
        "submit", "--json", "--image", images.train, "--input", f"data={data}",
        "--", "/opt/train.sh",
    )  # fmt: skip
    name = json.loads(submitted.stdout)["name"]
    job = images.wait(name)
    logs = images.logs(name)
    assert job.state == S.SUCCEEDED, (job.status_message, logs[-3000:])
    assert job.spec.environment.image == images.train
    assert "train.sh inside the image train:1" in logs and "train.sh done" in logs

    out = tmp_path / "out"
    images.cli("outputs", "--download", str(out), name)
    result = dict(line.split("=", 1) for line in (out / "result.txt").read_text().splitlines())
    assert result["image"] == "train:1"
    # Simulated GPUs: CUDA_VISIBLE_DEVICES as for a process job, the attempt's GPUs.
    assert result["gpus"] == ",".join(str(i) for i in job.attempts[-1].gpu_indices)
    lines = (out / "result.txt").read_text().splitlines()
    assert "input=1 2 3" in lines and "input=read-only" in lines
    assert result["checkpoint-dir"] == "yes"


def test_a_second_job_with_the_same_image_pulls_nothing(images: Images) -> None:
    kit, ref = images.kit, images.again
    assert not kit.has_local(ref)

    first = images.client.create_job(["/opt/hello.sh"], image=ref).name
    job = images.wait(first)
    assert job.state == S.SUCCEEDED, (job.status_message, images.logs(first)[-3000:])
    pulled = kit.layer_fetches(ref)
    assert pulled >= 1, "the first job must have pulled the image's layer"
    assert job.attempts[-1].setup_milliseconds > 0  # the pull is setup, not GPU time
    assert kit.has_local(ref)

    second = images.client.create_job(["/opt/hello.sh"], image=ref).name
    job = images.wait(second)
    assert job.state == S.SUCCEEDED, (job.status_message, images.logs(second)[-3000:])
    assert "hello again" in images.logs(second)
    assert kit.layer_fetches(ref) == pulled, "the second job fetched a layer again"


def test_an_image_that_does_not_exist_fails_after_one_attempt_naming_it(images: Images) -> None:
    ref = f"{images.kit.registry}/no-such-image:1"
    name = images.client.create_job(
        ["/bin/sh", "-c", "echo never runs"], image=ref, max_attempts=3
    ).name
    job = images.wait(name)
    assert job.state == S.FAILED
    assert len(job.attempts) == 1, "a missing image uses no further attempts"
    assert job.attempts[0].state == A.FAILED
    assert ref in job.status_message, job.status_message
    assert job.attempts[0].gpu_milliseconds == 0 and job.attempts[0].charge_micros == 0
    assert "never runs" not in images.logs(name)


def test_cancel_removes_the_container(images: Images) -> None:
    # The job ends on SIGTERM (a shell as PID 1 ignores it otherwise, and the agent's
    # grace would have to run out): cancel is then quick.
    script = "trap 'echo stopped; exit 143' TERM; echo running; sleep 300 & wait"
    name = images.client.create_job(["/bin/sh", "-c", script], image=images.train).name
    images.wait(name, {S.RUNNING, *TERMINAL})
    wait_until(
        lambda: _containers_of(images.kit, name),
        30,
        f"a container for {name} (podman ps -a: {images.kit.containers()})",
    )
    images.client.cancel_job(name)
    job = images.wait(name, timeout_s=60)
    assert job.state == S.CANCELLED, job.status_message
    wait_until(lambda: not _containers_of(images.kit, name), 30, f"{name}'s container removed")


def test_a_container_job_cannot_read_the_agents_state_dir(images: Images, tmp_path: Path) -> None:
    state = images.state_dir
    credential = json.loads((state / "identity.json").read_text())["credential"]
    assert len(credential) >= 16

    name = images.client.create_job(["/opt/probe.sh", str(state)], image=images.train).name
    job = images.wait(name)
    assert job.state == S.SUCCEEDED, (job.status_message, images.logs(name)[-3000:])
    out = images.client.download_outputs(name, tmp_path / "out")

    listing = (out / "ls-state.txt").read_text()
    # Only the parents of the job's own mounts show; the image cache ("containers", where
    # a pull's auth file lives for the pull) and everything else of the agent's do not.
    for private in ("identity.json", "ray_auth_token", "containers", "artifacts", "environments"):
        assert private not in listing, listing
    for f in ("identity.json", "ray_auth_token"):
        seen = (out / f"cat-{f}.txt").read_text()
        assert "cat rc=0" not in seen, f"the job read {f}: {seen}"
    everything = "".join(p.read_text(errors="replace") for p in out.iterdir())
    everything += images.logs(name)
    assert credential not in everything
    assert "RIGSHIFT_CREDENTIAL" not in (out / "env.txt").read_text()


def test_a_private_image_is_pulled_with_the_jobs_registry_auth_which_stays_secret(
    images: Images, tmp_path: Path
) -> None:
    ref, kit = images.private, images.kit
    # Without credentials the registry refuses: the client's fault, one attempt, named.
    name = images.client.create_job(["/opt/probe.sh", "/x"], image=ref, max_attempts=3).name
    job = images.wait(name)
    assert job.state == S.FAILED and len(job.attempts) == 1, job.status_message
    assert ref in job.status_message, job.status_message

    auth = tmp_path / "auth.json"
    auth.write_bytes(kit.auth_json)
    token = json.loads(kit.auth_json)["auths"][kit.private_registry]["auth"]
    password = base64.b64decode(token).decode().split(":", 1)[1]
    submitted = images.cli(
        "submit", "--json", "--image", ref, "--registry-auth", str(auth),
        "--", "/opt/probe.sh", str(images.state_dir),
    )  # fmt: skip
    name = json.loads(submitted.stdout)["name"]
    job = images.wait(name)
    logs = images.logs(name)
    assert job.state == S.SUCCEEDED, (job.status_message, logs[-3000:])
    assert kit.layer_fetches(ref) >= 1
    out = images.client.download_outputs(name, tmp_path / "out")

    # The secret is nowhere a job or another client could read, nor on the broker's or the
    # rig's disk: not in what the API answers, the job's logs, outputs or environment, the
    # processes' logs, the broker's database, the agent's state directory.
    shown = submitted.stdout + images.cli("get", "--json", name.rpartition("/")[2]).stdout
    seen = [("the API's answers", shown), ("the job's logs", logs)]
    seen += [(f"output {p.name}", p.read_text(errors="replace")) for p in out.iterdir()]
    for where in ("logs", "broker", "agents"):
        for path in sorted((images.fleet.root / where).rglob("*")):
            if path.is_file() and path.stat().st_size < 64 << 20:
                seen.append((str(path), path.read_bytes().decode(errors="replace")))
    for what, text in seen:
        assert token not in text and password not in text, f"the pull secret is in {what}"
    assert "containers" not in (out / "ls-state.txt").read_text()

    # The rig holds the private image now; a job without credentials still cannot run it.
    fetches = kit.layer_fetches(ref)
    name = images.client.create_job(["/opt/probe.sh", "/x"], image=ref, max_attempts=3).name
    job = images.wait(name)
    assert job.state == S.FAILED and len(job.attempts) == 1, job.status_message
    assert ref in job.status_message, job.status_message
    assert kit.layer_fetches(ref) == fetches  # refused at the manifest: no layer moved


def test_a_container_job_has_no_network(images: Images, tmp_path: Path) -> None:
    name = images.client.create_job(["/opt/probe.sh", "/nonexistent"], image=images.train).name
    job = images.wait(name)
    assert job.state == S.SUCCEEDED, (job.status_message, images.logs(name)[-3000:])
    out = images.client.download_outputs(name, tmp_path / "out")
    lines = (out / "net.txt").read_text().splitlines()[2:]  # two header lines
    interfaces = {line.split(":")[0].strip() for line in lines if ":" in line}
    assert interfaces == {"lo"}, f"the container has a network: {interfaces}"


def test_an_image_job_on_a_fleet_without_podman_stays_pending(
    tmp_path: Path, images: Images
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[containers]\nenabled = false\n")
    fleet, rig = _start_fleet(tmp_path / "plain", images.kit.env, "rig-plain", config=config)
    client = fleet.client()
    try:
        (worker,) = list(client.iter_workers())
        assert worker.state == farm_pb2.Worker.ONLINE
        assert not worker.container_runtime.name
        name = client.create_job(["/opt/train.sh"], image=images.train).name

        def reasons() -> list[Any]:
            return list(client.get_job(name).pending_reasons)

        wait_until(reasons, 30, f"a reason why {name} is not placed")
        (reason,) = reasons()
        assert (reason.resource, reason.resolvable) == ("container_runtime", False)
        # "no worker runs containers: 0 of 1 have podman" (or "... a container runtime")
        assert reason.message.startswith("no worker runs containers: 0 of 1 have"), reason
        assert client.get_job(name).state == S.PENDING
        # And a job without an image runs there.
        plain = client.create_job(["/bin/sh", "-c", "echo ok"]).name
        assert _wait(client, plain, TERMINAL, 60, rig).state == S.SUCCEEDED
        assert client.get_job(name).state == S.PENDING
    finally:
        _stop_fleet(fleet)
