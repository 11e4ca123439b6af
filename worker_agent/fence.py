"""The lease fence that lives outside the agent: a job is killed when the agent's lease lapses.

The agent stops its attempts itself when no heartbeat is answered (``lease.py``), but
that code runs in the agent: an agent process that is stopped (SIGSTOP, a debugger, a
stalled kernel) while its job's process is not cannot stop anything, and the broker
requeues the job elsewhere at the TTL. So every job process gets a small watcher
process of its own, started by :func:`worker_agent.process.run_process` right after
the job (``python -m worker_agent.fence FILE PID GRACE_S [--spare-leader]
[--container PODMAN NAME]``):

* the agent writes its **fencing deadline** to ``FILE`` (``state_dir/lease-deadline``)
  at every renewal of its lease, atomically (temporary file + rename): the instant its
  attempts must be stopped if no further heartbeat is answered (``Lease.stop_at``),
  as decimal seconds on ``CLOCK_BOOTTIME``. That clock is system-wide (another
  process reads the same value), never jumps with the wall clock, and keeps counting
  while the machine is suspended, as the broker's clock does;
* the fence reads the file every :data:`POLL_S`; once the clock is past the deadline
  plus :data:`SLACK_S` (the agent, when it runs, stops its attempts itself at the
  deadline and does not report them: it goes first), it writes ``fenced`` on its
  stdout, kills the job's tree (:func:`worker_agent.proctree.stop_tree`: SIGTERM to the
  group and descendants, SIGKILL after the grace; with ``--spare-leader`` bwrap gets
  only the SIGKILL), removes the job's container when it runs in one (``podman rm -f``:
  the container outlives a killed ``podman run``) and exits with :data:`FENCED_EXIT`.
  Everything is dead by deadline + grace + about 0.2 s (a container: its removal, about
  0.2 s more), within the 0.5 s (``STOP_MARGIN_S``) left before
  the broker may requeue;
* a missing, unreadable or garbled file means "no fence" (jobs run without an agent,
  an agent not registered yet, a state directory too full to write it);
* it never signals anything but the job: it remembers the leader's start time and
  exits as soon as that pid is gone or is another process. A leader that has exited
  but is not reaped yet (its agent is stopped) still holds its pid and process group,
  so the fence still kills the group's leftovers at the deadline.

It only reads a file and signals; it imports nothing but the standard library and
``worker_agent.proctree`` (cheap), and sleeps between polls. The dependency goes one
way: :mod:`worker_agent.process` starts fences and reads :data:`FENCED_EXIT` and
:data:`FENCED_LINE` from here; this module never imports it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from worker_agent.proctree import process_start, stop_tree

__all__ = [
    "FENCED_EXIT",
    "FENCE_FILE",
    "POLL_S",
    "SLACK_S",
    "clock",
    "read_deadline",
    "watch",
    "write_deadline",
]

#: The deadline file's name in the agent's state directory.
FENCE_FILE = "lease-deadline"
#: How often the fence reads the file.
POLL_S = 0.2
#: The fence acts this long after the deadline, so an agent that runs stops its attempts
#: itself (without a report) first; its kill ends this much sooner to make up for it.
SLACK_S = 0.25
#: The fence's exit status when it killed the job.
FENCED_EXIT = 3
#: The line the fence writes on its stdout before it sends the first signal.
FENCED_LINE = b"fenced\n"

_CLOCK = getattr(time, "CLOCK_BOOTTIME", getattr(time, "CLOCK_MONOTONIC", None))


def clock() -> float:
    """Seconds on the system-wide clock the deadline is written on (CLOCK_BOOTTIME)."""
    if _CLOCK is None:  # pragma: no cover - not Linux
        raise OSError("no system-wide monotonic clock on this platform")
    return time.clock_gettime(_CLOCK)


def write_deadline(path: Path, deadline: float) -> None:
    """Write ``deadline`` (seconds on :func:`clock`) to ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{deadline:.3f}\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_deadline(path: str | Path) -> float | None:
    """The deadline in ``path``; None when it is missing, unreadable or not a number."""
    try:
        with open(path, "rb") as f:
            text = f.read(64)
        value = float(text.decode("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if value == value and value != float("inf") else None  # not NaN


def watch(
    path: str | Path,
    pid: int,
    grace_s: float,
    *,
    spare_leader: bool = False,
    poll_s: float = POLL_S,
    out: int | None = None,
    container: tuple[str, str] | None = None,
) -> int:
    """Watch the job ``pid`` (its process group's leader) until it is gone (0) or the
    deadline in ``path`` passes: then kill its tree and return :data:`FENCED_EXIT`.
    ``out``: a file descriptor that gets :data:`FENCED_LINE` before the first signal."""
    born = process_start(pid)
    if born is None:
        return 0
    while process_start(pid) == born:
        deadline = read_deadline(path)
        if deadline is not None and clock() >= deadline + SLACK_S:
            if out is not None:
                with contextlib.suppress(OSError):
                    os.write(out, FENCED_LINE)
            stop_tree(pid, born, max(0.1, grace_s - SLACK_S), spare_leader=spare_leader)
            if container is not None:  # (podman, name): the container outlives its client
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    rm = [container[0], "rm", "--force", "--ignore", "--time", "0", container[1]]
                    subprocess.run(rm, capture_output=True, timeout=30, check=False)
            return FENCED_EXIT
        time.sleep(poll_s)
    return 0


def main(argv: list[str]) -> int:
    """``python -m worker_agent.fence FILE PID GRACE_S [--spare-leader] [--container PODMAN
    NAME]``."""
    container = None
    if "--container" in argv:
        at = argv.index("--container")
        if len(argv) < at + 3:
            print("--container needs PODMAN NAME", file=sys.stderr)
            return 2
        container = (argv[at + 1], argv[at + 2])
        argv = argv[:at] + argv[at + 3 :]
    args = [a for a in argv if a != "--spare-leader"]
    if len(args) != 3:
        usage = "usage: python -m worker_agent.fence FILE PID GRACE_S [--spare-leader]"
        print(usage, file=sys.stderr)
        return 2
    return watch(
        args[0],
        int(args[1]),
        float(args[2]),
        spare_leader="--spare-leader" in argv,
        out=sys.stdout.fileno(),
        container=container,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
