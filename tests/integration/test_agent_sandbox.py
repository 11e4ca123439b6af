"""Job isolation: real jobs in bubblewrap through run_process (the wrapped argv, pure, is
tests/unit/test_agent_sandbox_argv.py)."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from worker_agent.executor import LaunchSpec, LocalExecutor
from worker_agent.process import ProcExited, ProcOutput, ProcStarted, descendants, run_process
from worker_agent.process import alive as _alive
from worker_agent.sandbox import Isolation, SandboxError, SandboxPolicy, resolve

# --- real runs ---------------------------------------------------------------------------

ROOT = os.geteuid() == 0
SH = shutil.which("sh") or "/bin/sh"
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@pytest.fixture(scope="module")
def isolation(tmp_path_factory: pytest.TempPathFactory) -> Isolation:
    """The real sandbox of this machine; the test module's state dir is hidden."""
    state = tmp_path_factory.mktemp("agent-state")
    (state / "identity.json").write_text('{"credential": "rswc_secret"}')
    try:
        found = resolve(SandboxPolicy(mode="bwrap", hide=(str(state),)))
    except SandboxError as err:
        # Visible in the summary; the agent itself falls back to no sandbox (with a warning)
        # where bubblewrap cannot work (e.g. a container without mount namespaces).
        pytest.skip(f"no working bubblewrap here: {err}")
    return found


@pytest.fixture
def dirs(isolation: Isolation) -> tuple[Path, Path]:
    """A working and a checkpoint directory inside the hidden state dir, as on a rig."""
    state = Path(isolation.hidden[0])
    n = len(list(state.glob("attempts/*")))
    cwd = state / "attempts" / f"job-{n}"
    ckpt = state / "checkpoints" / f"job-{n}"
    cwd.mkdir(parents=True)
    ckpt.mkdir(parents=True)
    return cwd, ckpt


def run(isolation: Isolation, script: str, cwd: Path, ckpt: Path, **kw: object):  # type: ignore[no-untyped-def]
    env = {**os.environ, "RIGSHIFT_CHECKPOINT_DIR": str(ckpt)}
    events = list(
        run_process(
            [SH, "-c", script],
            env,
            str(cwd),
            isolation=isolation,
            writable=[str(ckpt)],
            **kw,  # type: ignore[arg-type]
        )
    )
    out = b"".join(e.data for e in events if isinstance(e, ProcOutput)).decode()
    assert isinstance(events[0], ProcStarted) and isinstance(events[-1], ProcExited)
    return out, events[-1]


def test_job_writes_only_its_own_directories(isolation: Isolation, dirs) -> None:  # type: ignore[no-untyped-def]
    cwd, ckpt = dirs
    home = pwd.getpwuid(os.geteuid()).pw_dir
    outside = ["/etc/rigshift-x", "/usr/rigshift-x", f"{home}/rigshift-x", f"{cwd.parent}/other"]
    script = f"""
for f in {" ".join(outside)}; do
    if (echo x > "$f") 2>/dev/null; then echo "WROTE $f"; else echo "refused $f"; fi
done
echo data > ./out.txt && echo wrote-cwd
echo ckpt > "$RIGSHIFT_CHECKPOINT_DIR/step-1" && echo wrote-ckpt
echo "home=$HOME"
ls {Path(isolation.hidden[0])}
"""
    out, exited = run(isolation, script, cwd, ckpt)
    assert exited == ProcExited(0, ""), out
    assert "refused /etc/rigshift-x" in out and "refused /usr/rigshift-x" in out
    if ROOT:  # an unprivileged agent's job may write into the hidden dir's empty tmpfs
        assert "WROTE" not in out
    assert not any(Path(f).exists() for f in outside)  # nothing reached the rig
    assert "wrote-cwd" in out and "wrote-ckpt" in out
    assert f"home={cwd}" in out
    assert "identity.json" not in out  # the agent's state is hidden from the job
    assert (cwd / "out.txt").read_text() == "data\n"
    assert (ckpt / "step-1").read_text() == "ckpt\n"


def test_tmp_is_private(isolation: Isolation, dirs) -> None:  # type: ignore[no-untyped-def]
    cwd, ckpt = dirs
    marker = f"rigshift-sandbox-{os.getpid()}-{time.monotonic_ns()}"
    out, exited = run(isolation, f"echo hi > /tmp/{marker} && ls /tmp && echo ok", cwd, ckpt)
    assert exited.exit_code == 0 and marker in out and "ok" in out
    assert not Path("/tmp", marker).exists()
    # … and the job does not see what the rig has in /tmp.
    Path("/tmp", marker).write_text("rig")
    try:
        out, _ = run(isolation, f"cat /tmp/{marker} || echo missing", cwd, ckpt)
        assert "missing" in out
    finally:
        Path("/tmp", marker).unlink()


def test_job_runs_as_the_unprivileged_user(isolation: Isolation, dirs) -> None:  # type: ignore[no-untyped-def]
    cwd, ckpt = dirs
    out, exited = run(isolation, "id -u; id -G; grep NoNewPrivs /proc/self/status", cwd, ckpt)
    assert exited.exit_code == 0
    uid, groups, nnp = out.splitlines()
    if ROOT:
        assert isolation.uid is not None and isolation.uid != 0
        assert int(uid) == isolation.uid
        assert groups.split() == [str(isolation.gid)]  # supplementary groups cleared
        assert nnp.split() == ["NoNewPrivs:", "1"]  # no set-uid way back to root
        assert cwd.stat().st_uid == isolation.uid and ckpt.stat().st_uid == isolation.uid
    else:
        assert int(uid) == os.geteuid()


def test_job_sees_only_its_own_processes(isolation: Isolation, dirs) -> None:  # type: ignore[no-untyped-def]
    cwd, ckpt = dirs
    out, _ = run(isolation, "ls /proc | grep -c '^[0-9]'", cwd, ckpt)
    assert int(out.strip()) < 6  # bwrap's init, sh, ls, grep — not the rig's processes


def test_output_streams_and_exit_codes(isolation: Isolation, dirs) -> None:  # type: ignore[no-untyped-def]
    cwd, ckpt = dirs
    seen = []
    t0 = time.monotonic()
    script = "for i in 1 2 3; do echo tick $i; sleep 0.3; done; echo err >&2; exit 3"
    for event in run_process(
        [SH, "-c", script], os.environ, str(cwd), isolation=isolation, flush_s=0.05
    ):
        if isinstance(event, ProcOutput):
            seen.append((time.monotonic() - t0, event.data))
        last = event
    assert last == ProcExited(3, "")
    assert len(seen) >= 3 and seen[0][0] < 0.5  # arrives while it runs
    assert b"".join(d for _, d in seen).decode().split() == [
        "tick", "1", "tick", "2", "tick", "3", "err"
    ]  # fmt: skip
    _, exited = run(isolation, "kill -KILL $$", cwd, ckpt)
    assert exited.exit_code == -signal.SIGKILL


def test_cancel_kills_the_tree_and_gives_the_job_its_grace(isolation: Isolation, dirs) -> None:  # type: ignore[no-untyped-def]
    cwd, ckpt = dirs
    # The job saves on SIGTERM; a child and a setsid grandchild ignore it.
    script = (
        "trap 'echo saving; echo saved > $RIGSHIFT_CHECKPOINT_DIR/last; exit 0' TERM; "
        "sh -c 'trap \"\" TERM; sleep 600' & "
        "setsid sh -c 'trap \"\" TERM; sleep 600' & "
        "echo ready; while true; do sleep 0.1; done"
    )
    stop = threading.Event()
    env = {**os.environ, "RIGSHIFT_CHECKPOINT_DIR": str(ckpt)}
    gen = run_process(
        [SH, "-c", script],
        env,
        str(cwd),
        isolation=isolation,
        writable=[str(ckpt)],
        stop=stop,
        kill_grace_s=1.0,
    )
    started = next(gen)
    assert isinstance(started, ProcStarted)
    for event in gen:
        if isinstance(event, ProcOutput) and b"ready" in event.data:
            break
    time.sleep(0.2)
    tree = [started.pid, *descendants(started.pid)]
    assert len(tree) >= 5  # bwrap, its init, the job, the child, the grandchild (+ sleeps)
    t0 = time.monotonic()
    stop.set()
    rest = list(gen)
    assert time.monotonic() - t0 < 2.5
    assert isinstance(rest[-1], ProcExited) and rest[-1].message == "cancelled"
    assert (ckpt / "last").read_text() == "saved\n"  # SIGTERM reached the job, not just bwrap
    deadline = time.monotonic() + 2
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in tree)


def test_killing_bwrap_takes_the_whole_sandbox(isolation: Isolation, dirs) -> None:  # type: ignore[no-untyped-def]
    cwd, _ = dirs
    gen = run_process(
        [SH, "-c", "setsid sleep 600 & echo ready; sleep 600"],
        os.environ,
        str(cwd),
        isolation=isolation,
    )
    started = next(gen)
    assert isinstance(started, ProcStarted)
    next(e for e in gen if isinstance(e, ProcOutput))
    tree = [started.pid, *descendants(started.pid)]
    os.kill(started.pid, signal.SIGKILL)  # what the executor's last resort does
    assert list(gen)[-1] == ProcExited(-signal.SIGKILL, "")
    deadline = time.monotonic() + 2
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in tree)


def test_dies_with_its_worker(isolation: Isolation, dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The Ray worker running the job is killed: setpriv's pdeathsig and bwrap end the job."""
    cwd, _ = dirs
    pid_file = tmp_path / "pids"
    worker = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from worker_agent.process import run_process, descendants, ProcOutput
from worker_agent.sandbox import Isolation
iso = Isolation(**{_fields(isolation)!r})
argv = [{SH!r}, "-c", "echo ready; sleep 600"]
gen = run_process(argv, dict(os.environ), {str(cwd)!r}, isolation=iso)
started = next(gen)
next(e for e in gen if isinstance(e, ProcOutput))
open({str(pid_file)!r}, "w").write(" ".join(map(str, [started.pid, *descendants(started.pid)])))
import time; time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", worker])
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        tree = [int(p) for p in pid_file.read_text().split()]
        assert len(tree) >= 3
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 3
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in tree)


def _fields(isolation: Isolation) -> dict[str, object]:
    return {
        "bwrap": isolation.bwrap,
        "uid": isolation.uid,
        "gid": isolation.gid,
        "user": isolation.user,
        "setpriv": isolation.setpriv,
        "hidden": isolation.hidden,
    }


def test_local_executor_resolves_and_runs_sandboxed(isolation: Isolation, dirs, caplog) -> None:  # type: ignore[no-untyped-def]
    cwd, ckpt = dirs
    executor = LocalExecutor(sandbox=SandboxPolicy(mode="bwrap", hide=isolation.hidden))
    env = {**os.environ, "RIGSHIFT_CHECKPOINT_DIR": str(ckpt)}
    script = (
        "id -u; touch $RIGSHIFT_CHECKPOINT_DIR/c && echo ok; touch /etc/nope 2>/dev/null || echo ro"
    )
    spec = LaunchSpec("jobs/x", 1, [SH, "-c", script], env, str(cwd), [0])

    async def main() -> list[object]:
        await executor.start()
        return [event async for event in executor.launch(spec).events()]

    with caplog.at_level("INFO", logger="rigshift.agent.executor"):
        events = asyncio.run(main())
    assert executor.isolation is not None and executor.isolation.bwrap
    assert "job isolation: bubblewrap sandbox" in caplog.text
    assert events[-1] == ProcExited(0, "")
    out = b"".join(e.data for e in events if isinstance(e, ProcOutput)).decode()
    uid, ok, ro = out.split()
    assert (ok, ro) == ("ok", "ro")
    assert int(uid) == (isolation.uid if ROOT else os.geteuid())


def test_python_job_runs_in_the_sandbox(isolation: Isolation, dirs) -> None:  # type: ignore[no-untyped-def]
    """A job that is a real program of the system (python3), not only the shell."""
    if not os.access(PY, os.X_OK) or PY.startswith("/root"):
        pytest.skip("no system python the job user can run")
    cwd, ckpt = dirs
    out, exited = run(isolation, f"{PY} -c 'import os; print(os.getcwd(), os.getuid())'", cwd, ckpt)
    assert exited.exit_code == 0, out
    assert out.split()[0] == str(cwd)


def test_environment_and_inputs_are_readable_not_writable(isolation: Isolation, dirs) -> None:  # type: ignore[no-untyped-def]
    """The job's Python environment and inputs live in the hidden state dir: bound back
    read-only, and its output directory writable."""
    cwd, ckpt = dirs
    state = Path(isolation.hidden[0])
    venv = state / "environments" / f"env-{cwd.name}"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "tool").write_text("#!/bin/sh\necho from-the-env\n")
    (venv / "bin" / "tool").chmod(0o755)
    inputs = state / "inputs" / f"in-{cwd.name}"
    inputs.mkdir(parents=True)
    (inputs / "data.txt").write_text("rows\n")
    out_dir = state / "outputs" / cwd.name
    out_dir.mkdir(parents=True)
    script = f"""
{venv}/bin/tool
cat {inputs}/data.txt
if (echo x >> {inputs}/data.txt) 2>/dev/null; then echo WROTE-INPUT; else echo refused-input; fi
if (echo x > {venv}/bin/new) 2>/dev/null; then echo WROTE-ENV; else echo refused-env; fi
echo model > "$RIGSHIFT_OUTPUT_DIR/model.bin" && echo wrote-output
"""
    env_extra = {"RIGSHIFT_OUTPUT_DIR": str(out_dir)}
    events = list(
        run_process(
            [SH, "-c", script],
            {"PATH": os.environ["PATH"], "RIGSHIFT_CHECKPOINT_DIR": str(ckpt), **env_extra},
            str(cwd),
            isolation=isolation,
            writable=[str(ckpt), str(out_dir)],
            readonly=[str(venv), str(inputs)],
        )
    )
    out = b"".join(e.data for e in events if isinstance(e, ProcOutput)).decode()
    assert events[-1] == ProcExited(0, ""), out
    assert "from-the-env" in out and "rows" in out and "wrote-output" in out
    assert "refused-input" in out and "refused-env" in out
    assert (inputs / "data.txt").read_text() == "rows\n"
    assert (out_dir / "model.bin").read_text() == "model\n"
