"""The rig's cache of per-job Python environments, built with uv.

A job that brings a pip requirements file runs in a virtual environment made for
those requirements. :class:`EnvironmentCache` builds one per
:func:`environment_key` (the requirements' sha256 plus this interpreter's
version, platform and implementation), reuses it for every later job with the
same requirements, and evicts the least recently used ones that no job is using
once they take more than ``[environments] max_cache_gb``.

Layout under the cache root (the agent passes ``state_dir/environments``)::

    <key>/                    the venv (relocatable), ready to use
    <key>.json                requirements_sha256, size_bytes, last_used (written atomically)
    <key>.building-<random>/  a build under way; renamed to <key>/ only when it succeeded

Metadata is written before the rename, so a ``<key>/`` directory with its
``<key>.json`` is a complete environment; anything else (a half-built directory,
a directory without metadata, metadata without a directory, an environment for
another interpreter) is removed when the cache is opened again. The venv is made
with ``uv venv --relocatable``: console scripts and activation scripts find the
interpreter relative to themselves, so they keep working after the rename.

Building is ``uv venv --relocatable --python <python> <dir>`` then
``uv pip install --python <dir>/bin/python <sources> -r <requirements>``. uv is
the binary of the PyPI ``uv`` package (``uv.find_uv_bin()``), else ``uv`` on
``PATH``. It runs with the agent's environment, so it reads its own ``UV_*``
variables itself (``UV_CACHE_DIR``, ``UV_OFFLINE``, ``UV_HTTP_TIMEOUT``, ...) and
uses its global cache: a second environment with the same packages hard-links
them instead of downloading them again.

An image job's requirements (``use(..., target=...)``, see ``image_python.py``) are
built the same way into the same cache, keyed by the image's digest and Python instead
of this interpreter, as ``uv pip install --target <dir> --python-version X.Y
--python-platform P <sources> -r <requirements>``; console scripts in ``<dir>/bin`` get
``#!/usr/bin/env python3``. Their metadata carries the target's identity.

Package sources. uv does not read pip's configuration, so the sources are given
as flags, in this order:

- ``--index-url``: ``[environments] index_url``; else ``$PIP_INDEX_URL`` unless
  ``$UV_INDEX_URL`` or ``$UV_DEFAULT_INDEX`` is set (uv reads those itself); else
  ``--no-index`` when ``$PIP_NO_INDEX`` is true (only ``find_links`` then).
- ``--extra-index-url`` for each of ``extra_index_urls``, then ``$UV_EXTRA_INDEX_URL``
  and ``$PIP_EXTRA_INDEX_URL`` (both space-separated).
- ``--find-links`` for each of ``find_links``, then ``$UV_FIND_LINKS``
  (comma-separated) and ``$PIP_FIND_LINKS`` (space-separated).

The ``UV_*`` values are repeated as flags because a flag replaces uv's variable
instead of adding to it. ``PIP_FIND_LINKS`` matters on rigs that keep local
builds: with ``PIP_FIND_LINKS=/opt/wheels`` holding ``torch==2.13.0+cpu``, a job
asking for ``torch==2.13.0`` gets that wheel instead of gigabytes of CUDA torch
from PyPI (a job asking for a torch version that is not there still downloads
it). Note that uv, unlike pip, prefers extra indexes over the main one and takes
a package from the first index that has it.

Errors: every failure is a :class:`SetupError` whose ``cause`` says whose fault
it is, ``"client"`` (the job's requirements: a version no index has, a conflict,
a package that fails to build, an unparsable file) or ``"rig"`` (disk full, index
unreachable, timeout, uv missing, anything not recognised); see
:func:`classify_failure`. A build that takes longer than ``max_setup_s`` or whose
callers are all cancelled is killed with its whole process group and its
directory removed.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import dataclasses
import errno
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker_agent.config import EnvironmentsConfig
from worker_agent.image_python import InstallTarget, portable_scripts
from worker_agent.interpreters import environment_key, interpreter_identity
from worker_agent.setup_failures import SetupError, classify_failure

__all__ = [
    "Environment",
    "EnvironmentCache",
    "SetupError",
    "classify_failure",
    "environment_key",
    "interpreter_identity",
]

#: Prefix of the lines the agent itself writes into a job's logs.
PREFIX = "[rigshift-agent]"

#: :meth:`EnvironmentCache.held` reports at most this many environments.
MAX_HELD = 64

#: Lines of installer output kept for :func:`classify_failure`.
TAIL_LINES = 200

_BUILDING = ".building-"
_METADATA = ".json"
_TMP = ".tmp-"
_REQUIREMENTS_FILE = "rigshift-requirements.txt"

Log = Callable[[str], None]


# --- the cache ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    """A ready virtual environment, held in use while its :meth:`EnvironmentCache.use` is open."""

    key: str
    """:func:`environment_key` of its requirements (the directory name)."""

    requirements_sha256: str
    """sha256 of the requirements it was built from."""

    path: Path
    """The venv root."""

    built: bool
    """True when this ``use()`` installed it; False when reused (from the cache, or built
    by a concurrent ``use()`` with the same requirements that this one waited for)."""

    def bin_dir(self) -> Path:
        """The venv's ``bin`` directory (``python``, console scripts)."""
        return self.path / "bin"

    def env_vars(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with ``VIRTUAL_ENV=path``, ``bin_dir`` first on ``PATH``, no ``PYTHONHOME``."""
        env = dict(base)
        env.pop("PYTHONHOME", None)
        env["VIRTUAL_ENV"] = str(self.path)
        rest = base.get("PATH", "")
        env["PATH"] = f"{self.bin_dir()}:{rest}" if rest else str(self.bin_dir())
        return env


@dataclass
class _Entry:
    requirements_sha256: str
    size_bytes: int
    last_used: float
    target: str = ""
    """:attr:`InstallTarget.identity`, or "" for a venv of this rig's interpreter."""


@dataclass
class _Build:
    """One build under way, shared by every ``use()`` with its key."""

    sinks: list[Log]
    task: asyncio.Task[Environment] | None = None
    waiters: int = 0
    started: float = field(default_factory=time.monotonic)

    def log(self, text: str) -> None:
        for sink in list(self.sinks):
            sink(text)


class EnvironmentCache:
    """Python environments on this rig, one per requirements file, built once and reused.

    ``python`` is the interpreter the venvs are made with (the agent's own by default;
    see :func:`worker_agent.interpreters.job_python` for a rig whose jobs run as another user),
    ``environ`` the environment uv runs with (default ``os.environ``), ``uv`` a
    path to the uv binary to use instead of looking for one (tests pass a wrapper).
    All methods are called from one event loop.
    """

    def __init__(
        self,
        root: Path,
        config: EnvironmentsConfig,
        *,
        python: str = sys.executable,
        environ: Mapping[str, str] | None = None,
        uv: str | None = None,
    ) -> None:
        self.root = root
        self.config = config
        self._python = python
        self._identity = interpreter_identity(python)
        self._environ = environ if environ is not None else os.environ
        self._uv = uv
        self._uv_version: str | None = None
        self._entries: dict[str, _Entry] = {}
        self._in_use: collections.Counter[str] = collections.Counter()
        self._builds: dict[str, _Build] = {}
        self._last_stamp = 0.0
        root.mkdir(parents=True, exist_ok=True)
        self._load()

    # --- public ---

    @contextlib.asynccontextmanager
    async def use(
        self,
        requirements_sha256: str,
        requirements: str,
        log: Log,
        target: InstallTarget | None = None,
    ) -> AsyncIterator[Environment]:
        """Yield a ready environment for these requirements, building it unless cached.

        While the context is open the environment is in use and never evicted.
        Concurrent callers with the same key wait for one build and share its
        failure (each gets the same :class:`SetupError`). ``log`` receives the
        installer's output as it comes (text chunks ending in newlines) and the
        agent's own lines (``[rigshift-agent] environment <key12>: installing ...``,
        ``... ready in 4.2 s``, ``... reused (cached), nothing installed``).
        Cancelling the last caller of a build kills it. Raises SetupError.
        With ``target``, the environment is a ``--target`` directory for an image's Python
        (module docstring), not a venv.
        """
        key = environment_key(requirements_sha256, target.identity if target else self._identity)
        self._in_use[key] += 1
        try:
            env = await self._acquire(key, requirements_sha256, requirements, log, target)
            yield env
        finally:
            self._in_use[key] -= 1
            if self._in_use[key] <= 0:
                del self._in_use[key]
            if key in self._entries:
                self._touch(key)

    def held(self) -> list[str]:
        """requirements_sha256 of the environments on disk, most recently used first (at most 64).

        Reported to the broker for the scheduler's locality score.
        """
        venvs = (e for e in self._entries.values() if not e.target)
        recent = sorted(venvs, key=lambda e: e.last_used, reverse=True)
        return [e.requirements_sha256 for e in recent[:MAX_HELD]]

    def evict(self) -> list[str]:
        """Remove least recently used environments not in use until the total fits ``max_cache_gb``.

        Returns the removed keys. Called after every build. Environments in use
        stay even when they alone exceed the limit.
        """
        limit = self.config.max_cache_gb * 1e9
        total = sum(e.size_bytes for e in self._entries.values())
        removed: list[str] = []
        by_age = sorted(self._entries.items(), key=lambda item: item[1].last_used)
        for key, entry in by_age:
            if total <= limit:
                break
            if self._in_use.get(key):
                continue
            self._remove(key)
            total -= entry.size_bytes
            removed.append(key)
        return removed

    # --- acquiring ---

    async def _acquire(
        self, key: str, sha: str, requirements: str, log: Log, target: InstallTarget | None
    ) -> Environment:
        path = self.root / key
        if key in self._entries:
            if path.is_dir():
                self._touch(key)
                log(f"{PREFIX} environment {key[:12]} reused (cached), nothing installed\n")
                return Environment(key, sha, path, built=False)
            self._remove(key)  # someone deleted it under us: build it again
        build = self._builds.get(key)
        first = build is None
        if build is None:
            build = _Build(sinks=[log])
            build.task = asyncio.create_task(self._build(key, sha, requirements, build, target))
            build.task.add_done_callback(_retrieve)
            self._builds[key] = build
        else:
            build.sinks.append(log)
            log(f"{PREFIX} environment {key[:12]}: waiting for the build already under way\n")
        task = build.task
        assert task is not None
        waited_from = time.monotonic()
        build.waiters += 1
        try:
            env = await asyncio.shield(task)
        except asyncio.CancelledError:
            build.waiters -= 1  # (only counted while the build runs)
            if build.waiters == 0 and not task.done():
                # Nobody wants it any more: kill the build and wait for its cleanup.
                if self._builds.get(key) is build:
                    del self._builds[key]
                task.cancel()
                await asyncio.wait({task})
            raise
        finally:
            with contextlib.suppress(ValueError):
                build.sinks.remove(log)
        if first:
            return env
        log(
            f"{PREFIX} environment {key[:12]} ready in {time.monotonic() - waited_from:.1f} s "
            "(built for a concurrent attempt)\n"
        )
        return dataclasses.replace(env, built=False)

    # --- building ---

    async def _build(
        self,
        key: str,
        sha: str,
        requirements: str,
        build: _Build,
        target: InstallTarget | None = None,
    ) -> Environment:
        tmp = self.root / f"{key}{_BUILDING}{secrets.token_hex(4)}"
        try:
            try:
                async with asyncio.timeout(self.config.max_setup_s):
                    size = await self._install(key, tmp, requirements, build.log, target)
            except TimeoutError:
                raise SetupError(
                    f"setup took longer than {self.config.max_setup_s:g} s", "rig"
                ) from None
            identity = target.identity if target else ""
            self._write_metadata(key, _Entry(sha, size, self._stamp(), identity))
            final = self.root / key
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError as err:
            _remove_tree(tmp)
            with contextlib.suppress(FileNotFoundError):
                (self.root / f"{key}{_METADATA}").unlink()
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            raise SetupError(f"disk full: {err}" if full else str(err), "rig") from err
        except BaseException:
            _remove_tree(tmp)
            raise
        finally:
            if self._builds.get(key) is build:
                del self._builds[key]
        self._entries[key] = _Entry(sha, size, self._last_stamp, identity)
        build.log(
            f"{PREFIX} environment {key[:12]} ready in {time.monotonic() - build.started:.1f} s\n"
        )
        self.evict()
        return Environment(key, sha, final, built=True)

    async def _install(
        self, key: str, tmp: Path, requirements: str, log: Log, target: InstallTarget | None
    ) -> int:
        """Make the venv in ``tmp`` and install the requirements (or install them with
        ``--target tmp`` for ``target``); its size in bytes."""
        uv = self._find_uv()
        version = await self._version(uv)
        count = _count_requirements(requirements)
        noun = "requirement" if count == 1 else "requirements"
        sources = _source_args(self.config, self._environ)
        if target is not None:
            log(
                f"{PREFIX} environment {key[:12]}: installing {count} {noun} for the image's "
                f"Python ({' '.join(target.uv_args)}) with uv {version}\n"
            )
            tmp.mkdir()
            (req_file := tmp / _REQUIREMENTS_FILE).write_text(requirements)
            argv = [uv, "pip", "install", "--target", str(tmp), "--python", self._python]
            await self._run([*argv, *target.uv_args, *sources, "-r", str(req_file)], log)
            req_file.unlink()
            (tmp / ".lock").unlink(missing_ok=True)  # uv's, while it installed
            await asyncio.to_thread(portable_scripts, tmp / "bin")
            return await asyncio.to_thread(_tree_bytes, tmp)
        log(f"{PREFIX} environment {key[:12]}: installing {count} {noun} with uv {version}\n")
        await self._run([uv, "venv", "--relocatable", "--python", self._python, str(tmp)], log)
        req_file = tmp / _REQUIREMENTS_FILE
        req_file.write_text(requirements)
        python = str(tmp / "bin" / "python")
        await self._run(
            [uv, "pip", "install", "--python", python, *sources, "-r", str(req_file)], log
        )
        return await asyncio.to_thread(_tree_bytes, tmp)

    def _find_uv(self) -> str:
        if self._uv is not None:
            if not os.access(self._uv, os.X_OK):
                raise SetupError(f"uv not found at {self._uv}", "rig")
            return self._uv
        try:
            import uv as uv_package

            return uv_package.find_uv_bin()
        except (ImportError, FileNotFoundError):
            pass
        found = shutil.which("uv", path=self._environ.get("PATH"))
        if found is None:
            raise SetupError("uv is not installed on this rig (pip install uv)", "rig")
        return found

    async def _version(self, uv: str) -> str:
        if self._uv_version is None:
            out: list[str] = []
            await self._run([uv, "--version"], out.append)
            words = "".join(out).split()
            self._uv_version = words[1] if len(words) > 1 else "(unknown version)"
        return self._uv_version

    async def _run(self, argv: list[str], log: Log) -> None:
        """Run argv in its own process group, streaming its output to ``log``.

        Raises SetupError (classified from the output's tail) when it fails; kills
        the whole group when cancelled (a timeout is a cancellation too).
        """
        spawn = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(self._environ),
                cwd=self.root,
                start_new_session=True,
            )
        )
        try:
            proc = await asyncio.shield(spawn)
        except OSError as err:
            raise SetupError(f"cannot run uv: {err}", "rig") from err
        except asyncio.CancelledError:
            # The process may have started (and forked) already: finish the spawn, kill it all.
            with contextlib.suppress(OSError):
                await _kill_group(await spawn)
            raise
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        try:
            assert proc.stdout is not None
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            pending = ""
            while chunk := await proc.stdout.read(1 << 16):
                pending += decoder.decode(chunk)
                done, _, pending = pending.rpartition("\n")
                if done:
                    lines = done.split("\n")
                    tail.extend(lines)
                    log("\n".join(lines) + "\n")
            pending += decoder.decode(b"", final=True)
            if pending:
                tail.append(pending)
                log(pending + "\n")
            code = await proc.wait()
        except BaseException:
            await _kill_group(proc)
            raise
        if code != 0:
            cause, message = classify_failure("\n".join(tail))
            raise SetupError(message, cause)

    # --- disk ---

    def _load(self) -> None:
        """Rebuild the index from disk, removing whatever is not a complete environment."""
        for path in self.root.glob(f"*{_METADATA}"):
            key = path.name[: -len(_METADATA)]
            entry = _read_metadata(path)
            if (
                entry is not None
                and environment_key(entry.requirements_sha256, entry.target or self._identity)
                == key
                and (self.root / key).is_dir()
            ):
                self._entries[key] = entry
                self._last_stamp = max(self._last_stamp, entry.last_used)
            else:
                path.unlink()
        for path in self.root.iterdir():
            name = path.name
            kept = name in self._entries or name[: -len(_METADATA)] in self._entries
            if not kept and (path.is_dir() or _TMP in name):
                _remove_tree(path)  # half-built, unfinished metadata, or without metadata

    def _stamp(self) -> float:
        """Now, strictly after every earlier stamp (the LRU order must not tie)."""
        self._last_stamp = max(time.time(), self._last_stamp + 1e-6)
        return self._last_stamp

    def _touch(self, key: str) -> None:
        entry = self._entries[key]
        entry.last_used = self._stamp()
        with contextlib.suppress(OSError):  # the order is kept in memory either way
            self._write_metadata(key, entry)

    def _write_metadata(self, key: str, entry: _Entry) -> None:
        path = self.root / f"{key}{_METADATA}"
        tmp = path.with_name(f"{path.name}{_TMP}{secrets.token_hex(4)}")
        try:
            tmp.write_text(json.dumps(dataclasses.asdict(entry)))
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _remove(self, key: str) -> None:
        self._entries.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{key}{_METADATA}").unlink()
        _remove_tree(self.root / key)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the process group that ``proc`` leads, and reap ``proc``."""
    # Before the leader is reaped, its pid is still the group's id.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await asyncio.shield(proc.wait())


def _source_args(config: EnvironmentsConfig, environ: Mapping[str, str]) -> list[str]:
    """uv's package-source flags: the config's, then uv's and pip's variables (module docstring)."""
    args: list[str] = []
    index_url = config.index_url
    if not index_url and not (environ.get("UV_INDEX_URL") or environ.get("UV_DEFAULT_INDEX")):
        index_url = environ.get("PIP_INDEX_URL", "").strip()
    if index_url:
        args += ["--index-url", index_url]
    elif environ.get("PIP_NO_INDEX", "").strip().lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    extra = [
        *config.extra_index_urls,
        *environ.get("UV_EXTRA_INDEX_URL", "").split(),
        *environ.get("PIP_EXTRA_INDEX_URL", "").split(),
    ]
    links = [
        *config.find_links,
        *(s.strip() for s in environ.get("UV_FIND_LINKS", "").split(",")),
        *environ.get("PIP_FIND_LINKS", "").split(),
    ]
    for flag, values in (("--extra-index-url", extra), ("--find-links", links)):
        for value in dict.fromkeys(v for v in values if v):
            args += [flag, value]
    return args


def _count_requirements(requirements: str) -> int:
    """Requirement lines (not blank, comments or options) of a requirements file."""
    lines = (line.split(" #", 1)[0].strip() for line in requirements.splitlines())
    return sum(1 for line in lines if line and not line.startswith(("#", "-")))


def _tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (each inode once, links not followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return total


def _read_metadata(path: Path) -> _Entry | None:
    try:
        data = json.loads(path.read_text())
        return _Entry(
            requirements_sha256=str(data["requirements_sha256"]),
            size_bytes=int(data["size_bytes"]),
            last_used=float(data["last_used"]),
            target=str(data.get("target", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _retrieve(task: asyncio.Task[Environment]) -> None:
    """Mark a build's exception as seen (its callers may all have been cancelled)."""
    if not task.cancelled():
        task.exception()
