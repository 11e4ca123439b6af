"""The Ray executor against a real local Ray head (token auth on, dashboard on).

One head for the module: Ray allows one driver per process. It advertises 4
simulated GPUs as ``GPU: 4`` plus ``rigshift_gpu_0..3``.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker_agent.executor import LaunchSpec, RayExecutor, job_environment
from worker_agent.process import ProcExited, ProcOutput, ProcStarted
from worker_agent.process import alive as _alive

PY = sys.executable


class Loop:
    """One event loop for the module, so the Ray executor's awaitables stay on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def ray_exec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RayExecutor, Loop, Path]]:
    root = tmp_path_factory.mktemp("ray-exec")
    loop = Loop()
    ex = RayExecutor(4, token_path=root / "ray_auth_token", dashboard=True, kill_grace_s=1.0)
    loop.run(ex.start())
    yield ex, loop, root
    loop.run(ex.close())
    loop.loop.close()
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(key, None)


def spec(root: Path, job: str, gpus: list[int], *lines: str) -> LaunchSpec:
    env = job_environment(
        os.environ, {}, job=job, attempt=1, checkpoint_dir=str(root), gpu_indices=gpus
    )
    return LaunchSpec(job, 1, [PY, "-c", "\n".join(lines)], env, str(root), gpus)


async def drain(execution) -> tuple[list, str, ProcExited, float]:  # type: ignore[no-untyped-def]
    events = []
    started_at = 0.0
    async for event in execution.events():
        if isinstance(event, ProcStarted):
            started_at = time.monotonic()
        events.append(event)
    out = b"".join(e.data for e in events if isinstance(e, ProcOutput)).decode()
    return events, out, events[-1], started_at


def test_each_attempt_sees_only_its_gpus(ray_exec) -> None:  # type: ignore[no-untyped-def]
    ex, loop, root = ray_exec
    code = (
        "import os, time",
        "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['RIGSHIFT_JOB_ID'], flush=True)",
        "time.sleep(0.3)",
    )

    async def main():  # type: ignore[no-untyped-def]
        runs = [
            ex.launch(spec(root, "jobs/a", [0, 1, 2, 3], *code)),
            ex.launch(spec(root, "jobs/b", [2], *code)),  # must wait for jobs/a's GPUs
        ]
        return await asyncio.gather(*(drain(r) for r in runs))

    (ea, out_a, end_a, start_a), (_, out_b, end_b, start_b) = loop.run(main())
    assert out_a == "0,1,2,3 a\n" and out_b == "2 b\n"
    assert end_a == ProcExited(0, "") and end_b == ProcExited(0, "")
    assert isinstance(ea[0], ProcStarted)
    # Ray's resources serialise them: b starts only after a's process is over (0.3 s)
    assert abs(start_b - start_a) >= 0.25


def test_output_streams_while_the_job_runs(ray_exec) -> None:  # type: ignore[no-untyped-def]
    ex, loop, root = ray_exec

    async def main() -> list[float]:
        t0 = time.monotonic()
        times = []
        run = ex.launch(
            spec(
                root,
                "jobs/s",
                [1],
                "import time",
                "for i in range(4): print(i, flush=True); time.sleep(0.4)",
            )
        )
        async for event in run.events():
            if isinstance(event, ProcOutput):
                times.append(time.monotonic() - t0)
        return times

    times = loop.run(main())
    assert len(times) >= 3 and times[0] < 1.0  # the first line arrives long before the end


def test_exit_status_and_missing_program(ray_exec) -> None:  # type: ignore[no-untyped-def]
    ex, loop, root = ray_exec
    _, _, end, _ = loop.run(drain(ex.launch(spec(root, "jobs/e", [3], "raise SystemExit(7)"))))
    assert end == ProcExited(7, "")
    bad = LaunchSpec("jobs/m", 1, ["/no/such/binary"], dict(os.environ), str(root), [3])
    events, _, end, _ = loop.run(drain(ex.launch(bad)))
    assert end.exit_code == 127 and "not found" in end.message and len(events) == 1


def test_cancel_kills_the_tree_within_5_s(ray_exec, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ex, loop, root = ray_exec
    pids = tmp_path / "pids"
    code = (
        "import os, signal, subprocess, sys, time",
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)",
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])",
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}')",
        "print('ready', flush=True)",
        "time.sleep(600)",
    )

    async def main() -> tuple[float, ProcExited]:
        run = ex.launch(spec(root, "jobs/c", [0], *code))
        events = run.events()
        async for event in events:
            if isinstance(event, ProcOutput) and "ready" in event.data.decode():
                break
        t0 = time.monotonic()
        await run.cancel("by client")
        end = None
        async for event in events:
            end = event
        procs = [int(p) for p in pids.read_text().split()]
        while any(_alive(p) for p in procs) and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.05)
        assert not any(_alive(p) for p in procs)
        return time.monotonic() - t0, end  # type: ignore[return-value]

    took, end = loop.run(main())
    assert took < 5.0
    assert end.exit_code < 0 and "by client" in end.message


def test_ray_token_auth_is_on_and_kept_from_jobs(ray_exec) -> None:  # type: ignore[no-untyped-def]
    ex, loop, root = ray_exec
    token_file = root / "ray_auth_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    url = f"http://{ex.dashboard_url}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(
            urllib.request.Request(url, headers={"Authorization": "Bearer nope"}), timeout=10
        )
    assert wrong.value.code in (401, 403)
    ok = urllib.request.urlopen(
        urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}), timeout=10
    )
    assert ok.status == 200
    # The Jobs API client of the agent's process finds the token by itself.
    from ray.job_submission import JobSubmissionClient

    JobSubmissionClient(f"http://{ex.dashboard_url}").list_jobs()
    # A job cannot read the token from its environment.
    _, out, _, _ = loop.run(
        drain(
            ex.launch(
                spec(
                    root,
                    "jobs/t",
                    [0],
                    "import os; print(sorted(k for k in os.environ if 'AUTH' in k))",
                )
            )
        )
    )
    assert out == "[]\n"


def test_a_ray_head_that_times_out_is_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker_agent.executor.time.sleep", lambda s: None)
    # The retry SIGKILLs the processes a failed try left behind (descendants of this
    # process). Here that would hit whatever this pytest process started meanwhile,
    # e.g. Ray workers of the module's real Ray head, which takes the driver down with
    # them: pretend the failed try left exactly one (fake) process and record the kill.
    seen: list[list[int]] = [[], [999_999]]
    monkeypatch.setattr(
        "worker_agent.executor.descendants", lambda pid: seen.pop(0) if seen else []
    )
    killed: list[int] = []
    monkeypatch.setattr("worker_agent.executor.os.kill", lambda pid, sig: killed.append(pid))

    class FlakyRay:
        def __init__(self) -> None:
            self.inits = 0
            self.shutdowns = 0

        def init(self, **kw: object) -> str:
            self.inits += 1
            if self.inits == 1:
                raise Exception("The current node timed out during startup.")  # as Ray does
            return "context"

        def shutdown(self) -> None:
            self.shutdowns += 1

    flaky = FlakyRay()
    ex = RayExecutor(2)
    assert ex._start_local_head(flaky, {}) == "context"
    assert (flaky.inits, flaky.shutdowns) == (2, 1)
    assert killed == [999_999]


def test_a_container_job_runs_through_ray(ray_exec, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The process Ray runs is ``podman run`` (outside any sandbox): its output and status
    come back as any job's. Skipped without podman and a static busybox (CI has both)."""
    import shutil

    podman, busybox = shutil.which("podman"), shutil.which("busybox")
    if podman is None or busybox is None:
        if os.environ.get("CI"):
            pytest.fail("podman or busybox not installed (`.ci/run` installs them)")
        pytest.skip("podman or busybox-static not installed")
    ex, loop, root = ray_exec
    conf = tmp_path / "containers.conf"
    conf.write_text(
        '[containers]\ndefault_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    argv = [podman, "run", "--rm", "--name", "rigshift-ray-1", "--network", "none"]
    argv += ["--rootfs", str(rootfs), "/bin/busybox", "sh", "-c", "echo in-container; exit 5"]
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    launched = LaunchSpec("jobs/ray", 1, argv, env, str(root), [2], container="rigshift-ray-1")
    _, out, end, _ = loop.run(drain(ex.launch(launched)))
    assert "in-container" in out and end.exit_code == 5, out
