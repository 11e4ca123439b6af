"""EnvironmentCache with the real uv binary, offline: wheels come from a find-links dir.

Nothing here uses the network: the environment uv runs with has ``UV_OFFLINE=1``
and ``PIP_NO_INDEX=1`` (mapped to ``--no-index``) and its own ``UV_CACHE_DIR``,
except the unreachable-index case, which dials a closed port on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import uv

from worker_agent.config import EnvironmentsConfig
from worker_agent.environments import (
    Environment,
    EnvironmentCache,
    SetupError,
    _source_args,
    environment_key,
)
from worker_agent.image_python import ImagePython, install_target
from worker_agent.process import alive

pytestmark = pytest.mark.timeout(120)

REAL_UV = uv.find_uv_bin()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_wheel(directory: Path, name: str = "rigshift-testpkg", version: str = "1.0") -> Path:
    """A pure-Python wheel by hand: a package, a console script, METADATA, WHEEL, RECORD."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}/__init__.py": b"VALUE = 42\n\ndef main():\n    print('hello', VALUE)\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{info}/entry_points.txt": f"[console_scripts]\n{name} = {dist}:main\n".encode(),
    }

    def record(path: str, data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{path},sha256={digest},{len(data)}"

    rows = [record(path, data) for path, data in files.items()] + [f"{info}/RECORD,,"]
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{info}/RECORD", "\n".join(rows) + "\n")
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("wheels")
    write_wheel(directory)
    return directory


@pytest.fixture(scope="module")
def uv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uv-cache")


@pytest.fixture
def environ(uv_cache: Path, tmp_path: Path) -> dict[str, str]:
    """What uv sees: no network, no index, no config files, a cache of the tests' own."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "UV_CACHE_DIR": str(uv_cache),
        "UV_NO_CONFIG": "1",
        "UV_OFFLINE": "1",
        "PIP_NO_INDEX": "1",
        "UV_HTTP_RETRIES": "0",
    }


def config(wheels: Path, **kw: object) -> EnvironmentsConfig:
    return EnvironmentsConfig(find_links=(str(wheels),), **kw)  # type: ignore[arg-type]


def counting_uv(tmp_path: Path, before_exec: str = "") -> tuple[str, Path]:
    """A uv wrapper that notes each call in a file, runs ``before_exec``, then execs the real uv."""
    calls = tmp_path / "uv-calls.log"
    script = tmp_path / "uv-wrapper"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n{before_exec}\nexec "{REAL_UV}" "$@"\n')
    script.chmod(0o755)
    return str(script), calls


def installs(calls: Path) -> int:
    if not calls.exists():
        return 0
    return sum(1 for line in calls.read_text().splitlines() if line.startswith("pip install"))


class Log:
    """Collects what the cache writes into a job's log."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    def __call__(self, text: str) -> None:
        self.chunks.append(text)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


async def acquire(cache: EnvironmentCache, requirements: str, log: Log) -> Environment:
    """use() entered and left at once."""
    async with cache.use(sha(requirements), requirements, log) as env:
        return env


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".building-" in p.name)


def gone(pid: int, within_s: float = 10.0) -> bool:
    """True once ``pid`` has died (SIGKILL takes effect a moment after kill() returns)."""
    deadline = time.monotonic() + within_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def tree_bytes(root: Path) -> int:
    seen: set[int] = set()
    total = 0
    for path in root.rglob("*"):
        st = path.lstat()
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_size
    return total


# --- keys and environment variables ------------------------------------------------------


def test_environment_key_differs_per_requirements_and_is_stable() -> None:
    a, b = sha("torch==2.13.0\n"), sha("numpy\n")
    assert environment_key(a) == environment_key(a)
    assert environment_key(a) != environment_key(b)
    assert environment_key(a) != a  # the interpreter is part of the key
    assert len(environment_key(a)) == 64 and int(environment_key(a), 16) >= 0


def test_env_vars_put_the_venv_first() -> None:
    env = Environment("k", "s", Path("/envs/k"), built=True)
    out = env.env_vars({"PATH": "/usr/bin:/bin", "PYTHONHOME": "/x", "HOME": "/root"})
    assert out == {"PATH": "/envs/k/bin:/usr/bin:/bin", "VIRTUAL_ENV": "/envs/k", "HOME": "/root"}
    assert env.env_vars({})["PATH"] == "/envs/k/bin"


@pytest.mark.parametrize(
    ("cfg", "environ", "expected"),
    [
        (EnvironmentsConfig(), {}, []),
        # pip's settings become flags; uv would not read them
        (
            EnvironmentsConfig(),
            {
                "PIP_INDEX_URL": "https://mirror/simple",
                "PIP_EXTRA_INDEX_URL": "https://a/simple https://b/simple",
                "PIP_FIND_LINKS": "/opt/wheels /srv/wheels",
            },
            [
                *("--index-url", "https://mirror/simple"),
                *("--extra-index-url", "https://a/simple"),
                *("--extra-index-url", "https://b/simple"),
                *("--find-links", "/opt/wheels"),
                *("--find-links", "/srv/wheels"),
            ],
        ),
        # the config comes first, the index URL of the config wins, duplicates go
        (
            EnvironmentsConfig(
                index_url="https://own/simple",
                extra_index_urls=("https://x/simple",),
                find_links=("/data/wheels",),
            ),
            {
                "PIP_INDEX_URL": "https://mirror/simple",
                "PIP_EXTRA_INDEX_URL": "https://x/simple",
                "PIP_FIND_LINKS": "/opt/wheels",
            },
            [
                *("--index-url", "https://own/simple"),
                *("--extra-index-url", "https://x/simple"),
                *("--find-links", "/data/wheels"),
                *("--find-links", "/opt/wheels"),
            ],
        ),
        # a flag replaces uv's own variable, so uv's values are repeated as flags
        (
            EnvironmentsConfig(find_links=("/data/wheels",)),
            {"UV_FIND_LINKS": "/uv/a,/uv/b", "UV_INDEX_URL": "https://uv/simple"},
            ["--find-links", "/data/wheels", "--find-links", "/uv/a", "--find-links", "/uv/b"],
        ),
        (EnvironmentsConfig(), {"UV_DEFAULT_INDEX": "https://uv/simple", "PIP_INDEX_URL": "x"}, []),
        (EnvironmentsConfig(), {"PIP_NO_INDEX": "1"}, ["--no-index"]),
        (EnvironmentsConfig(), {"PIP_NO_INDEX": "off"}, []),
    ],
)
def test_package_sources(
    cfg: EnvironmentsConfig, environ: dict[str, str], expected: list[str]
) -> None:
    assert _source_args(cfg, environ) == expected


# --- building, reusing, restarting ------------------------------------------------------


def test_build_offline_then_reuse_then_restart(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "environments"
    wrapper, calls = counting_uv(tmp_path)
    cache = EnvironmentCache(root, config(wheels), environ=environ, uv=wrapper)
    requirements = "# the job's requirements\nrigshift-testpkg\n"
    first, second = Log(), Log()

    async def main() -> tuple[Environment, Environment]:
        return await acquire(cache, requirements, first), await acquire(cache, requirements, second)

    built, reused = asyncio.run(main())

    key = environment_key(sha(requirements))
    assert built.built and built.key == key and built.path == root / key
    assert built.requirements_sha256 == sha(requirements)
    assert f"[rigshift-agent] environment {key[:12]}: installing 1 requirement with uv " in (
        first.text
    )
    assert "rigshift-testpkg==1.0" in first.text  # uv's own output, streamed
    assert f"[rigshift-agent] environment {key[:12]} ready in " in first.text
    assert all(chunk.endswith("\n") for chunk in first.chunks)
    assert leftovers(root) == []

    # The venv's python has the package; env_vars puts the venv first on PATH, and the
    # console script still finds its interpreter after the rename (a relocatable venv).
    env = built.env_vars({"PATH": os.environ["PATH"], "PYTHONHOME": "/nowhere"})
    probe = "import sys, rigshift_testpkg; print(rigshift_testpkg.VALUE, sys.prefix)"
    out = subprocess.run(["python", "-c", probe], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["42", str(built.path)], out.stderr
    script = subprocess.run(["rigshift-testpkg"], env=env, capture_output=True, text=True)
    assert script.stdout == "hello 42\n", script.stderr

    assert not reused.built and reused.path == built.path
    assert second.text == (
        f"[rigshift-agent] environment {key[:12]} reused (cached), nothing installed\n"
    )
    assert installs(calls) == 1
    assert cache.held() == [sha(requirements)]

    # A restart finds it again, and clears what a crash would have left behind.
    (root / f"{key}.building-dead").mkdir()
    (root / ("f" * 64)).mkdir()  # a directory without metadata
    (root / f"{key}.json.tmp-dead").write_text("{")
    other = {"requirements_sha256": "e" * 64, "size_bytes": 1, "last_used": 1.0}
    (root / ("e" * 64)).mkdir()  # another interpreter's: its key is not ours for "e" * 64
    (root / f"{'e' * 64}.json").write_text(json.dumps(other))
    (root / f"{'d' * 64}.json").write_text(json.dumps(other))  # metadata without a venv
    again = EnvironmentCache(root, config(wheels), environ=environ, uv=wrapper)
    assert again.held() == [sha(requirements)]
    assert sorted(p.name for p in root.iterdir()) == [key, f"{key}.json"]
    third = Log()
    assert not asyncio.run(acquire(again, requirements, third)).built
    assert "reused (cached), nothing installed" in third.text
    assert installs(calls) == 1


def test_pip_find_links_from_the_environment_is_used(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    # No find_links in the config: only $PIP_FIND_LINKS says where the wheel is.
    environ = {**environ, "PIP_FIND_LINKS": str(wheels)}
    cache = EnvironmentCache(tmp_path / "envs", EnvironmentsConfig(), environ=environ)
    env = asyncio.run(acquire(cache, "rigshift-testpkg==1.0\n", Log()))
    assert env.built and (env.bin_dir() / "rigshift-testpkg").exists()


def test_concurrent_uses_share_one_build(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    wrapper, calls = counting_uv(tmp_path)
    cache = EnvironmentCache(tmp_path / "envs", config(wheels), environ=environ, uv=wrapper)
    requirements = "rigshift-testpkg\n"
    logs = [Log(), Log(), Log()]

    async def main() -> list[Environment]:
        return list(await asyncio.gather(*(acquire(cache, requirements, log) for log in logs)))

    envs = asyncio.run(main())
    assert installs(calls) == 1
    assert len({env.path for env in envs}) == 1
    assert [env.built for env in envs] == [True, False, False]
    for log in logs[1:]:
        assert "waiting for the build already under way" in log.text
        assert "(built for a concurrent attempt)" in log.text


def test_concurrent_failure_is_shared(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    wrapper, calls = counting_uv(tmp_path)
    root = tmp_path / "envs"
    cache = EnvironmentCache(root, config(wheels), environ=environ, uv=wrapper)

    async def attempt() -> SetupError:
        with pytest.raises(SetupError) as err:
            await acquire(cache, "rigshift-testpkg==9.9\n", Log())
        return err.value

    async def main() -> list[SetupError]:
        return list(await asyncio.gather(attempt(), attempt()))

    first, second = asyncio.run(main())
    assert first is second
    assert installs(calls) == 1
    assert first.cause == "client"


# --- eviction ----------------------------------------------------------------------------


def test_lru_eviction_never_removes_an_environment_in_use(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    # The size of one such environment, measured on a probe; the cache holds 2.5 of them.
    prober = EnvironmentCache(tmp_path / "probe", config(wheels), environ=environ)
    probe = asyncio.run(acquire(prober, "rigshift-testpkg\n", Log()))
    size = tree_bytes(probe.path)
    root = tmp_path / "envs"
    cache = EnvironmentCache(root, config(wheels, max_cache_gb=2.5 * size / 1e9), environ=environ)
    a, b, c, d = (f"rigshift-testpkg{spec}\n" for spec in ("==1.0", ">=1", "<2", "~=1.0"))
    removed: list[list[str]] = []

    async def main() -> None:
        async with cache.use(sha(a), a, Log()):
            await acquire(cache, b, Log())
            await acquire(cache, c, Log())  # 3 of them: B, least recently used, goes
            removed.append(cache.evict())
            assert set(cache.held()) == {sha(a), sha(c)}
        # A, released after C, is now more recent than C: C goes when D comes
        await acquire(cache, d, Log())

    asyncio.run(main())
    assert removed == [[]]  # nothing more to remove once B was gone
    assert cache.held() == [sha(d), sha(a)]
    on_disk = {p.name for p in root.iterdir() if p.is_dir()}
    assert on_disk == {environment_key(sha(d)), environment_key(sha(a))}


def test_an_environment_in_use_stays_even_over_the_limit(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    cache = EnvironmentCache(tmp_path / "envs", config(wheels, max_cache_gb=1e-9), environ=environ)

    async def main() -> tuple[list[str], list[str]]:
        async with cache.use(sha("rigshift-testpkg\n"), "rigshift-testpkg\n", Log()):
            during = cache.evict()
        return during, cache.evict()

    during, after = asyncio.run(main())
    assert during == []
    assert after == [environment_key(sha("rigshift-testpkg\n"))]
    assert cache.held() == [] and list((tmp_path / "envs").iterdir()) == []


# --- failures ----------------------------------------------------------------------------


def test_unresolvable_requirement_is_the_clients_fault(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "envs"
    cache = EnvironmentCache(root, config(wheels), environ=environ)
    log = Log()
    with pytest.raises(SetupError) as err:
        asyncio.run(acquire(cache, "rigshift-testpkg==9.9\n", log))
    assert err.value.cause == "client"
    assert err.value.message == "no version of `rigshift-testpkg==9.9` in the package index"
    assert "No solution found" in log.text  # the job's log shows uv's own words
    assert list(root.iterdir()) == [] and cache.held() == []


def test_unreachable_index_is_the_rigs_fault(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    environ = {k: v for k, v in environ.items() if k not in ("UV_OFFLINE", "PIP_NO_INDEX")}
    cfg = EnvironmentsConfig(index_url="http://127.0.0.1:9/simple")
    cache = EnvironmentCache(tmp_path / "envs", cfg, environ=environ)
    with pytest.raises(SetupError) as err:
        asyncio.run(acquire(cache, "rigshift-not-anywhere\n", Log()))
    assert err.value.cause == "rig"
    assert err.value.message.startswith("package index unreachable: http://127.0.0.1:9/simple/")
    assert "Connection refused" in err.value.message


def test_missing_uv_is_the_rigs_fault(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    cache = EnvironmentCache(
        tmp_path / "envs", config(wheels), environ=environ, uv=str(tmp_path / "no-uv")
    )
    with pytest.raises(SetupError) as err:
        asyncio.run(acquire(cache, "rigshift-testpkg\n", Log()))
    assert err.value.cause == "rig" and "uv not found" in err.value.message


# A grandchild that does not hold the output pipe: only killing the group ends it.
SLEEP_IN_INSTALL = """case "$1 $2" in
  "pip install") sleep 60 >/dev/null 2>&1 & echo $! > "{pidfile}"; wait; exit 1;;
esac"""


def test_timeout_kills_the_build_and_leaves_nothing(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    pidfile = tmp_path / "sleep.pid"
    wrapper, _ = counting_uv(tmp_path, SLEEP_IN_INSTALL.format(pidfile=pidfile))
    root = tmp_path / "envs"
    cache = EnvironmentCache(root, config(wheels, max_setup_s=3), environ=environ, uv=wrapper)
    with pytest.raises(SetupError) as err:
        asyncio.run(acquire(cache, "rigshift-testpkg\n", Log()))
    assert (err.value.cause, err.value.message) == ("rig", "setup took longer than 3 s")
    assert list(root.iterdir()) == []
    if pidfile.exists():  # (a very slow machine may time out before the install starts)
        assert gone(int(pidfile.read_text()))


def test_cancelling_the_attempt_kills_the_build(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    pidfile = tmp_path / "sleep.pid"
    wrapper, _ = counting_uv(tmp_path, SLEEP_IN_INSTALL.format(pidfile=pidfile))
    root = tmp_path / "envs"
    cache = EnvironmentCache(root, config(wheels), environ=environ, uv=wrapper)

    async def main() -> None:
        task = asyncio.create_task(acquire(cache, "rigshift-testpkg\n", Log()))
        while not (pidfile.exists() and pidfile.read_text().strip()):
            await asyncio.sleep(0.02)
        assert leftovers(root) != []  # the half-built venv is there now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Checked before asyncio.run ends (which would cancel a build left running).
        assert gone(int(pidfile.read_text()))  # the installer's whole group was killed
        assert list(root.iterdir()) == []

    asyncio.run(main())


# --- requirements for an image's Python (``uv pip install --target``) --------------------


def test_requirements_for_an_images_python_are_built_once_per_digest(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "environments"
    wrapper, calls = counting_uv(tmp_path)
    cache = EnvironmentCache(root, config(wheels), environ=environ, uv=wrapper)
    debian = ImagePython("3.11", "cpython", "x86_64", "glibc", "2.36")
    target = install_target("reg/train:1", "reg/train@sha256:aa", debian)
    requirements = "rigshift-testpkg\n"
    logs = [Log(), Log(), Log()]

    async def job(log: Log) -> Environment:
        async with cache.use(sha(requirements), requirements, log, target) as env:
            return env

    async def main() -> list[Environment]:
        # Two jobs with the same image at once share one build; a third reuses it.
        first = await asyncio.gather(job(logs[0]), job(logs[1]))
        return [*first, await job(logs[2])]

    built, waited, reused = asyncio.run(main())
    assert installs(calls) == 1
    line = next(c for c in calls.read_text().splitlines() if c.startswith("pip install"))
    assert f"--target {built.path.parent}/" in line
    assert "--python-version 3.11 --python-platform x86_64-manylinux_2_36" in line
    assert f"--find-links {wheels}" in line  # the rig's package sources, as for a venv
    assert [built.built, waited.built, reused.built] == [True, False, False]
    assert built.path == waited.path == reused.path
    assert built.key == environment_key(sha(requirements), target.identity)
    assert "installing 1 requirement for the image's Python (--python-version 3.11" in (
        logs[0].text
    )
    assert "reused (cached), nothing installed" in logs[2].text
    # A --target tree: the package at the top (for PYTHONPATH), no venv, no requirements
    # file; the console script points at whatever python3 the image has.
    names = sorted(p.name for p in built.path.iterdir())
    assert names == ["bin", "rigshift_testpkg", "rigshift_testpkg-1.0.dist-info"]
    script = (built.path / "bin" / "rigshift-testpkg").read_text()
    assert script.startswith("#!/usr/bin/env python3\n")
    out = subprocess.run(
        ["python3", "-c", "import rigshift_testpkg; print(rigshift_testpkg.VALUE)"],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(built.path)},
        capture_output=True,
        text=True,
    )
    assert out.stdout == "42\n", out.stderr
    # Not a venv of this rig: never reported as an environment for locality.
    assert cache.held() == []
    # A restart keeps it (its metadata says for which image), and still reuses it.
    again = EnvironmentCache(root, config(wheels), environ=environ, uv=wrapper)
    after = Log()

    async def reuse() -> Environment:
        async with again.use(sha(requirements), requirements, after, target) as env:
            return env

    assert not asyncio.run(reuse()).built and installs(calls) == 1
    # Another image (another digest) gets its own build.
    other = install_target("reg/train:2", "reg/train@sha256:bb", debian)

    async def elsewhere() -> Environment:
        async with again.use(sha(requirements), requirements, Log(), other) as env:
            return env

    assert asyncio.run(elsewhere()).built and installs(calls) == 2


def test_a_requirement_no_index_has_for_the_image_is_the_clients(
    wheels: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    cache = EnvironmentCache(tmp_path / "envs", config(wheels), environ=environ)
    target = install_target(
        "reg/x:1", "reg/x@sha256:cc", ImagePython("3.12", "cpython", "aarch64", "glibc", "2.39")
    )

    async def main() -> None:
        async with cache.use(sha("nosuchpkg\n"), "nosuchpkg\n", Log(), target):
            pass

    with pytest.raises(SetupError) as caught:
        asyncio.run(main())
    assert caught.value.cause == "client", caught.value
    assert leftovers(tmp_path / "envs") == []
