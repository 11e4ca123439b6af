"""Jobs that bring a container image: the runtime (podman), pull failures, the run command.

What is pure lives here (the unit tests drive it without a process): which podman
the agent uses (:func:`detect`, run once at start), whose fault a failed pull was
(:func:`classify_pull_failure`), and the exact ``podman run`` command of an attempt
(:func:`podman_run_argv`, :func:`container_launch`). Pulling and caching images is
``images.py``.

**What a container job sees.** Its image, its own working, checkpoint and output
directories and its inputs (read-only), each mounted at the same path as on the rig
(the ``RIGSHIFT_*`` variables hold the same values inside and out), the job's
environment and Rigshift's variables, exactly its GPUs (CDI ``nvidia.com/gpu=<i>`` on
NVML rigs; ``CUDA_VISIBLE_DEVICES`` on simulated ones), and the network the operator
allows (``[containers] network``, ``none`` by default). Never the agent's state
directory, its tokens and credentials, nor the pull's auth file: nothing else is
mounted. The process the executor launches is ``podman run`` itself, so logs, exit
status, energy metering and the lease fence work as for any job; the agent removes the
container when the attempt ends, whatever the way (``images.py``). A job with
``python_requirements`` also gets the directory they were installed into for the
image's Python (``image_python.py``), read-only at :data:`SITE_DIR`, first on
``PYTHONPATH`` (its ``bin`` first on the image's ``PATH``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from worker_agent.config import ContainersConfig
from worker_agent.launch import SECRET_ENV, LaunchSpec

__all__ = [
    "SITE_DIR",
    "PodmanRuntime",
    "classify_pull_failure",
    "container_env_names",
    "container_launch",
    "container_name",
    "detect",
    "image_name",
    "podman_run_argv",
]

log = logging.getLogger("rigshift.agent.containers")


@dataclass(frozen=True, slots=True)
class PodmanRuntime:
    """A podman that works: its executable and version (reported at registration)."""

    path: str
    version: str
    name: str = "podman"


def detect(config: ContainersConfig, env: Mapping[str, str] | None = None) -> PodmanRuntime | None:
    """The podman this agent runs image jobs with, or None (disabled, missing, broken).

    Runs ``podman version --format json`` once, with the agent's environment (podman's own
    configuration, ``CONTAINERS_CONF`` and the like, passes through unchanged).
    """
    if config.enabled == "false":
        return None
    env = dict(os.environ if env is None else env)
    path = shutil.which(config.podman, path=env.get("PATH"))
    loud = log.error if config.enabled == "true" else log.info
    if path is None:
        loud("no container runtime: %s not found; image jobs go to other rigs", config.podman)
        return None
    try:
        done = subprocess.run(
            [path, "version", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
        info = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError) as err:
        loud("no container runtime: %s version failed: %s", path, err)
        return None
    if not isinstance(info, dict):
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        loud("no container runtime: %s version failed: %s", path, why[0])
        return None
    client = info.get("Client") or info
    version = str(client.get("Version", "")) if isinstance(client, dict) else ""
    log.info("container runtime: podman %s (%s)", version or "?", path)
    return PodmanRuntime(path, version)


# --- pull failures -------------------------------------------------------------------

_MISSING = ("manifest unknown", "not found", "name unknown", "no such image")
_DENIED = (
    "unauthorized",
    "denied",
    "authentication required",
    "invalid username/password",
    "forbidden",
)
_UNREACHABLE = (
    "connection refused",
    "i/o timeout",
    "timeout",
    "timed out",
    "no such host",
    "temporary failure in name resolution",
    "server misbehaving",
    "network is unreachable",
    "no route to host",
    "connection reset",
    "tls handshake",
    "pinging container registry",
    "eof",
)
_DISK = ("no space left on device", "disk quota exceeded")
_BAD_REF = ("invalid reference format", "repository name must")


def classify_pull_failure(reference: str, output: str) -> tuple[str, str]:
    """``(cause, message)`` of a failed ``podman pull``: ``"client"`` when the image does
    not exist or access to it is denied (every rig would fail the same way: the job fails
    at once), ``"rig"`` when the registry cannot be reached, the disk is full, or podman
    failed for a reason not recognised (the attempt is requeued elsewhere). The message
    names the reference and podman's last error line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith(("error", "time="))]
    last = (errors or lines or ["podman failed without saying why"])[-1]
    last = re.sub(r'^time="[^"]*" level=\w+ msg="(.*)"$', r"\1", last)
    last = re.sub(r"^Error:\s*", "", last)
    lower = " ".join(lines).lower()
    if any(m in lower for m in _DISK):
        return "rig", f"disk full pulling image {reference}: {last}"
    if any(m in lower for m in _DENIED):
        return "client", f"access to image {reference} denied: {last}"
    # "not found" also ends DNS errors ("lookup x: no such host"); those are the rig's.
    dns = any(m in lower for m in ("no such host", "name resolution"))
    if any(m in lower for m in _MISSING) and not dns:
        return "client", f"image {reference} not found: {last}"
    if any(m in lower for m in _BAD_REF):
        return "client", f"invalid image reference {reference}: {last}"
    if any(m in lower for m in _UNREACHABLE):
        return "rig", f"registry of image {reference} unreachable: {last}"
    return "rig", f"pulling image {reference} failed: {last}"


def image_name(reference: str) -> str:
    """The repository of a reference, without its tag or digest
    (``reg:5000/org/x:1`` → ``reg:5000/org/x``)."""
    name = reference.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


# --- the run command -----------------------------------------------------------------

#: Where an image job's requirements (installed on the rig for the image's Python) are
#: mounted, read-only.
SITE_DIR = "/opt/rigshift/site"


def container_name(job: str, attempt: int) -> str:
    """``rigshift-<job id>-<attempt>``: one container per attempt, found again by name."""
    job_id = re.sub(r"[^A-Za-z0-9_.-]", "_", job.rpartition("/")[2]) or "job"
    return f"rigshift-{job_id}-{attempt}"


#: Variables of the agent's own environment a container job gets (besides its own and
#: Rigshift's): none of the host's paths, which mean nothing inside the image.
_PASSED = ("CUDA_DEVICE_ORDER", "PYTHONUNBUFFERED")


def container_env_names(
    env: Mapping[str, str], job_env: Mapping[str, str], *, nvml: bool
) -> list[str]:
    """The variables a container job gets: its own, Rigshift's, and the GPU binding
    (``CUDA_VISIBLE_DEVICES`` on simulated rigs only: with CDI the container sees its
    GPUs alone)."""
    names = set(job_env) | {n for n in env if n.startswith("RIGSHIFT_")} | set(_PASSED)
    if not nvml:
        names.add("CUDA_VISIBLE_DEVICES")
    names -= set(SECRET_ENV)
    return sorted(n for n in names if n in env and not n.startswith("RAY_AUTH"))


def podman_run_argv(
    *,
    podman: str,
    name: str,
    image: str,
    command: Sequence[str],
    network: str,
    gpu_indices: Sequence[int],
    nvml: bool,
    cwd: str,
    writable: Sequence[str],
    readonly: Sequence[str],
    env: Mapping[str, str],
    rig: str = "",
    site: str = "",
) -> list[str]:
    """The ``podman run`` command of one attempt.

    ``writable`` (working, checkpoint, output directories) and ``readonly`` (inputs and
    what they link to) are mounted at the same paths, nothing else; ``env`` is exactly
    what the container gets. ``--pull never``: the image was pulled in ``PREPARING``,
    with the job's credentials, which are gone by now. ``rig`` labels the container
    ``rigshift.rig=<rig>``, so that an agent restarted after a crash removes what it left.
    ``site`` (the job's requirements for the image's Python) is mounted read-only at
    :data:`SITE_DIR`.
    """
    argv = [podman, "run", "--rm", "--name", name]
    if rig:
        argv += ["--label", f"rigshift.rig={rig}"]
    argv += ["--pull", "never", "--network", network]
    if nvml:
        argv += [f"--device=nvidia.com/gpu={i}" for i in gpu_indices]
    seen: set[str] = set()
    for path, mode in [(cwd, "rw"), *((p, "rw") for p in writable), *((p, "ro") for p in readonly)]:
        if path and path not in seen:
            seen.add(path)
            argv += ["-v", f"{path}:{path}:{mode}"]
    if site:
        argv += ["-v", f"{site}:{SITE_DIR}:ro"]
    argv += ["--workdir", cwd]
    for key in sorted(env):
        argv += ["-e", f"{key}={env[key]}"]
    return [*argv, image, *command]


def container_launch(
    spec: LaunchSpec,
    *,
    podman: str,
    image: str,
    network: str,
    nvml: bool,
    job_env: Mapping[str, str],
    agent_env: Mapping[str, str],
    rig: str = "",
    site: str = "",
    image_path: str = "",
) -> LaunchSpec:
    """The attempt ``spec`` (the job's own command, environment and directories) as a
    ``podman run`` of ``image``: the process the executor launches, outside the sandbox
    (the container is the isolation), with the agent's environment minus its secrets.
    ``site``: the job's requirements, installed for the image's Python, whose ``PATH`` is
    ``image_path``."""
    inner = {k: spec.env[k] for k in container_env_names(spec.env, job_env, nvml=nvml)}
    if site:
        own = job_env.get("PYTHONPATH", "")
        inner["PYTHONPATH"] = f"{SITE_DIR}:{own}" if own else SITE_DIR
        if image_path and os.path.isdir(os.path.join(site, "bin")) and "PATH" not in job_env:
            inner["PATH"] = f"{SITE_DIR}/bin:{image_path}"
    writable = [
        spec.env[n] for n in ("RIGSHIFT_CHECKPOINT_DIR", "RIGSHIFT_OUTPUT_DIR") if spec.env.get(n)
    ]
    name = container_name(spec.job, spec.attempt)
    argv = podman_run_argv(
        podman=podman,
        name=name,
        image=image,
        command=spec.argv,
        network=network,
        gpu_indices=spec.gpu_indices,
        nvml=nvml,
        cwd=spec.cwd,
        writable=writable,
        readonly=spec.readonly,
        env=inner,
        rig=rig,
        site=site,
    )
    outer = {
        k: v for k, v in agent_env.items() if k not in SECRET_ENV and not k.startswith("RAY_AUTH")
    }
    return replace(spec, argv=argv, env=outer, readonly=(), container=name)
