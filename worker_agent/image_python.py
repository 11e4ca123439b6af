"""Python requirements on top of a job's image: its Python, probed, and uv's target for it.

A job with both ``image`` and ``python_requirements`` runs in its image with the
requirements installed on top of the image's own ``python3``. The container has no
network, so nothing is installed inside it: the agent asks the image which Python it
has (:data:`PROBE_CODE`, run as ``podman run --rm --network none --entrypoint ""
IMAGE python3 -c ...``; :func:`parse_probe`), then installs the requirements on the
host with uv for that target (``uv pip install --target DIR --python-version X.Y
--python-platform P``; :func:`install_target`), with the rig's package sources as for
any environment (``environments.py``). The directory is cached per (image digest,
requirements) by :class:`~worker_agent.environments.EnvironmentCache` and mounted
read-only at :data:`~worker_agent.containers.SITE_DIR`, first on ``PYTHONPATH``.

The target platform (:func:`python_platform`), from what the image's Python says:

=========================  ==================================================
image                      ``--python-platform``
=========================  ==================================================
glibc 2.N, N >= 17         ``<machine>-manylinux_2_K``, K the newest uv knows
                           that is <= N (2.36 → 2_36, 2.30 → 2_28, 2.41 → 2_40)
glibc older than 2.17      ``<machine>-unknown-linux-gnu`` (pure-Python and
                           source packages only, in practice)
musl (``/lib/ld-musl-*``)  ``<machine>-unknown-linux-musl``
anything else on Linux     ``<machine>-unknown-linux-gnu``
=========================  ==================================================

``<machine>`` is ``x86_64`` or ``aarch64`` (``amd64``/``arm64`` accepted). An image
whose Python is not CPython, or for another machine, is the client's setup error, as
is an image without ``python3``. Packages that have no wheel for the target are built
from source on the host, for the host: fine for pure-Python ones, not for extensions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from worker_agent.setup_failures import SetupError

__all__ = [
    "PROBE_CODE",
    "ImagePython",
    "InstallTarget",
    "install_target",
    "no_python_message",
    "parse_probe",
    "portable_scripts",
    "probe_argv",
    "python_platform",
]

#: What ``python3 -c`` prints inside the image: one JSON object (:class:`ImagePython`).
PROBE_CODE = (
    "import glob, json, os, platform, sys; print(json.dumps({"
    "'version': '%d.%d' % sys.version_info[:2], "
    "'implementation': sys.implementation.name, "
    "'machine': platform.machine(), "
    "'libc': platform.libc_ver()[0], "
    "'libc_version': platform.libc_ver()[1], "
    "'musl': bool(glob.glob('/lib/ld-musl-*')), "
    "'path': os.environ.get('PATH', '')}))"
)

#: The manylinux glibc minors uv 0.13 accepts in ``--python-platform`` (2_17 .. 2_40).
MANYLINUX_MINORS = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)

_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True, slots=True)
class ImagePython:
    """The ``python3`` of an image, as it describes itself (:data:`PROBE_CODE`)."""

    version: str
    """``major.minor``."""
    implementation: str
    """``sys.implementation.name`` (``cpython``)."""
    machine: str
    """``platform.machine()``."""
    libc: str = ""
    """``glibc``, or "" when Python cannot tell (musl, static)."""
    libc_version: str = ""
    """``2.36``."""
    musl: bool = False
    """A musl loader is in ``/lib``."""
    path: str = ""
    """The image's ``PATH`` (a job's ``PATH`` is that, after the site's ``bin``)."""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class InstallTarget:
    """Where and for what :class:`~worker_agent.environments.EnvironmentCache` installs
    requirements instead of a venv of the rig's interpreter: ``uv pip install --target``."""

    identity: str
    """Part of the cache key: the image digest and the target's uv flags."""
    uv_args: tuple[str, ...]
    """``--python-version X.Y --python-platform P``."""


def probe_argv(podman: str, image: str, rig: str = "") -> list[str]:
    """The probe's ``podman run``: no network, no entrypoint, nothing mounted."""
    argv = [podman, "run", "--rm", "--pull", "never", "--network", "none", "--entrypoint", ""]
    if rig:
        argv += ["--label", f"rigshift.rig={rig}"]
    return [*argv, image, "python3", "-c", PROBE_CODE]


def no_python_message(reference: str) -> str:
    return f"image {reference} has no python3 to install python_requirements into"


def parse_probe(reference: str, code: int, output: str) -> ImagePython:
    """The probe's result: its Python, or SetupError (the client's when the image has no
    ``python3``; the rig's when podman itself failed)."""
    lower = output.lower()
    if code != 0:
        missing = ("executable file not found", "no such file or directory", "not found")
        if code == 127 or ("python3" in lower and any(m in lower for m in missing)):
            raise SetupError(no_python_message(reference), "client")
        last = (output.strip().splitlines() or ["no output"])[-1]
        raise SetupError(f"cannot run python3 in image {reference}: {last}", "rig")
    for line in reversed(output.strip().splitlines()):
        try:
            data = json.loads(line)
            return ImagePython(**data)
        except (ValueError, TypeError):
            continue
    raise SetupError(f"image {reference}: python3 did not describe itself: {output!r}", "client")


def python_platform(python: ImagePython) -> str:
    """uv's ``--python-platform`` for this image (the table in the module docstring)."""
    machine = _MACHINES.get(python.machine.lower())
    if machine is None:
        raise SetupError(
            f"no packages can be installed for the image's machine {python.machine!r}", "client"
        )
    if python.libc == "glibc":
        major, _, minor = python.libc_version.partition(".")
        if major == "2" and minor.split(".")[0].isdigit():
            n = int(minor.split(".")[0])
            fits = [m for m in MANYLINUX_MINORS if m <= n]
            if fits:
                return f"{machine}-manylinux_2_{fits[-1]}"
    if python.musl:
        return f"{machine}-unknown-linux-musl"
    return f"{machine}-unknown-linux-gnu"


def install_target(reference: str, digest_ref: str, python: ImagePython) -> InstallTarget:
    """The uv target of an image's Python, keyed by the image's digest; SetupError (the
    client's) when it is not a CPython uv can install for."""
    if python.implementation != "cpython":
        raise SetupError(
            f"image {reference}: its python3 is {python.implementation} {python.version}; "
            "python_requirements need CPython",
            "client",
        )
    platform = python_platform(python)
    args = ("--python-version", python.version, "--python-platform", platform)
    return InstallTarget(identity="\0".join(("image", digest_ref, *args)), uv_args=args)


def portable_scripts(bin_dir: Path) -> None:
    """Point the console scripts uv wrote for the host's Python at the image's
    (``#!/usr/bin/env python3``)."""
    if not bin_dir.is_dir():
        return
    for path in bin_dir.iterdir():
        if not path.is_file() or path.is_symlink():
            continue
        with path.open("rb") as f:
            first = f.readline()
        if first.startswith(b"#!") and b"python" in first:
            rest = path.read_bytes()[len(first) :]
            path.write_bytes(b"#!/usr/bin/env python3\n" + rest)
