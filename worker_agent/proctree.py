"""Process trees on Linux: find a process's descendants, signal and kill a whole tree.

Reads ``/proc`` and sends signals; nothing else (the standard library only), so the
lease fence (``fence.py``), which runs as a process of its own next to every job,
loads it cheaply. :mod:`worker_agent.process` runs jobs and uses it to stop them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

__all__ = ["alive", "descendants", "kill_tree", "process_start", "stop_tree"]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere), children first."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_all(pgid: int, pids: list[int], sig: int) -> None:
    """``sig`` to the process group ``pgid`` (0: none) and to every pid in ``pids``."""
    if pgid > 0:
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def kill_tree(proc: subprocess.Popen[bytes], grace_s: float, *, spare_leader: bool = False) -> int:
    """SIGTERM the process's group and descendants, SIGKILL after ``grace_s``; its exit code.

    Descendants that left the process group (setsid) are found through /proc
    before the first signal and get the same treatment. ``spare_leader``: the
    process is a wrapper (bwrap) whose death would kill the job at once, so the
    SIGTERM goes to its descendants only; the SIGKILL goes to all.
    """
    pids = descendants(proc.pid)
    if spare_leader:
        _signal_all(0, pids, signal.SIGTERM)
    else:
        _signal_all(proc.pid, pids, signal.SIGTERM)
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        # Whatever is left of the tree (the leader may have exited first) gets SIGKILL.
        left = [p for p in pids if alive(p)]
        if left or proc.poll() is None:
            _signal_all(proc.pid, left, signal.SIGKILL)
    return proc.wait()


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (a zombie's too: it still holds its
    pid and process group); None once it is gone. Tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[19])


def stop_tree(pid: int, born: int, grace_s: float, *, spare_leader: bool = False) -> None:
    """:func:`kill_tree` for a process that is not our child, known by its pid and start
    time ``born`` (:func:`process_start`): nothing is signalled once that pid is another
    process. The leader's descendants are found first and checked the same way."""
    tree = [(p, process_start(p)) for p in descendants(pid)]

    def mine() -> bool:
        return process_start(pid) == born

    def left() -> list[int]:
        return [p for p, t in tree if t is not None and process_start(p) == t and alive(p)]

    if not mine():
        return
    _signal_all(0 if spare_leader else pid, left(), signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and (alive(pid) or left()):
        time.sleep(0.05)
    if mine():
        _signal_all(pid, left(), signal.SIGKILL)
    else:
        _signal_all(0, left(), signal.SIGKILL)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"
