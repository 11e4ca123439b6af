"""``--ray-address``: the executor joins an existing, token-protected Ray cluster.

The cluster is a real ``ray start --head --block`` process of this test (its own
session, killed by pid at the end: never ``ray stop``, which would stop every
Ray on the machine). The executor runs in a child Python process because Ray
allows one driver per process and other test modules start their own.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from harness.fleet import start_time
from worker_agent.process import descendants

DRIVER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from worker_agent.executor import LaunchSpec, RayExecutor, job_environment
    from worker_agent.process import ProcExited, ProcOutput

    async def main():
        address, token, work = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
        ex = RayExecutor(2, address=address, token_path=token)
        await ex.start()
        env = job_environment(os.environ, {}, job="jobs/site", attempt=1,
                              checkpoint_dir=work, gpu_indices=[1])
        code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], sorted(os.listdir('.')))"
        run = ex.launch(LaunchSpec("jobs/site", 1, [sys.executable, "-c", code], env, work, [1]))
        out, end = b"", None
        async for event in run.events():
            if isinstance(event, ProcOutput):
                out += event.data
            elif isinstance(event, ProcExited):
                end = event.exit_code
        await ex.close()
        print(json.dumps({"out": out.decode(), "exit": end, "pinned": ex._pinned}))

    asyncio.run(main())
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("pinned", [True, False], ids=["rigshift-resources", "plain-gpus"])
def test_executor_joins_a_token_protected_cluster(tmp_path: Path, pinned: bool) -> None:
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
    }
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rs-ray-", dir="/tmp")
    resources = {"rigshift_gpu_0": 1, "rigshift_gpu_1": 1} if pinned else {}
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=2",
            f"--resources={json.dumps(resources)}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={ray_tmp}",  # short: Ray's unix socket paths must fit 107 bytes
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    seen: dict[int, int | None] = {}
    try:
        work = tmp_path / "work"
        work.mkdir()
        (work / "train.py").write_text("print('hi')\n")
        deadline = time.monotonic() + 60
        while not _listening(port) and time.monotonic() < deadline:
            seen.update({p: start_time(p) for p in descendants(head.pid)})
            time.sleep(0.2)
        time.sleep(2.0)  # the head's raylet registers after the GCS listens
        seen.update({p: start_time(p) for p in descendants(head.pid)})
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER, f"127.0.0.1:{port}", str(token), str(work)],
            env={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")},
            capture_output=True,
            text=True,
            timeout=90,
        )
        seen.update({p: start_time(p) for p in descendants(head.pid)})
        result = (
            json.loads(driver.stdout.strip().splitlines()[-1]) if driver.returncode == 0 else None
        )
        assert result is not None, driver.stderr[-3000:]
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        for pid, start in seen.items():
            if start is not None and start_time(pid) == start:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result["exit"] == 0
    assert result["pinned"] is pinned
    gpus, files = result["out"].split(" ", 1)
    # pinned: exactly GPU 1 as assigned; otherwise whichever one GPU Ray chose
    assert gpus == "1" if pinned else gpus in ("0", "1")
    assert "train.py" in files  # the working directory travelled through runtime_env
