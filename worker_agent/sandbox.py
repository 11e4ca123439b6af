"""Job isolation on the rig: a bubblewrap sandbox and an unprivileged job user.

Clients' code is untrusted. :func:`resolve` decides once, at agent start, what
isolation this rig can give (:class:`Isolation`); :func:`wrap` then turns each
job's argv into the argv that runs it isolated. ``wrap`` is pure, so what a job
gets is visible in a test without running anything::

    bwrap --ro-bind / /                     the whole system, read-only
          --dev /dev  --dev-bind-try /dev/nvidia* …   a minimal /dev plus the GPUs
          --proc /proc                      the job's own pid namespace only
          --perms 1777 --tmpfs /tmp         private /tmp (and /dev/shm)
          --tmpfs STATE_DIR …               the agent's secrets and other jobs' dirs hidden
          --bind CWD CWD --bind CKPT CKPT   the only writable places
          --chdir CWD --setenv HOME CWD
          --unshare-pid --unshare-ipc --unshare-uts --die-with-parent --new-session --
      setpriv --reuid U --regid G --clear-groups --no-new-privs --pdeathsig KILL --
          ARGV…

The ``setpriv`` part is there only when the agent runs as root: the job drops to
the job user (``rigshift-job`` when that user exists, else ``nobody``, or
``--job-user``). bwrap itself runs as root then (it needs no user namespaces),
and the drop happens inside the sandbox, just before the job's program starts,
with ``no_new_privs`` so no set-uid program can give root back. An agent that
runs unprivileged keeps its uid for its jobs and bwrap uses a user namespace.
Without bwrap (``--sandbox none``, or ``auto`` where it is missing or does not
work) the root agent still drops the job to the job user, without the sandbox.

The job's process tree lives in its own pid namespace: when bwrap's first
process (the job's ``ProcStarted`` pid) dies, the kernel kills everything in it.
bwrap answers a job killed by signal N with status 128 + N; :func:`exit_status`
turns that back into -N, as for an unsandboxed job.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker_agent.config import AgentConfig

__all__ = [
    "DEFAULT_JOB_USERS",
    "MODES",
    "Isolation",
    "SandboxError",
    "SandboxPolicy",
    "exit_status",
    "for_this_host",
    "policy_for",
    "prepare_dirs",
    "resolve",
    "wrap",
]

#: ``--sandbox`` values: ``auto`` uses bwrap when it is installed and works here.
MODES = ("auto", "bwrap", "none")

#: A root agent runs jobs as the first of these users that exists (unless ``--job-user``).
DEFAULT_JOB_USERS = ("rigshift-job", "nobody")

#: Where the agent's own secrets may live besides its state directory (hidden from jobs).
SECRET_PLACES = ("/etc/rigshift", "~/.config/rigshift", "~/.ray")


class SandboxError(Exception):
    """The isolation asked for cannot be had on this rig; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class SandboxPolicy:
    """What the operator asked for (``--sandbox``, ``--job-user``), before it is checked."""

    mode: str = "auto"
    """``auto``, ``bwrap`` or ``none`` (see :data:`MODES`)."""

    job_user: str = ""
    """User a root agent runs jobs as; empty picks from :data:`DEFAULT_JOB_USERS`."""

    hide: tuple[str, ...] = ()
    """Directories and files of the agent that jobs must not see (state dir, credentials)."""


def policy_for(config: AgentConfig) -> SandboxPolicy:
    """The policy of an agent's config; its state directory and Ray token are hidden from jobs."""
    return SandboxPolicy(
        mode=config.sandbox,
        job_user=config.job_user,
        hide=(str(config.state_dir), str(config.ray_token_path)),
    )


@dataclass(frozen=True, slots=True)
class Isolation:
    """The isolation in effect on this rig; travels with every Ray task to :func:`wrap`."""

    bwrap: str = ""
    """The bwrap executable; empty: no sandbox."""

    uid: int | None = None
    """The job user's uid when the agent is root and drops jobs to it; None keeps the uid."""

    gid: int | None = None
    """The job user's primary group."""

    user: str = ""
    """The name jobs run as (for the log)."""

    setpriv: str = "setpriv"
    """util-linux ``setpriv``, used to drop to the job user."""

    devices: tuple[str, ...] = ()
    """Device nodes bound into the sandbox (``/dev/nvidia*``)."""

    hidden: tuple[str, ...] = ()
    """Directories replaced by an empty tmpfs inside the sandbox."""

    masked: tuple[str, ...] = ()
    """Files replaced by ``/dev/null`` inside the sandbox."""

    notes: tuple[str, ...] = field(default=(), compare=False)
    """Why the isolation is weaker than asked (logged as warnings at start)."""

    @property
    def active(self) -> bool:
        """Whether jobs are wrapped at all."""
        return bool(self.bwrap) or self.uid is not None

    def describe(self) -> str:
        """One line for the agent's start log."""
        who = f"as {self.user}" + (f" (uid {self.uid})" if self.uid is not None else "")
        if self.bwrap:
            return (
                f"job isolation: bubblewrap sandbox (read-only system, private /tmp, "
                f"pid/ipc/uts namespaces, only the job's directories writable), jobs run {who}"
            )
        return f"job isolation: no sandbox, jobs run {who}"


def wrap(
    argv: Sequence[str],
    *,
    cwd: str,
    writable: Sequence[str],
    isolation: Isolation,
    readonly: Sequence[str] = (),
) -> list[str]:
    """The argv that runs ``argv`` in ``cwd`` isolated as ``isolation`` says (pure).

    ``writable`` are further directories the job may write (its checkpoint and output
    directories); ``readonly`` are directories it may only read although they lie in a
    hidden one (its Python environment and inputs, cached in the agent's state
    directory). Every path must exist. Without isolation ``argv`` comes back as is.
    """
    out: list[str] = []
    if isolation.bwrap:
        out += [isolation.bwrap, "--ro-bind", "/", "/", "--dev", "/dev"]
        for node in isolation.devices:
            out += ["--dev-bind-try", node, node]
        out += ["--proc", "/proc"]
        out += ["--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777", "--tmpfs", "/dev/shm"]
        for path in isolation.hidden:
            out += ["--tmpfs", path]
        for path in isolation.masked:
            out += ["--ro-bind", "/dev/null", path]
        binds = list(dict.fromkeys([cwd, *writable]))
        ro_binds = [p for p in dict.fromkeys(readonly) if p not in binds]
        # bwrap makes missing parents of a mount point 0700: the job user could not reach
        # its directories inside a hidden one, so those parents are made 0755 first.
        for parent in _parents_inside([*binds, *ro_binds], isolation.hidden):
            out += ["--perms", "0755", "--dir", parent]
        for path in binds:
            out += ["--bind", path, path]
        for path in ro_binds:
            out += ["--ro-bind", path, path]
        out += [
            "--chdir",
            cwd,
            "--setenv",
            "HOME",
            cwd,
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--die-with-parent",
            "--new-session",
            "--",
        ]
    if isolation.uid is not None:
        gid = isolation.gid if isolation.gid is not None else isolation.uid
        out += [
            isolation.setpriv,
            "--reuid",
            str(isolation.uid),
            "--regid",
            str(gid),
            "--clear-groups",
            "--no-new-privs",
            # A change of uid clears the parent-death signal; setpriv sets it after the change.
            "--pdeathsig",
            "KILL",
            "--",
        ]
    return [*out, *argv]


def _parents_inside(paths: Sequence[str], hidden: Sequence[str]) -> list[str]:
    """Directories strictly between a hidden directory and a path below it, top first."""
    out: dict[str, None] = {}
    for path in paths:
        p = PurePosixPath(path)
        for top in hidden:
            if p.is_relative_to(top) and p != PurePosixPath(top):
                for parent in reversed(p.parents):
                    if parent.is_relative_to(top) and parent != PurePosixPath(top):
                        out[str(parent)] = None
    return list(out)


def exit_status(code: int, isolation: Isolation | None) -> int:
    """The job's exit status as run_process reports it: bwrap's 128 + N becomes -N."""
    if isolation is not None and isolation.bwrap and 128 < code < 160:
        return 128 - code
    return code


def for_this_host(isolation: Isolation) -> Isolation:
    """``isolation`` without hidden or masked paths that do not exist here.

    bwrap cannot make a mount point under the read-only root, and a Ray task may
    run on another node of a site cluster than the one the agent resolved on.
    """
    return replace(
        isolation,
        hidden=tuple(p for p in isolation.hidden if os.path.isdir(p)),
        masked=tuple(p for p in isolation.masked if os.path.isfile(p)),
    )


def prepare_dirs(isolation: Isolation, dirs: Iterable[str]) -> None:
    """Give the job user its writable directories (recursively; links are not followed).

    A previous attempt of the same job may have left links in its checkpoint
    directory; ``lchown`` changes the link, never what it points to.
    """
    if isolation.uid is None:
        return
    uid, gid = isolation.uid, isolation.gid if isolation.gid is not None else isolation.uid
    for top in dirs:
        os.chown(top, uid, gid, follow_symlinks=False)
        for root, subdirs, files in os.walk(top):
            for name in [*subdirs, *files]:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _job_user(job_user: str) -> pwd.struct_passwd:
    names = [job_user] if job_user else list(DEFAULT_JOB_USERS)
    for name in names:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise SandboxError(
        f"job user {names[0]!r} does not exist: create it (useradd --system "
        f"--no-create-home --shell /usr/sbin/nologin rigshift-job) or pass --job-user"
    )


def _probe(isolation: Isolation) -> str:
    """Run ``true`` exactly as a job would run; an empty string when it works, else why not."""
    work = tempfile.mkdtemp(prefix="rigshift-sandbox-probe-")
    try:
        prepare_dirs(isolation, [work])
        argv = wrap(["true"], cwd=work, writable=(), isolation=for_this_host(isolation))
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=15, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return str(err)
        if done.returncode == 0:
            return ""
        lines = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"exit status {done.returncode}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _hidden_places(hide: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    dirs: list[str] = []
    files: list[str] = []
    for place in [*hide, *SECRET_PLACES]:
        path = os.path.abspath(os.path.expanduser(place))
        if path == "/":
            continue
        if os.path.isdir(path):
            dirs.append(path)
        elif os.path.isfile(path):
            files.append(path)
    return tuple(dict.fromkeys(dirs)), tuple(dict.fromkeys(files))


def resolve(policy: SandboxPolicy) -> Isolation:
    """The isolation this rig gives for ``policy``, checked by running a job-like ``true``.

    ``auto`` falls back to no sandbox (with a note) when bwrap is missing or does
    not work here (e.g. a container that allows neither mounts nor user
    namespaces); ``bwrap`` raises :class:`SandboxError` instead. A root agent
    always drops jobs to the job user (``--job-user root`` keeps root, with a note).
    """
    if policy.mode not in MODES:
        raise SandboxError(f"sandbox must be one of {', '.join(MODES)}, got {policy.mode!r}")
    linux = sys.platform.startswith("linux")
    notes: list[str] = []
    user = _current_user()
    uid = gid = None
    setpriv = (shutil.which("setpriv") if linux else None) or "setpriv"
    if linux and os.geteuid() == 0:
        pw = _job_user(policy.job_user)
        user = pw.pw_name
        if pw.pw_uid == 0:
            notes.append("jobs run as root (--job-user root): a job can do anything on this rig")
        elif not shutil.which("setpriv"):
            raise SandboxError("setpriv (util-linux) is needed to run jobs as " + user)
        else:
            uid, gid = pw.pw_uid, pw.pw_gid
    elif policy.job_user and policy.job_user != user:
        notes.append(
            f"--job-user {policy.job_user} ignored: the agent is not root, jobs run as {user}"
        )
    hidden, masked = _hidden_places(policy.hide)
    isolation = Isolation(
        uid=uid,
        gid=gid,
        user=user,
        setpriv=setpriv,
        devices=tuple(sorted(glob.glob("/dev/nvidia*"))),
        hidden=hidden,
        masked=masked,
    )
    if policy.mode != "none":
        bwrap = shutil.which("bwrap") if linux else None
        if bwrap is None:
            problem = "bwrap not found (install the bubblewrap package)"
        else:
            problem = _probe(replace(isolation, bwrap=bwrap))
            if problem:
                problem = f"bwrap does not work here: {problem}"
        if not problem:
            isolation = replace(isolation, bwrap=bwrap or "")
        elif policy.mode == "bwrap":
            raise SandboxError(f"--sandbox bwrap: {problem}")
        else:
            notes.append(f"no sandbox: {problem}")
    return replace(isolation, notes=tuple(notes))
