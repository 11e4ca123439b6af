"""Which Python interpreter a rig's job environments are built on, and what names them.

An environment built on one interpreter is useless on another, so its cache key
(:func:`environment_key`) carries the interpreter's version, platform and
implementation (:func:`interpreter_identity`). :func:`job_python` picks the
interpreter: the configured one, else the agent's own unless the job user cannot run
it. ``environments.py`` builds and caches the environments themselves.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

__all__ = ["SYSTEM_PYTHONS", "environment_key", "interpreter_identity", "job_python"]

_IDENTITY_CODE = (
    "import platform, sys, sysconfig; "
    "print(platform.python_version(), sysconfig.get_platform(), sys.implementation.name, "
    "sep='\\0')"
)


def interpreter_identity(python: str = sys.executable) -> str:
    """``version\\0platform\\0implementation`` of an interpreter (asks it unless it is
    this one); raises OSError or subprocess.SubprocessError when it cannot be run."""
    if python == sys.executable:
        return "\0".join(
            (platform.python_version(), sysconfig.get_platform(), sys.implementation.name)
        )
    done = subprocess.run(
        [python, "-c", _IDENTITY_CODE], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def environment_key(requirements_sha256: str, interpreter: str | None = None) -> str:
    """The cache directory name of an environment for these requirements.

    sha256 hex of ``requirements_sha256`` and the interpreter's Python version
    (major.minor.micro), platform (``sysconfig.get_platform()``) and
    implementation (:func:`interpreter_identity`, default this one), so that a
    Python upgrade never reuses an old environment.
    """
    identity = interpreter if interpreter is not None else interpreter_identity()
    return hashlib.sha256(f"{requirements_sha256}\0{identity}".encode()).hexdigest()


def _usable_by_others(path: str) -> bool:
    """True when any user may execute ``path``: every directory on its real path is
    searchable (o+x) and the file itself executable (o+x)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & 0o001:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in real.parents)
    except OSError:
        return False


#: Where a rig's system Python usually is, tried when the agent's own is private.
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


def job_python(configured: str, job_uid: int | None, log: Callable[[str], None]) -> str:
    """The interpreter job environments are built on.

    ``[environments] python`` when set; else the agent's own, unless jobs run as another
    user (``job_uid``) who cannot execute it (a Python under ``/root/.pyenv``, mode
    0700): then the first system Python that any user can run, with a warning through
    ``log``. An environment's ``bin/python`` links to that interpreter, so the job user
    must be able to run it or every job with requirements fails with "Permission denied".
    """
    if configured:
        return configured
    own = sys.executable
    if job_uid is None or job_uid == os.geteuid() or _usable_by_others(own):
        return own
    for candidate in SYSTEM_PYTHONS:
        if os.path.exists(candidate) and _usable_by_others(candidate):
            log(
                f"job environments: the agent's Python {own} is not usable by the job user "
                f"(uid {job_uid}); building them on {candidate} "
                "(set [environments] python to choose)"
            )
            return candidate
    log(
        f"job environments: the agent's Python {own} is not usable by the job user "
        f"(uid {job_uid}) and no system Python is; jobs with requirements will fail to "
        "start (set [environments] python, or run the agent from a system-wide Python)"
    )
    return own
