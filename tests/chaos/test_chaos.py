"""Chaos: kill -9 the broker and agents while jobs run; nothing is lost, done twice or billed twice.

The scenario lives in ``benchmarks/chaos.py`` (:func:`run_chaos`), which also
runs it longer. Here at CI size: a real broker process (SQLite), three real
agent processes (simulated GPUs, the `local` executor so the run fits CI's
budget; the Ray path is covered by tests/e2e), 50 one-GPU jobs of 1-3 s. While
they run the broker is killed with SIGKILL twice and restarted on the same
database and port, and a rig (the agent and every process it started, as when
a rig loses power) is killed three times and restarted with its saved
identity. At the end:

- every job is final (and, with attempts to spare, SUCCEEDED);
- no job ever ran in two processes at the same time (each job process writes
  its start and a heartbeat every 50 ms; the attempts' intervals must not overlap);
- `rigshift admin verify-ledger` passes: the ledger balances, every ended
  attempt is settled exactly once.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos.py"
_spec = importlib.util.spec_from_file_location("rigshift_benchmarks_chaos", _PATH)
assert _spec is not None and _spec.loader is not None
chaos = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = chaos
_spec.loader.exec_module(chaos)

PLAN = chaos.ChaosPlan(jobs=50, agents=3, broker_kills=2, agent_kills=3, seed=7)


def test_max_overlap() -> None:
    assert chaos.max_overlap([]) == 0
    assert chaos.max_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # back to back is not concurrent
    assert chaos.max_overlap([(0, 2), (1, 3), (1.5, 1.6)]) == 3


@pytest.mark.timeout(420)
def test_kill_9_broker_and_rigs_while_jobs_run(tmp_path: Path) -> None:
    report = chaos.run_chaos(PLAN, tmp_path)
    assert report.broker_kills_done == 2 and report.agent_kills_done == 3
    assert report.all_terminal, report.states
    assert report.states == {"SUCCEEDED": PLAN.jobs}, report.not_succeeded
    assert report.attempts >= PLAN.jobs
    assert not report.leftover_processes
    assert report.jobs_that_ran == PLAN.jobs
    assert report.overlaps == []
    assert report.max_concurrent_runs_per_job == 1
    assert report.ledger_ok, report.ledger_output
