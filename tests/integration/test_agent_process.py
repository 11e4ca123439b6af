"""One job process as a stream of events; whole-tree kill within the grace."""

from __future__ import annotations

import os
import sys
import threading
import time

from worker_agent.process import (
    ProcExited,
    ProcOutput,
    ProcStarted,
    descendants,
    run_process,
)
from worker_agent.process import alive as _alive

PY = sys.executable


def collect(gen) -> tuple[list, bytes, ProcExited]:  # type: ignore[no-untyped-def]
    events = list(gen)
    out = b"".join(e.data for e in events if isinstance(e, ProcOutput))
    assert isinstance(events[-1], ProcExited)
    return events, out, events[-1]


def test_started_output_exit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = "import os,sys; print('hi', os.getcwd()); print('err', file=sys.stderr); sys.exit(3)"
    events, out, exited = collect(run_process([PY, "-c", code], os.environ, str(tmp_path)))
    assert isinstance(events[0], ProcStarted) and events[0].pid > 0
    assert out.decode().splitlines() == [f"hi {tmp_path}", "err"]
    assert exited == ProcExited(3, "")


def test_missing_program_is_127(tmp_path) -> None:  # type: ignore[no-untyped-def]
    events, _, exited = collect(run_process(["/no/such/prog"], os.environ, str(tmp_path)))
    assert len(events) == 1 and exited.exit_code == 127 and "failed to start" in exited.message


def test_output_arrives_while_running(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = "import time\nfor i in range(3):\n print(i, flush=True); time.sleep(0.3)"
    seen = []
    t0 = time.monotonic()
    for event in run_process([PY, "-c", code], os.environ, str(tmp_path), flush_s=0.05):
        if isinstance(event, ProcOutput):
            seen.append((round(time.monotonic() - t0, 1), event.data))
    assert len(seen) >= 3  # not one chunk at the end
    assert seen[0][0] < 0.5


def _tree_script(tmp_path) -> str:  # type: ignore[no-untyped-def]
    # A parent that ignores SIGTERM, a child in its group, and a grandchild that setsid()s away.
    return f"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
a = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
b = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)
open({str(tmp_path / "pids")!r}, 'w').write(f'{{a.pid}} {{b.pid}}')
print('ready', flush=True)
time.sleep(600)
"""


def test_stop_kills_the_whole_tree_within_the_grace(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stop = threading.Event()
    gen = run_process(
        [PY, "-c", _tree_script(tmp_path)], os.environ, str(tmp_path), stop=stop, kill_grace_s=1.0
    )
    started = next(gen)
    assert isinstance(started, ProcStarted)
    for event in gen:
        if isinstance(event, ProcOutput) and b"ready" in event.data:
            break
    pids = [started.pid, *map(int, (tmp_path / "pids").read_text().split())]
    assert set(pids[1:]) <= set(descendants(started.pid))
    t0 = time.monotonic()
    stop.set()
    rest = list(gen)
    took = time.monotonic() - t0
    assert rest[-1] == ProcExited(-9, "cancelled")  # it ignored SIGTERM: SIGKILL after 1 s
    assert took < 2.5
    deadline = time.monotonic() + 2
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_closing_the_generator_kills_the_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    gen = run_process([PY, "-c", "import time; time.sleep(600)"], os.environ, str(tmp_path))
    started = next(gen)
    gen.close()  # what an exception inside a Ray task (cancel) does
    assert not _alive(started.pid)


def test_time_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, _, exited = collect(
        run_process(
            [PY, "-c", "import time; time.sleep(600)"],
            os.environ,
            str(tmp_path),
            max_duration_s=0.5,
        )
    )
    assert exited.exit_code == -15 and "time limit" in exited.message


def test_background_leftovers_do_not_hang_the_attempt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The job exits but leaves a child holding its stdout open.
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print('bye')"
    )
    t0 = time.monotonic()
    _, out, exited = collect(run_process([PY, "-c", code], os.environ, str(tmp_path)))
    assert exited.exit_code == 0 and b"bye" in out
    assert time.monotonic() - t0 < 3
