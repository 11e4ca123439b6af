"""The efficient power policy end to end (issue 16): a real broker and two real agent
processes, each the only rig of its farm, each a simulated RTX 3090 (``local`` executor,
no Ray).

Farm A runs at ``max``; farm B at ``efficient`` with a 10 % slowdown allowed
(``rigshift farm update --power-policy efficient --max-slowdown-percent 10``). ListWorkers
shows B's GPU with an AI limit under its board limit and its score at that limit, A's
with none. One job goes to each farm: A asks less, so the first job (its price limit
under B's ask) can only run on A; the second, sent while A's only GPU holds the first,
can only run on B. Both wait for a file the test writes. B's attempt draws less energy
per GPU-second (the simulated power model draws min(uncapped, cap)); the earnings show
energy saved on B only; ``rigshift admin verify-ledger`` passes. Nothing asserts timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.fleet import LocalFleet, rigshift_argv
from rigshift.v1 import farm_pb2, job_pb2

pytestmark = pytest.mark.timeout(180)

S = job_pb2.Job
MODEL = "RTX 3090"
ASK_A = 300_000  # micro-dollars per GPU-hour
ASK_B = 400_000
HOLD_S = 4.0  # how long both jobs run before the test releases them
WAIT_FOR_FILE = (
    "import os, sys, time\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    time.sleep(0.05)\n"
    "print('trained')\n"
)


def _cli(fleet: LocalFleet, *args: str, broker: str = "") -> subprocess.CompletedProcess[str]:
    """``rigshift ARGS...`` as the admin (the broker at ``broker`` when given)."""
    return subprocess.run(
        [*rigshift_argv(), *args],
        env={**os.environ, **fleet.env, **({"RIGSHIFT_BROKER": broker} if broker else {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _wait(what: str, probe: Any, timeout_s: float = 90.0) -> Any:
    """Poll ``probe`` until it returns something truthy (a deadline, not a timing claim)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"waited too long for {what}"
        time.sleep(0.1)


def _job_in(client: Any, name: str, states: tuple[int, ...]) -> job_pb2.Job | None:
    job = client.get_job(name)
    assert job.state not in (S.FAILED, S.CANCELLED), job
    return job if job.state in states else None


def test_efficient_farm_caps_its_gpu_and_draws_less_per_gpu_second(tmp_path: Path) -> None:
    with LocalFleet(tmp_path) as fleet:
        address = fleet.start_broker(lease_ttl_s=6, heartbeat_interval_s=1)
        client = fleet.client()
        farm_a = client.create_farm("farm-a", ask_micros_per_gpu_hour={MODEL: ASK_A})
        farm_b = client.create_farm("farm-b", ask_micros_per_gpu_hour={MODEL: ASK_B})
        changed = _cli(
            fleet,
            "farm",
            "update",
            farm_b.name,
            "--power-policy",
            "efficient",
            "--max-slowdown-percent",
            "10",
            broker=address,
        )
        assert changed.returncode == 0, changed.stdout + changed.stderr
        b = client.get_farm(farm_b.name)
        assert b.power_policy == farm_pb2.POWER_POLICY_EFFICIENT and b.max_slowdown_percent == 10
        assert client.get_farm(farm_a.name).power_policy != farm_pb2.POWER_POLICY_EFFICIENT

        for name, farm in (("rig-a", farm_a), ("rig-b", farm_b)):
            fleet.start_agent(
                name,
                farm.enrollment_token,
                simulate="RTX3090x1",
                executor="local",
                heartbeat_interval_s=1,
                lease_ttl_s=6,
            )
        workers = {w.farm: w for w in fleet.wait_workers(2)}
        (gpu_a,) = workers[farm_a.name].gpus
        (gpu_b,) = workers[farm_b.name].gpus
        assert gpu_a.model == gpu_b.model == MODEL
        assert len(gpu_b.power_curve) >= 2  # the self-test swept it
        assert 0 < gpu_b.ai_power_limit_watts < gpu_b.power_limit_watts  # capped under board
        assert gpu_a.ai_power_limit_watts == 0  # max: the board limit
        # B's score is measured at its cap: a little under A's, within the 10 % allowed. Each
        # rig's simulated self-test measures within ±3 % of the reference, so A may read 3 %
        # high and B 3 % low (89 against 102 failed a bound without that); scores are whole.
        assert gpu_b.score < gpu_a.score
        assert gpu_b.score >= gpu_a.score * 0.9 * 0.97 / 1.03 - 1

        release = tmp_path / "release"
        command = [sys.executable, "-c", WAIT_FOR_FILE, str(release)]
        on_a = client.create_job(
            command, gpu_model=MODEL, max_price_micros_per_gpu_hour=ASK_A + 50_000
        ).name
        running_a = _wait("job A running", lambda: _job_in(client, on_a, (S.RUNNING,)))
        assert running_a.attempts[-1].worker == workers[farm_a.name].name
        on_b = client.create_job(command, gpu_model=MODEL).name
        running_b = _wait("job B running", lambda: _job_in(client, on_b, (S.RUNNING,)))
        assert running_b.attempts[-1].worker == workers[farm_b.name].name

        # Both run a while before they end. Energy is metered by the agent from the assignment,
        # GPU time by the broker between its receipt of "started" and of "finished"; the
        # reports' lag (tenths of a second on a loaded machine) is a large share of a job that
        # ends at once, and the 23 % gap between B's cap and A's draw must not drown in it.
        time.sleep(HOLD_S)
        release.write_text("go")
        done_a = _wait("job A done", lambda: _job_in(client, on_a, (S.SUCCEEDED,)))
        done_b = _wait("job B done", lambda: _job_in(client, on_b, (S.SUCCEEDED,)))
        (att_a,) = done_a.attempts
        (att_b,) = done_b.attempts
        assert att_a.gpu_milliseconds > 0 and att_b.gpu_milliseconds > 0
        assert att_a.energy_joules > 0 and att_b.energy_joules > 0
        per_ms_a = att_a.energy_joules / att_a.gpu_milliseconds
        per_ms_b = att_b.energy_joules / att_b.gpu_milliseconds
        assert per_ms_b < per_ms_a, (att_a, att_b)
        # The cap bounds B's draw (J per GPU-ms is kW): its AI limit, plus what the report lag
        # can add to a job of HOLD_S seconds (uncapped, it would draw 30 % over the limit).
        assert per_ms_b * 1000 <= gpu_b.ai_power_limit_watts * 1.08

        saved = {r.farm: r.energy_saved_joules for r in client.get_earnings().rows}
        assert saved[farm_b.name] > 0
        assert saved[farm_a.name] == 0
        shown = _cli(fleet, "farm", "earnings", "--farm", farm_b.name, "--json", broker=address)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        (row,) = json.loads(shown.stdout)["rows"]
        assert int(row["energy_saved_joules"]) > 0

        db = f"sqlite:///{fleet.root / 'broker' / 'broker.db'}"
        ledger = _cli(fleet, "admin", "verify-ledger", "--db", db, "--json")
        assert ledger.returncode == 0, ledger.stdout + ledger.stderr
        assert json.loads(ledger.stdout)["ok"] is True
