"""Container jobs, the pure parts: pull failures classified, the exact ``podman run``
command, the ``[containers]`` table, what the heartbeat reports (no process started)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from pathlib import Path

import pytest

from worker_agent.config import ConfigError, ContainersConfig
from worker_agent.config_file import read_config_file
from worker_agent.containers import (
    PodmanRuntime,
    classify_pull_failure,
    container_launch,
    container_name,
    image_name,
    podman_run_argv,
)
from worker_agent.image_python import (
    PROBE_CODE,
    ImagePython,
    install_target,
    parse_probe,
    probe_argv,
    python_platform,
)
from worker_agent.images import MAX_REPORTED, Image, ImageCache
from worker_agent.launch import LaunchSpec
from worker_agent.setup_failures import SetupError

REF = "127.0.0.1:5055/rs-test:2"

# podman 4.3.1's own output (captured on this machine; the denied lines from ghcr.io and
# Docker Hub).
PULL_FAILURES = [
    (
        "Trying to pull 127.0.0.1:5055/rs-test:2...\nError: initializing source "
        "docker://127.0.0.1:5055/rs-test:2: reading manifest 2 in 127.0.0.1:5055/rs-test: "
        "manifest unknown: manifest unknown\n",
        "client",
        "image 127.0.0.1:5055/rs-test:2 not found: initializing source",
    ),
    (
        "Error: initializing source docker://ghcr.io/org/private:1: reading manifest 1 in "
        "ghcr.io/org/private: denied\n",
        "client",
        "access to image 127.0.0.1:5055/rs-test:2 denied",
    ),
    (
        "Error: initializing source docker://registry.example/x:1: reading manifest 1 in "
        "registry.example/x: unauthorized: authentication required\n",
        "client",
        "access to image 127.0.0.1:5055/rs-test:2 denied",
    ),
    (
        "Error: initializing source docker://x/y:1: requested access to the resource is denied\n",
        "client",
        "access to image",
    ),
    (
        'time="2026-12-06T09:17:44Z" level=warning msg="Failed, retrying in 1s ... (2/3). '
        "Error: initializing source docker://127.0.0.1:5056/nothing:1: pinging container "
        'registry 127.0.0.1:5056: Get \\"http://127.0.0.1:5056/v2/\\": dial tcp '
        '127.0.0.1:5056: connect: connection refused"\n'
        "Error: initializing source docker://127.0.0.1:5056/nothing:1: pinging container "
        'registry 127.0.0.1:5056: Get "http://127.0.0.1:5056/v2/": dial tcp 127.0.0.1:5056: '
        "connect: connection refused\n",
        "rig",
        "registry of image 127.0.0.1:5055/rs-test:2 unreachable: initializing source",
    ),
    (
        "Trying to pull nosuchhost.invalid/x:1...\nError: initializing source "
        "docker://nosuchhost.invalid/x:1: pinging container registry nosuchhost.invalid: Get "
        '"https://nosuchhost.invalid/v2/": dial tcp: lookup nosuchhost.invalid on '
        "10.255.255.53:53: no such host\n",
        "rig",
        "unreachable",
    ),
    (
        "Error: initializing source docker://r:5000/x:1: pinging container registry r:5000: "
        'Get "https://r:5000/v2/": dial tcp 10.0.0.9:5000: i/o timeout\n',
        "rig",
        "unreachable",
    ),
    (
        "Copying blob sha256:2007\nError: writing blob: storing blob to file "
        '"/var/tmp/storage123/1": write /var/tmp/storage123/1: no space left on device\n',
        "rig",
        "disk full pulling image",
    ),
    ("Error: repository name must be lowercase\n", "client", "invalid image reference"),
    ("Error: something new\n", "rig", "pulling image 127.0.0.1:5055/rs-test:2 failed"),
    ("", "rig", "podman failed without saying why"),
]


@pytest.mark.parametrize(("output", "cause", "says"), PULL_FAILURES)
def test_pull_failures_are_the_clients_or_the_rigs(output: str, cause: str, says: str) -> None:
    got_cause, message = classify_pull_failure(REF, output)
    assert (got_cause, says in message) == (cause, True), message
    assert REF in message or not output


@pytest.mark.parametrize(
    ("reference", "name"),
    [
        ("127.0.0.1:5055/rs-test:1", "127.0.0.1:5055/rs-test"),
        ("ghcr.io/org/train:1.4", "ghcr.io/org/train"),
        ("registry.local:5000/x@sha256:abc", "registry.local:5000/x"),
        ("registry.local:5000/x", "registry.local:5000/x"),
        ("busybox", "busybox"),
    ],
)
def test_image_name_drops_tag_and_digest(reference: str, name: str) -> None:
    assert image_name(reference) == name


def test_container_name_is_per_attempt_and_safe() -> None:
    assert container_name("jobs/ab12", 3) == "rigshift-ab12-3"
    assert container_name("jobs/a b;c", 1) == "rigshift-a_b_c-1"


STATE = "/var/lib/rigshift"
WD = f"{STATE}/attempts/j1-2/wd"
OUT = f"{STATE}/attempts/j1-2/out"
CKPT = f"{STATE}/checkpoints/j1"
INPUTS = f"{STATE}/attempts/j1-2/inputs"
CACHE = f"{STATE}/inputs/0123abcd"


def _spec(gpus: list[int]) -> LaunchSpec:
    env = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "CONTAINERS_CONF": "/etc/c.conf",
        "RIGSHIFT_API_KEY": "secret-key",
        "RAY_AUTH_TOKEN": "ray-secret",
        "RIGSHIFT_JOB_ID": "j1",
        "RIGSHIFT_ATTEMPT": "2",
        "RIGSHIFT_CHECKPOINT_DIR": CKPT,
        "RIGSHIFT_OUTPUT_DIR": OUT,
        "RIGSHIFT_INPUT_DIR": INPUTS,
        "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "PYTHONUNBUFFERED": "1",
        "EPOCHS": "3",
    }
    return LaunchSpec(
        job="jobs/j1",
        attempt=2,
        argv=["/bin/train", "--fast"],
        env=env,
        cwd=WD,
        gpu_indices=gpus,
        readonly=(INPUTS, CACHE),
    )


AGENT_ENV = {
    "PATH": "/usr/bin",
    "CONTAINERS_CONF": "/etc/c.conf",
    "RIGSHIFT_ENROLLMENT_TOKEN": "enroll-secret",
    "RAY_AUTH_TOKEN": "ray-secret",
}

MOUNTS = [
    *("-v", f"{WD}:{WD}:rw"),
    *("-v", f"{CKPT}:{CKPT}:rw"),
    *("-v", f"{OUT}:{OUT}:rw"),
    *("-v", f"{INPUTS}:{INPUTS}:ro"),
    *("-v", f"{CACHE}:{CACHE}:ro"),
]
RIGSHIFT_ENV = [
    *("-e", "CUDA_DEVICE_ORDER=PCI_BUS_ID"),
    *("-e", "EPOCHS=3"),
    *("-e", "PYTHONUNBUFFERED=1"),
    *("-e", "RIGSHIFT_ATTEMPT=2"),
    *("-e", f"RIGSHIFT_CHECKPOINT_DIR={CKPT}"),
    *("-e", f"RIGSHIFT_INPUT_DIR={INPUTS}"),
    *("-e", "RIGSHIFT_JOB_ID=j1"),
    *("-e", f"RIGSHIFT_OUTPUT_DIR={OUT}"),
]
HEAD = [
    *("/usr/bin/podman", "run", "--rm", "--name", "rigshift-j1-2"),
    *("--label", "rigshift.rig=rig-7", "--pull", "never"),
]


SITE = f"{STATE}/environments/5173e"


@pytest.mark.parametrize(
    ("gpus", "nvml", "network", "site", "expected"),
    [
        # NVML rig: exactly the job's GPUs through CDI; no CUDA_VISIBLE_DEVICES (the
        # container sees its GPUs alone).
        (
            [1, 3],
            True,
            "none",
            "",
            [
                *HEAD,
                *("--network", "none"),
                "--device=nvidia.com/gpu=1",
                "--device=nvidia.com/gpu=3",
                *MOUNTS,
                *("--workdir", WD),
                *RIGSHIFT_ENV,
                "sha256:img",
                "/bin/train",
                "--fast",
            ],
        ),
        # Simulated rig: no device, CUDA_VISIBLE_DEVICES as for any job.
        (
            [0],
            False,
            "slirp4netns",
            "",
            [
                *HEAD,
                *("--network", "slirp4netns"),
                *MOUNTS,
                *("--workdir", WD),
                *RIGSHIFT_ENV[:2],
                *("-e", "CUDA_VISIBLE_DEVICES=0"),
                *RIGSHIFT_ENV[2:],
                "sha256:img",
                "/bin/train",
                "--fast",
            ],
        ),
        # Requirements installed for the image's Python: their directory read-only at
        # /opt/rigshift/site, first on PYTHONPATH (no bin/ in it here, so PATH is the
        # image's own).
        (
            [1],
            True,
            "none",
            SITE,
            [
                *HEAD,
                *("--network", "none"),
                "--device=nvidia.com/gpu=1",
                *MOUNTS,
                *("-v", f"{SITE}:/opt/rigshift/site:ro"),
                *("--workdir", WD),
                *RIGSHIFT_ENV[:4],
                *("-e", "PYTHONPATH=/opt/rigshift/site"),
                *RIGSHIFT_ENV[4:],
                "sha256:img",
                "/bin/train",
                "--fast",
            ],
        ),
    ],
)
def test_container_launch_is_exactly_this_podman_run(
    gpus: list[int], nvml: bool, network: str, site: str, expected: list[str]
) -> None:
    spec = _spec(gpus)
    launched = container_launch(
        spec,
        podman="/usr/bin/podman",
        image="sha256:img",
        network=network,
        nvml=nvml,
        job_env={"EPOCHS": "3"},
        agent_env=AGENT_ENV,
        rig="rig-7",
        site=site,
        image_path="/usr/local/bin:/usr/bin",
    )
    # Sorted env names; note CUDA_VISIBLE_DEVICES sorts between CUDA_DEVICE_ORDER and EPOCHS.
    assert launched.argv == expected
    assert launched.container == "rigshift-j1-2"
    assert launched.readonly == ()  # no sandbox around podman: the container isolates
    # podman itself runs with the agent's environment minus its secrets.
    assert launched.env == {"PATH": "/usr/bin", "CONTAINERS_CONF": "/etc/c.conf"}
    joined = " ".join(launched.argv)
    for secret in ("secret-key", "ray-secret", "enroll-secret", "/root", "auth"):
        assert secret not in joined
    # Nothing of the state directory is mounted but the job's own directories.
    mounted = [launched.argv[i + 1] for i, a in enumerate(launched.argv) if a == "-v"]
    assert all(m.split(":")[0] in (WD, CKPT, OUT, INPUTS, CACHE, SITE) for m in mounted)
    assert not any(m.split(":")[0] == STATE for m in mounted)


def test_the_site_goes_before_the_jobs_pythonpath_and_its_bin_before_the_images_path(
    tmp_path: Path,
) -> None:
    (tmp_path / "bin").mkdir()

    def env_of(job_env: dict[str, str]) -> dict[str, str]:
        spec = _spec([0])
        spec = dataclasses.replace(spec, env={**spec.env, **job_env})
        argv = container_launch(
            spec,
            podman="podman",
            image="i",
            network="none",
            nvml=True,
            job_env=job_env,
            agent_env=AGENT_ENV,
            site=str(tmp_path),
            image_path="/usr/local/bin:/usr/bin",
        ).argv
        pairs = [argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-e"]
        return dict((k, v) for k, v in pairs)

    plain = env_of({})
    assert plain["PYTHONPATH"] == "/opt/rigshift/site"
    assert plain["PATH"] == "/opt/rigshift/site/bin:/usr/local/bin:/usr/bin"
    own = env_of({"PYTHONPATH": "/code", "PATH": "/mine"})
    assert own["PYTHONPATH"] == "/opt/rigshift/site:/code"
    assert own["PATH"] == "/mine"  # the job's own PATH wins


IMAGES = {
    # what the probe printed (version, implementation, machine, libc, libc version, musl)
    "debian12": ImagePython("3.11", "cpython", "x86_64", "glibc", "2.36"),
    "ubuntu20": ImagePython("3.8", "cpython", "x86_64", "glibc", "2.31"),
    "rhel8": ImagePython("3.9", "cpython", "x86_64", "glibc", "2.28"),
    "centos7": ImagePython("3.6", "cpython", "x86_64", "glibc", "2.17"),
    "glibc230": ImagePython("3.10", "cpython", "x86_64", "glibc", "2.30"),
    "future": ImagePython("3.14", "cpython", "x86_64", "glibc", "2.41"),
    "arm": ImagePython("3.12", "cpython", "aarch64", "glibc", "2.39"),
    "arm64": ImagePython("3.12", "cpython", "arm64", "glibc", "2.35"),
    "ancient": ImagePython("3.6", "cpython", "x86_64", "glibc", "2.12"),
    "alpine": ImagePython("3.12", "cpython", "x86_64", "", "", musl=True),
    "static": ImagePython("3.12", "cpython", "x86_64"),
}


@pytest.mark.parametrize(
    ("image", "platform"),
    [
        ("debian12", "x86_64-manylinux_2_36"),
        ("ubuntu20", "x86_64-manylinux_2_31"),
        ("rhel8", "x86_64-manylinux_2_28"),
        ("centos7", "x86_64-manylinux_2_17"),
        ("glibc230", "x86_64-manylinux_2_28"),  # uv knows no 2_29/2_30: the newest below
        ("future", "x86_64-manylinux_2_40"),  # newer than uv knows: its newest
        ("arm", "aarch64-manylinux_2_39"),
        ("arm64", "aarch64-manylinux_2_35"),
        ("ancient", "x86_64-unknown-linux-gnu"),
        ("alpine", "x86_64-unknown-linux-musl"),
        ("static", "x86_64-unknown-linux-gnu"),
    ],
)
def test_the_images_python_becomes_uvs_target(image: str, platform: str) -> None:
    python = IMAGES[image]
    assert python_platform(python) == platform
    target = install_target("r/x:1", "r/x@sha256:ab", python)
    assert target.uv_args == ("--python-version", python.version, "--python-platform", platform)
    # The cache key: the image's digest and the target, never the reference's tag.
    assert target.identity == "\0".join(("image", "r/x@sha256:ab", *target.uv_args))


@pytest.mark.parametrize(
    ("python", "says"),
    [
        (ImagePython("3.10", "pypy", "x86_64", "glibc", "2.36"), "need CPython"),
        (ImagePython("3.11", "cpython", "s390x", "glibc", "2.36"), "machine 's390x'"),
    ],
)
def test_an_image_python_uv_cannot_target_is_the_clients(python: ImagePython, says: str) -> None:
    with pytest.raises(SetupError) as caught:
        install_target("r/x:1", "r/x@sha256:ab", python)
    assert caught.value.cause == "client" and says in str(caught.value)


PROBED = (
    '{"version": "3.11", "implementation": "cpython", "machine": "x86_64", "libc": "glibc", '
    '"libc_version": "2.36", "musl": false, "path": "/usr/local/bin:/usr/bin"}\n'
)


@pytest.mark.parametrize(
    ("code", "output", "cause", "says"),
    [
        (0, PROBED, "", ""),
        # podman 4.3.1 with runc, in an image without python3 (captured on this machine)
        (
            127,
            "Error: runc: runc create failed: unable to start container process: exec: "
            '"python3": executable file not found in $PATH: OCI runtime attempt to invoke a '
            "command that was not found\n",
            "client",
            "image r/x:1 has no python3 to install python_requirements into",
        ),
        (125, "Error: creating container storage: no space left on device\n", "rig", "cannot"),
        (0, "Python 2.7\n", "client", "did not describe itself"),
    ],
)
def test_the_probe_says_which_python_or_whose_fault(
    code: int, output: str, cause: str, says: str
) -> None:
    if not cause:
        python = parse_probe("r/x:1", code, output)
        assert python == ImagePython(
            "3.11", "cpython", "x86_64", "glibc", "2.36", False, "/usr/local/bin:/usr/bin"
        )
        return
    with pytest.raises(SetupError) as caught:
        parse_probe("r/x:1", code, output)
    assert caught.value.cause == cause and says in str(caught.value)


def test_the_probe_runs_python3_without_network_or_entrypoint() -> None:
    assert probe_argv("podman", "sha256:i", "rig-7") == [
        *("podman", "run", "--rm", "--pull", "never", "--network", "none"),
        *("--entrypoint", "", "--label", "rigshift.rig=rig-7"),
        *("sha256:i", "python3", "-c", PROBE_CODE),
    ]
    # The probe's code prints what parse_probe reads (here, run by this Python).
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(PROBE_CODE, {})
    here = parse_probe("local", 0, printed.getvalue())
    assert here.version == "{}.{}".format(*sys.version_info[:2])
    assert here.implementation == "cpython"


def test_podman_run_argv_mounts_each_path_once() -> None:
    argv = podman_run_argv(
        podman="podman",
        name="n",
        image="i",
        command=["true"],
        network="none",
        gpu_indices=[0],
        nvml=False,
        cwd="/w",
        writable=["/w", "/o"],
        readonly=["/o", "/r"],
        env={},
    )
    assert argv == [
        *("podman", "run", "--rm", "--name", "n", "--pull", "never", "--network", "none"),
        *("-v", "/w:/w:rw", "-v", "/o:/o:rw", "-v", "/r:/r:ro"),
        *("--workdir", "/w", "i", "true"),
    ]


def test_containers_table(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[containers]\nenabled = false\nmax_cache_gb = 5\nnetwork = "slirp4netns"\n'
        'podman = "/usr/local/bin/podman"\n'
    )
    table = read_config_file(path)["containers"]
    assert table == ContainersConfig(
        enabled="false", max_cache_gb=5, network="slirp4netns", podman="/usr/local/bin/podman"
    )
    assert ContainersConfig() == ContainersConfig("auto", "podman", 50.0, "none", 900.0)
    path.write_text("[containers]\nmax_cache_gib = 5\n")
    with pytest.raises(ConfigError, match=r"unknown key containers\.'max_cache_gib'"):
        read_config_file(path)
    with pytest.raises(ConfigError, match=r"containers\.enabled must be auto, true or false"):
        ContainersConfig(enabled="yes")
    with pytest.raises(ConfigError, match=r"containers\.network must be a non-empty string"):
        ContainersConfig(network="--privileged")
    with pytest.raises(ConfigError, match=r"containers\.max_cache_gb must be a positive"):
        ContainersConfig(max_cache_gb=0)


def test_heartbeat_lists_images_most_recently_used_first(tmp_path: Path) -> None:
    cache = ImageCache(
        tmp_path / "containers", PodmanRuntime("/usr/bin/podman", "4.3.1"), ContainersConfig()
    )
    cache.images = {
        "r/a:1": Image("r/a:1", "r/a@sha256:aa", "ida", 10, last_used=1.0),
        "r/b:1": Image("r/b:1", "r/b@sha256:bb", "idb", 10, last_used=3.0),
        "r/a@sha256:aa": Image("r/a@sha256:aa", "r/a@sha256:aa", "ida", 10, last_used=2.0),
    }
    assert cache.held() == ["r/b:1", "r/b@sha256:bb", "r/a@sha256:aa", "r/a:1"]
    cache.images = {
        f"r/{i}:1": Image(f"r/{i}:1", f"r/{i}@sha256:{i}", f"id{i}", 1, float(i)) for i in range(40)
    }
    held = cache.held()
    assert len(held) == MAX_REPORTED
    assert held[:2] == ["r/39:1", "r/39@sha256:39"]
    assert (tmp_path / "containers").stat().st_mode & 0o777 == 0o700


def _doctor(tmp_path: Path, answers: dict[str, tuple[int, str]], **kw: object):  # type: ignore[no-untyped-def]
    """check_containers with a fake podman: ``answers`` by subcommand (info, run)."""
    import subprocess
    from collections import namedtuple

    from worker_agent.doctor.containers import check_containers

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "podman").write_text("#!/bin/sh\n")
    (bin_dir / "podman").chmod(0o755)
    (tmp_path / "busybox").write_bytes(b"\x7fELF")
    calls: list[list[str]] = []

    def run(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        code, out = answers[argv[1]]
        return subprocess.CompletedProcess(argv, code, out if code == 0 else "", out)

    usage = namedtuple("usage", "total used free")
    kw.setdefault("busybox", str(tmp_path / "busybox"))
    free = kw.pop("free", 100 << 30)
    finding = check_containers(
        env={"PATH": str(bin_dir)},
        run=run,
        usage=lambda _p: usage(0, 0, free),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    return finding, calls


INFO = '{"version": {"Version": "4.3.1"}, "store": {"graphRoot": "/var/lib/containers/storage"}}'


@pytest.mark.parametrize(
    ("answers", "kw", "status", "says"),
    [
        ({"info": (0, INFO), "run": (0, "")}, {}, "PASS", "podman 4.3.1: ran a trivial container"),
        ({"info": (0, INFO)}, {"busybox": ""}, "WARN", "no static busybox"),
        ({"info": (0, INFO), "run": (0, "")}, {"free": 1 << 30}, "WARN", "1.0 GiB free"),
        ({"info": (125, "Error: cannot setup namespace")}, {}, "FAIL", "cannot setup namespace"),
        (
            {"info": (0, INFO), "run": (126, "Error: runc: operation not permitted")},
            {},
            "FAIL",
            "cannot run a container: Error: runc",
        ),
        ({}, {"podman": "no-such-podman"}, "WARN", "no-such-podman not found"),
        ({}, {"podman": "no-such-podman", "enabled": "true"}, "FAIL", "not found"),
        ({}, {"enabled": "false"}, "PASS", "image jobs off"),
    ],
)
def test_doctor_containers_check(
    tmp_path: Path,
    answers: dict[str, tuple[int, str]],
    kw: dict[str, object],
    status: str,
    says: str,
) -> None:
    finding, calls = _doctor(tmp_path, answers, **kw)
    assert (finding.check, finding.status) == ("containers", status), finding
    assert says in finding.finding
    for argv in calls:
        if argv[1] == "run":  # the trivial container: no network, its own root filesystem
            assert argv[2:6] == ["--rm", "--network", "none", "--rootfs"]
            assert argv[7:] == ["/bin/busybox", "true"]
