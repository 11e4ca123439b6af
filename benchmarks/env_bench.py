"""Environment setup benchmark: uv against pip, cold and warm, and the agent's warm reuse.

For each requirements set (``small``: requests, tqdm, packaging from PyPI; ``torch``:
``torch==2.13.0`` from the wheels in ``$PIP_FIND_LINKS``) it times, in fresh virtual
environments under one temporary directory:

* ``uv cold``: ``uv venv`` + ``uv pip install -r`` with an empty uv cache
  (``UV_CACHE_DIR`` a new directory);
* ``uv warm``: the same into a second new venv, with the cache the cold run filled;
* ``pip cold``: ``python -m venv`` + ``pip install --no-cache-dir -r``, the peer a user
  would script by hand (the venv's own pip, ``ensurepip``'s);
* ``pip fill`` and ``pip warm``: pip with a new cache directory, then again with it full;
* ``agent reuse``: ``worker_agent.environments.EnvironmentCache.use()`` for an environment
  the cache has already built (``.built`` False): the setup a rig pays when a job's
  environment is already there. Measured with the cache object that built it and with a new
  one on the same root (an agent restarted). ``agent build`` is the first ``use()``, which
  builds with an empty uv cache.

Every install gets ``--find-links`` for each directory in ``$PIP_FIND_LINKS``. pip's
version check is off (``PIP_DISABLE_PIP_VERSION_CHECK=1``), so it does not add a request
to PyPI. Venv and cache live on one file system, so uv hard-links from its cache.

End to end (``--e2e``, on unless ``--no-e2e``): a real broker and ONE real agent
(:class:`harness.fleet.LocalFleet`, ``RTX3090x2`` simulated, heartbeat 1 s, lease 6 s as
in the e2e suite, a new empty ``UV_CACHE_DIR``). One cold job with ``E2E_REQUIREMENTS``
builds the environment; then ``--e2e-jobs`` pairs, alternately a job without requirements
(``sys.executable -c``) and one with the same requirements (``python -c``, the
environment's; its logs must say "reused (cached), nothing installed"), each submitted once
the previous one has finished, so the queue and the rig are idle. Per job: submit -> process
start (the attempt's ``start_time`` minus the job's ``create_time``, both the broker's clock)
and the attempt's ``setup_milliseconds``. The difference of the warm and no-requirements
medians is what a warm environment adds to submit -> process start.

Reported per case: venv creation, install and total seconds (median of ``--repeat`` runs),
and the ratios against the goals: uv cold / pip cold at most 0.5; warm reuse under 1 s
(``EnvironmentCache.use()`` alone, and end to end). With ``--json`` the last line is one
JSON object.

Images (``--images``, instead of the requirements sets): cold pull, warm pull and warm
start of a small and a large (``--large-mb``, 512 by default) image from a local registry
with podman, and end to end what a warm image adds to submit -> process start (goal: under
1.5 s); see ``benchmarks/image_bench.py``.

Usage::

    .venv/bin/python benchmarks/env_bench.py [--json] [--repeat 3] [--sets small torch]
        [--no-agent] [--no-e2e] [--e2e-jobs 10]
    .venv/bin/python benchmarks/env_bench.py --images [--image-repeat 3] [--large-mb 512]
        [--no-e2e] [--e2e-jobs 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The requirements sets, by name.
SETS: dict[str, tuple[str, ...]] = {
    "small": ("requests", "tqdm", "packaging"),
    "torch": ("torch==2.13.0",),
}

#: Goals: uv cold over pip cold, and seconds a warm reuse may add to submit -> process start.
GOAL_UV_OVER_PIP = 0.5
GOAL_REUSE_S = 1.0

#: Cases in the order they run within one repeat of a set.
CASES = ("uv cold", "uv warm", "pip cold", "pip fill", "pip warm")

#: Requirements of the end-to-end jobs: one small pure-Python wheel from the index.
E2E_REQUIREMENTS = "tabulate==0.9.0\n"

#: What the agent logs when an attempt's environment is already there.
REUSED_LINE = "reused (cached), nothing installed"


@dataclass
class Runs:
    """Timings of one case: venv creation and install seconds, one entry per repeat."""

    create_s: list[float] = field(default_factory=list)
    install_s: list[float] = field(default_factory=list)

    def add(self, create_s: float, install_s: float) -> None:
        """Record one repeat."""
        self.create_s.append(create_s)
        self.install_s.append(install_s)

    def summary(self) -> dict[str, Any]:
        """Medians (and every total) for the report."""
        totals = [c + i for c, i in zip(self.create_s, self.install_s, strict=True)]
        return {
            "create_s": round(statistics.median(self.create_s), 3),
            "install_s": round(statistics.median(self.install_s), 3),
            "total_s": round(statistics.median(totals), 3),
            "runs_total_s": [round(t, 3) for t in totals],
        }


def find_links() -> list[str]:
    """The directories ``$PIP_FIND_LINKS`` names (space-separated), as pip reads it."""
    return (os.environ.get("PIP_FIND_LINKS") or "").split()


#: Variables the benchmark sets itself (caches, find-links) or that would point at another venv.
CONTROLLED = frozenset(
    {
        "PIP_CACHE_DIR",
        "PIP_NO_CACHE_DIR",
        "PIP_FIND_LINKS",
        "UV_CACHE_DIR",
        "UV_NO_CACHE",
        "UV_FIND_LINKS",
        "VIRTUAL_ENV",
        "PYTHONPATH",
    }
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables the benchmark controls, plus ``extra``.

    Other pip and uv settings (an index mirror, ``PIP_CERT``, timeouts) stay, as in a user's
    shell.
    """
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Run ``cmd``; its wall seconds. Raises with its output when it fails."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return seconds


def links_args() -> list[str]:
    """``--find-links DIR`` for each directory in ``$PIP_FIND_LINKS``."""
    return [arg for d in find_links() for arg in ("--find-links", d)]


def uv_setup(uv: str, req: Path, venv: Path, cache: Path, work: Path) -> tuple[float, float]:
    """``uv venv`` + ``uv pip install -r`` with ``cache`` as the uv cache: (create s, install s)."""
    env = clean_env(UV_CACHE_DIR=str(cache), UV_NO_CONFIG="1")
    create = timed([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], env, work)
    python = str(venv / "bin" / "python")
    cmd = [uv, "pip", "install", "--python", python, *links_args(), "-r", str(req)]
    install = timed(cmd, env, work)
    return create, install


def pip_setup(req: Path, venv: Path, cache: Path | None, work: Path) -> tuple[float, float]:
    """``python -m venv`` + ``pip install -r``; no cache when ``cache`` is None."""
    env = clean_env(**({"PIP_CACHE_DIR": str(cache)} if cache else {}))
    create = timed([sys.executable, "-m", "venv", str(venv)], env, work)
    caching = ["--no-cache-dir"] if cache is None else []
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *caching]
    install = timed([*pip, *links_args(), "-r", str(req)], env, work)
    return create, install


def requirements_identity(text: str) -> tuple[str, str]:
    """(sha256, normalised text) as the broker names them; plain sha256 without broker."""
    try:
        from broker.requirements import parse_requirements
    except ImportError:
        return hashlib.sha256(text.encode()).hexdigest(), text
    parsed = parse_requirements(text)
    return parsed.sha256, parsed.text


async def agent_reuse(root: Path, text: str, repeat: int, uv: str) -> dict[str, Any]:
    """Build once through ``EnvironmentCache.use()`` (empty uv cache), then time reuses.

    ``reuse``: ``use()`` again on the cache object that built it; ``restart``: a new
    ``EnvironmentCache`` on the same root (an agent restarted), construction included.
    """
    from worker_agent.config import EnvironmentsConfig
    from worker_agent.environments import EnvironmentCache

    config = EnvironmentsConfig(
        max_cache_gb=50.0,
        index_url="",
        extra_index_urls=(),
        find_links=tuple(find_links()),
        max_setup_s=900.0,
    )
    environ = clean_env(UV_CACHE_DIR=str(root / "uv-cache"))
    sha, normalised = requirements_identity(text)
    log: list[str] = []

    def new_cache() -> EnvironmentCache:
        return EnvironmentCache(root / "envs", config, environ=environ, uv=uv)

    async def use_once(cache: EnvironmentCache) -> bool:
        async with cache.use(sha, normalised, log.append) as env:
            nonlocal path
            path = env.path
            return env.built

    path = Path()
    cache = new_cache()
    t0 = time.perf_counter()
    built = await use_once(cache)
    build_s = time.perf_counter() - t0
    if not built:
        raise RuntimeError("the first use() of an empty cache did not build")
    freeze = [uv, "pip", "freeze", "--python", str(path / "bin" / "python")]
    installed = subprocess.run(freeze, capture_output=True, text=True, env=environ, check=True)
    same, restart = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        built = await use_once(cache)
        same.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        built = await use_once(new_cache()) or built
        restart.append(time.perf_counter() - t0)
        if built:
            raise RuntimeError("a reuse rebuilt the environment")
    return {
        "build_s": round(build_s, 3),
        "reuse_s": round(statistics.median(same), 5),
        "reuse_max_s": round(max(same), 5),
        "restart_s": round(statistics.median(restart), 5),
        "restart_max_s": round(max(restart), 5),
        "installed": installed.stdout.split(),
    }


def measure_set(name: str, uv: str, root: Path, repeat: int) -> dict[str, Any]:
    """Every case for one requirements set, ``repeat`` times, interleaved."""
    work = root / name
    work.mkdir()
    req = work / "requirements.txt"
    text = "".join(f"{line}\n" for line in SETS[name])
    req.write_text(text)
    runs = {case: Runs() for case in CASES}
    for i in range(repeat):
        uv_cache = work / f"uv-cache-{i}"
        pip_cache = work / f"pip-cache-{i}"
        plan = [
            ("uv cold", lambda v, c=uv_cache: uv_setup(uv, req, v, c, work)),
            ("uv warm", lambda v, c=uv_cache: uv_setup(uv, req, v, c, work)),
            ("pip cold", lambda v: pip_setup(req, v, None, work)),
            ("pip fill", lambda v, c=pip_cache: pip_setup(req, v, c, work)),
            ("pip warm", lambda v, c=pip_cache: pip_setup(req, v, c, work)),
        ]
        for case, setup in plan:
            venv = work / f"venv-{case.replace(' ', '-')}-{i}"
            create, install = setup(venv)
            runs[case].add(create, install)
            print(
                f"  {name} {case} #{i + 1}: {create + install:.2f} s", file=sys.stderr, flush=True
            )
            shutil.rmtree(venv)
        shutil.rmtree(uv_cache, ignore_errors=True)
        shutil.rmtree(pip_cache, ignore_errors=True)
    out: dict[str, Any] = {
        "requirements": list(SETS[name]),
        "cases": {case: r.summary() for case, r in runs.items()},
    }
    cases = out["cases"]
    out["uv_cold_over_pip_cold"] = round(
        cases["uv cold"]["total_s"] / cases["pip cold"]["total_s"], 3
    )
    out["uv_warm_over_pip_warm"] = round(
        cases["uv warm"]["total_s"] / cases["pip warm"]["total_s"], 3
    )
    return out


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``, as ``dispatch_bench.py`` takes it."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def _seconds(t: Any) -> float:
    """A protobuf ``Timestamp`` in seconds."""
    return float(t.seconds + t.nanos / 1e9)


def e2e_job(
    client: Any, argv: list[str], requirements: str, timeout_s: float, **spec: Any
) -> dict[str, Any]:
    """Submit one one-GPU job (``spec``: more of ``create_job``'s arguments, e.g. ``image``),
    wait until it succeeds; its timings and logs.

    ``start_ms``: submit -> process start (broker's clock at both ends); ``setup_ms``: the
    attempt's setup (environment, image, inputs, working directory) as the agent measured it.
    """
    from rigshift.v1 import job_pb2

    final = {job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED, job_pb2.Job.CANCELLED}
    name = client.create_job(argv, gpu_count=1, python_requirements=requirements, **spec).name
    deadline = time.monotonic() + timeout_s
    while (job := client.get_job(name)).state not in final:
        if time.monotonic() > deadline:
            state = job_pb2.Job.State.Name(job.state)
            raise RuntimeError(f"{name} is {state} after {timeout_s:g} s")
        time.sleep(0.05)
    logs = "".join(chunk.data for chunk in client.stream_logs(name))
    if job.state != job_pb2.Job.SUCCEEDED:
        state = job_pb2.Job.State.Name(job.state)
        raise RuntimeError(f"{name} ended {state}: {job.status_message}\n{logs[-3000:]}")
    attempt = job.attempts[-1]
    start_s = _seconds(attempt.start_time) - _seconds(job.create_time)
    return {
        "create_ms": _seconds(job.create_time) * 1000,
        "start_ms": round(start_s * 1000, 1),
        "setup_ms": int(attempt.setup_milliseconds),
        "logs": logs,
    }


def _kind_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and p90 of submit -> start and of setup over one kind of job, and every run."""
    start = [r["start_ms"] for r in runs]
    setup = [r["setup_ms"] for r in runs]
    return {
        "start_p50_ms": round(statistics.median(start), 1),
        "start_p90_ms": round(pct(start, 90), 1),
        "setup_p50_ms": round(float(statistics.median(setup)), 1),
        "setup_p90_ms": round(float(pct(setup, 90)), 1),
        "runs_start_ms": start,
        "runs_setup_ms": setup,
    }


def run_e2e(jobs: int) -> dict[str, Any]:
    """A real broker and one real agent; what a warm environment adds to submit -> start.

    One cold job with ``E2E_REQUIREMENTS`` (the agent builds its environment), then ``jobs``
    pairs one after the other on an idle rig: no requirements, then the same requirements
    (warm). The agent's uv cache starts empty. Stops every process of the fleet whatever
    happens.
    """
    from harness.fleet import LocalFleet

    root = Path(tempfile.mkdtemp(prefix="env_bench-e2e-"))
    # An empty uv cache of its own: the cold job downloads, as on a new rig.
    fleet = LocalFleet(root, env={"UV_CACHE_DIR": str(root / "uv-cache")})
    left: list[int] = []
    try:
        client = fleet.start_one_rig("env")
        with_env = ["python", "-c", "print(1)"]  # the environment's python, first on PATH
        without = [sys.executable, "-c", "print(1)"]
        cold = e2e_job(client, with_env, E2E_REQUIREMENTS, timeout_s=600)
        if REUSED_LINE in cold["logs"]:
            raise RuntimeError("the first job found its environment already built")
        print(f"  e2e cold: {cold['start_ms']:.0f} ms to start", file=sys.stderr, flush=True)
        runs: dict[str, list[dict[str, Any]]] = {"none": [], "warm": []}
        for i in range(jobs):
            for kind, argv, reqs in (("none", without, ""), ("warm", with_env, E2E_REQUIREMENTS)):
                time.sleep(0.2)  # a quiet queue and rig before each submission
                got = e2e_job(client, argv, reqs, timeout_s=120)
                if (REUSED_LINE in got["logs"]) != (kind == "warm"):
                    raise RuntimeError(f"{kind} job #{i + 1}: unexpected logs:\n{got['logs']}")
                runs[kind].append(got)
                print(
                    f"  e2e {kind} #{i + 1}: {got['start_ms']:.0f} ms to start, "
                    f"setup {got['setup_ms']} ms",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        fleet.stop()
        left = fleet.leftovers()
        shutil.rmtree(root, ignore_errors=True)
        if left:
            print(f"  e2e: processes left running: {left}", file=sys.stderr)
    if left:
        raise RuntimeError(f"processes of the fleet left running: {left}")
    none, warm = _kind_summary(runs["none"]), _kind_summary(runs["warm"])
    return {
        "requirements": E2E_REQUIREMENTS.split(),
        "jobs_per_kind": jobs,
        "cold": {"start_ms": cold["start_ms"], "setup_ms": cold["setup_ms"]},
        "none": none,
        "warm": warm,
        "warm_adds_p50_ms": round(warm["start_p50_ms"] - none["start_p50_ms"], 1),
        "warm_adds_p90_ms": round(warm["start_p90_ms"] - none["start_p90_ms"], 1),
    }


def version_of(cmd: list[str]) -> str:
    """First line of ``cmd``'s output (a tool's ``--version``)."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env())
    return (done.stdout or done.stderr).strip().splitlines()[0]


def machine(uv: str, root: Path) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = machine_cpu()
    probe = root / "pip-version-venv"
    subprocess.run([sys.executable, "-m", "venv", str(probe)], check=True, env=clean_env())
    pip = version_of([str(probe / "bin" / "python"), "-m", "pip", "--version"])
    shutil.rmtree(probe)
    return {
        "nproc": cpu["nproc"],
        "cpu": cpu["cpu"],
        "python": platform.python_version(),
        "uv": version_of([uv, "--version"]),
        "pip": pip.split(" from ")[0],
        "find_links": find_links(),
        "loadavg_start": os.getloadavg()[0],
    }


def table(report: dict[str, Any]) -> str:
    """The report as text: one row per set and case, then the ratios and goals."""
    rows = [f"{'set':<6} {'case':<12} {'venv s':>8} {'install s':>10} {'total s':>9}  runs"]
    for name, s in report["sets"].items():
        for case, c in s["cases"].items():
            runs = ", ".join(f"{t:.2f}" for t in c["runs_total_s"])
            rows.append(
                f"{name:<6} {case:<12} {c['create_s']:>8.2f} {c['install_s']:>10.2f} "
                f"{c['total_s']:>9.2f}  {runs}"
            )
        reuse = s.get("agent")
        if reuse:
            rows.append(f"{name:<6} {'agent build':<12} {'':>8} {'':>10} {reuse['build_s']:>9.2f}")
            rows.append(
                f"{name:<6} {'agent reuse':<12} {'':>8} {'':>10} {reuse['reuse_s']:>9.4f}  "
                f"max {reuse['reuse_max_s']:.4f}"
            )
            rows.append(
                f"{name:<6} {'  restarted':<12} {'':>8} {'':>10} {reuse['restart_s']:>9.4f}  "
                f"max {reuse['restart_max_s']:.4f} (a new EnvironmentCache on the same root)"
            )
    rows.append("")
    for name, s in report["sets"].items():
        ratio = s["uv_cold_over_pip_cold"]
        verdict = "met" if ratio <= GOAL_UV_OVER_PIP else "MISSED"
        rows.append(
            f"{name}: uv cold / pip cold = {ratio:.3f} (goal <= {GOAL_UV_OVER_PIP}: {verdict}); "
            f"uv warm / pip warm = {s['uv_warm_over_pip_warm']:.3f}"
        )
        reuse = s.get("agent")
        if reuse:
            worst = max(reuse["reuse_max_s"], reuse["restart_max_s"])
            verdict = "met" if worst < GOAL_REUSE_S else "MISSED"
            rows.append(
                f"{name}: warm reuse {reuse['reuse_s']:.4f} s, worst {worst:.4f} s "
                f"(goal < {GOAL_REUSE_S:g} s: {verdict})"
            )
        elif "agent_error" in s:
            rows.append(f"{name}: warm reuse not measured: {s['agent_error']}")
    e2e = report.get("e2e")
    if e2e:
        rows += ["", e2e_table(e2e)]
    elif "e2e_error" in report:
        rows.append(f"end to end not measured: {report['e2e_error']}")
    m = report["machine"]
    rows.append(
        f"machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, {m['uv']}, "
        f"{m['pip']} (in the venv), load {m['loadavg_start']:.2f} -> {m['loadavg_end']:.2f}"
    )
    return "\n".join(rows)


def e2e_table(e2e: dict[str, Any]) -> str:
    """The end-to-end figures as text: one row per kind of job, then the difference."""
    reqs = " ".join(e2e["requirements"])
    rows = [
        f"end to end (broker + one agent), {e2e['jobs_per_kind']} jobs of each kind, ms:",
        f"{'job':<22} {'start p50':>10} {'start p90':>10} {'setup p50':>10} {'setup p90':>10}",
    ]
    cold = e2e["cold"]
    rows.append(f"{'cold (builds)':<22} {cold['start_ms']:>10.0f} {'':>10} {cold['setup_ms']:>10}")
    for kind, label in (("none", "no requirements"), ("warm", f"warm ({reqs})")):
        k = e2e[kind]
        rows.append(
            f"{label:<22} {k['start_p50_ms']:>10.1f} {k['start_p90_ms']:>10.1f} "
            f"{k['setup_p50_ms']:>10.1f} {k['setup_p90_ms']:>10.1f}"
        )
    adds = e2e["warm_adds_p50_ms"]
    verdict = "met" if adds < GOAL_REUSE_S * 1000 else "MISSED"
    rows.append(
        f"warm environment adds {adds:.1f} ms to submit -> start (difference of the medians; "
        f"of the p90s {e2e['warm_adds_p90_ms']:.1f} ms) (goal < {GOAL_REUSE_S:g} s: {verdict})"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run every case of the chosen sets and print the table (and JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each case (median)")
    ap.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    ap.add_argument("--no-agent", action="store_true", help="skip EnvironmentCache reuse")
    ap.add_argument(
        "--e2e",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="submit -> process start with a real broker and agent (on by default)",
    )
    ap.add_argument("--e2e-jobs", type=int, default=10, help="end-to-end jobs of each kind")
    ap.add_argument("--images", action="store_true", help="container images instead of sets")
    ap.add_argument("--image-repeat", type=int, default=3, help="runs of each image case")
    ap.add_argument("--large-mb", type=int, default=512, help="random MiB in the large image")
    args = ap.parse_args(argv)
    if args.e2e_jobs < 1:
        ap.error("--e2e-jobs must be at least 1")
    if args.images:
        return images_main(args)

    import uv as uv_package

    uv = uv_package.find_uv_bin()
    root = Path(tempfile.mkdtemp(prefix="env_bench-"))
    try:
        report: dict[str, Any] = {"machine": machine(uv, root), "repeat": args.repeat, "sets": {}}
        for name in args.sets:
            result = measure_set(name, uv, root, args.repeat)
            if not args.no_agent:
                text = "".join(f"{r}\n" for r in SETS[name])
                try:
                    reuses = max(args.repeat, 5)
                    result["agent"] = asyncio.run(
                        agent_reuse(root / f"agent-{name}", text, reuses, uv)
                    )
                except ImportError as e:
                    result["agent_error"] = f"worker_agent.environments not importable ({e})"
            report["sets"][name] = result
        if args.e2e:
            try:
                report["e2e"] = run_e2e(args.e2e_jobs)
            except Exception as e:  # keep the figures measured so far
                report["e2e_error"] = f"{type(e).__name__}: {e}"
        report["machine"]["loadavg_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(report))
    if args.json:
        print(json.dumps(report))
    return 1 if "e2e_error" in report else 0


def images_main(args: argparse.Namespace) -> int:
    """``--images``: benchmarks/image_bench.py, with the machine it ran on."""
    import image_bench

    report = image_bench.run(args.image_repeat, args.large_mb, args.e2e, args.e2e_jobs)
    report["machine"] = machine_cpu()
    print(image_bench.table(report))
    m = report["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu']}), load {m['loadavg']:.2f}")
    if args.json:
        print(json.dumps(report))
    return 1 if "e2e_error" in report else 0


def machine_cpu() -> dict[str, Any]:
    """CPUs and load of the machine."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "loadavg": os.getloadavg()[0]}


if __name__ == "__main__":
    sys.exit(main())
