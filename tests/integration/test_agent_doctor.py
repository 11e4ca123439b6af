"""``rigshift agent doctor`` against a real broker (``start_broker``: real gRPC, real SQLite).

The CLI runs through click's CliRunner; the GPU, clock and disk checks also get
fakes injected (a simulated backend standing in for NVML, a fixed adjtimex
reading, a fixed disk usage) so that both outcomes are tested on any machine.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from broker_harness import RunningBroker, start_broker
from click.testing import CliRunner, Result
from pki import make_pki

from worker_agent.cli import agent_group
from worker_agent.doctor import (
    GIB,
    DoctorInput,
    Finding,
    broker_clock_offset,
    check_clock,
    check_disk,
    check_gpu,
    check_power,
    format_finding,
)
from worker_agent.gpu import SimulatedBackend

pytestmark = pytest.mark.timeout(90)

CHECKS = [
    "gpu",
    "power",
    "power-limit",
    "broker",
    "tls",
    "ray",
    "shm",
    "clock",
    "disk",
    "containers",
]


def doctor(*args: str) -> Result:
    return CliRunner().invoke(agent_group, ["doctor", *args])


def doctor_json(*args: str) -> tuple[int, list[dict[str, Any]]]:
    result = doctor(*args, "--json")
    assert "Traceback" not in result.output, result.output
    return result.exit_code, json.loads(result.stdout)


def by_check(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["check"]: r for r in rows}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


def test_a_reachable_broker_passes_and_the_simulated_gpus_are_reported_honestly(
    broker_address: str, tmp_path: Path
) -> None:
    code, rows = doctor_json(
        "--broker",
        broker_address,
        "--token",
        "rsft_x",
        "--simulate",
        "RTX3090x4",
        "--state-dir",
        str(tmp_path / "agent"),
    )
    assert [r["check"] for r in rows] == CHECKS
    for row in rows:
        assert set(row) == {"check", "status", "finding", "fix"}
        assert row["status"] in {"PASS", "WARN", "FAIL"}
        assert (row["fix"] == "") == (row["status"] == "PASS"), row
    checks = by_check(rows)
    assert checks["broker"]["status"] == "PASS"
    assert checks["broker"]["finding"].startswith(f"{broker_address} serving")
    assert "plaintext" in checks["broker"]["finding"]
    gpu = checks["gpu"]
    assert gpu["status"] == "WARN" and "RTX3090x4" in gpu["finding"]
    assert "simulate" in gpu["finding"]
    power = checks["power"]
    assert power["status"] == "PASS" and "4 GPU(s) read twice" in power["finding"]
    assert "simulated values" in power["finding"]
    assert checks["tls"]["status"] == "PASS" and "plaintext" in checks["tls"]["finding"]
    assert checks["ray"]["status"] == "PASS" and "token authentication" in checks["ray"]["finding"]
    assert code == (1 if any(r["status"] == "FAIL" for r in rows) else 0)


def test_a_closed_broker_address_fails_with_a_fix_line(tmp_path: Path) -> None:
    address = f"127.0.0.1:{closed_port()}"
    result = doctor(
        "--broker",
        address,
        "--simulate",
        "RTX3060",
        "--state-dir",
        str(tmp_path),
        "--timeout-s",
        "3",
    )
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    [i] = [n for n, line in enumerate(lines) if line.startswith("FAIL  broker: ")]
    assert lines[i].startswith(f"FAIL  broker: cannot reach {address} over plaintext: UNAVAILABLE")
    assert lines[i + 1].startswith("      fix: check that the broker runs")
    # every check is one line, then at most one fix line
    heads = [line for line in lines if not line.startswith("      fix: ")]
    assert [h.split()[1].rstrip(":") for h in heads] == ["token", *CHECKS]


def test_the_config_file_install_writes_is_checked(
    running_broker: RunningBroker, tmp_path: Path
) -> None:
    installed = CliRunner().invoke(
        agent_group,
        [
            "install",
            "--broker",
            running_broker.address,
            "--token",
            "rsft_doctor",
            "--simulate",
            "A4000x2",
            "--config-dir",
            str(tmp_path / "etc"),
            "--unit-dir",
            str(tmp_path / "units"),
        ],
    )
    assert installed.exit_code == 0, installed.output
    config = tmp_path / "etc" / "agent.toml"
    code, rows = doctor_json("--config", str(config), "--state-dir", str(tmp_path))
    checks = by_check(rows)
    assert [r["check"] for r in rows] == ["config", *CHECKS]
    assert checks["config"]["status"] == "PASS" and "mode 0600" in checks["config"]["finding"]
    assert checks["broker"]["status"] == "PASS"  # the address came from the file
    assert "A4000x2" in checks["gpu"]["finding"]  # and the simulated rig too
    config.chmod(0o644)
    _, rows = doctor_json("--config", str(config), "--state-dir", str(tmp_path))
    assert by_check(rows)["config"]["status"] == "WARN"
    assert by_check(rows)["config"]["fix"] == f"chmod 600 {config}"
    config.write_text('broker_address = "x:1"\nenrollment_token = "t"\nheartbeat_interval = 3\n')
    code, rows = doctor_json("--config", str(config), "--state-dir", str(tmp_path))
    assert code == 1
    assert by_check(rows)["config"]["status"] == "FAIL"
    assert "unknown key 'heartbeat_interval'" in by_check(rows)["config"]["finding"]


# -- TLS ---------------------------------------------------------------------------------


def test_tls_handshake_with_the_ca_and_plaintext_broker_refusing_it(
    tmp_path: Path, broker_address: str
) -> None:
    pki = make_pki(tmp_path / "pki")
    tls_broker = start_broker(
        tmp_path / "tls-broker",
        listen="localhost:0",
        tls_cert=str(pki / "server.crt"),
        tls_key=str(pki / "server.key"),
    )
    try:
        args = ["--simulate", "RTX3060", "--state-dir", str(tmp_path), "--tls-ca"]
        _, rows = doctor_json("--broker", tls_broker.address, *args, str(pki / "ca.crt"))
    finally:
        tls_broker.stop()
    checks = by_check(rows)
    assert checks["broker"]["status"] == "PASS" and "over TLS" in checks["broker"]["finding"]
    tls = checks["tls"]
    assert "handshake with localhost" in tls["finding"] and "verified with" in tls["finding"]
    assert tls["status"] == "PASS"
    # The CA given, but the broker speaks plaintext: no handshake, both checks fail.
    code, rows = doctor_json("--broker", broker_address, *args, str(pki / "ca.crt"))
    checks = by_check(rows)
    assert code == 1
    assert checks["tls"]["status"] == "FAIL" and "no TLS handshake" in checks["tls"]["finding"]
    assert "drop --tls-ca" in checks["tls"]["fix"]
    assert checks["broker"]["status"] == "FAIL"


# -- checks with fakes: both outcomes on any machine -------------------------------------


def _no_driver() -> Any:
    import pynvml

    raise pynvml.NVMLError_LibraryNotFound()


def test_gpu_without_a_driver_fails_unless_simulating() -> None:
    finding, backend = check_gpu(DoctorInput(), open_nvml=_no_driver)
    assert backend is None
    assert finding.status == "FAIL"
    assert finding.finding.startswith("no NVIDIA driver (libnvidia-ml not found)")
    assert "nvidia-smi" in finding.fix
    assert check_power(backend).status == "FAIL"
    finding, backend = check_gpu(DoctorInput(simulate="RTX3090x4"), open_nvml=_no_driver)
    assert format_finding(finding).splitlines()[0] == (
        "WARN  gpu: no NVIDIA driver (libnvidia-ml not found); "
        "the simulated backend would be used: RTX3090x4"
    )
    assert backend.name == "simulated" and len(backend.gpus()) == 4


def test_gpu_with_nvml_passes_and_power_readings_are_checked() -> None:
    finding, _ = check_gpu(DoctorInput(), open_nvml=lambda: SimulatedBackend("RTX3080x2"))
    assert finding == Finding("gpu", "PASS", "NVML: 2 GPU(s): 0: RTX 3080, 1: RTX 3080")

    class ZeroWatts(SimulatedBackend):
        name = "nvml"

        def power_watts(self, index: int) -> float:
            return 0.0 if index == 1 else 40.0

    power = check_power(ZeroWatts("RTX3080x2"), interval_s=0.01)
    assert power.status == "WARN"
    assert power.finding == "implausible readings: GPU 1 read 0.0, 0.0 W (limit 320 W)"
    good = check_power(SimulatedBackend("RTX3080x2"), interval_s=0.01)
    assert good.status == "PASS" and "20.0 to 20.0 W" in good.finding


def test_clock_from_the_kernel_ntp_state() -> None:
    synced = check_clock(read=lambda: (0, 0x2001, 52_000, 1_500))
    assert synced.status == "PASS"
    assert "estimated error 1.5 ms, max 52.0 ms" in synced.finding
    unsynced = check_clock(read=lambda: (5, 0x40, 16_000_000, 16_000_000))
    assert unsynced.status == "WARN" and "unsynchronised" in unsynced.finding
    assert "chrony" in unsynced.fix


def test_clock_skew_against_the_broker(broker_address: str) -> None:
    """The real broker sends its time with the health check: same machine, so ~0 skew."""
    offset = broker_clock_offset(DoctorInput(broker_address=broker_address))
    assert offset is not None and abs(offset) < 1.0
    synced = (0, 0x2001, 52_000, 1_500)
    near = check_clock(read=lambda: synced, offset_s=offset)
    assert near.status == "PASS" and "broker clock" in near.finding
    assert check_clock(read=lambda: synced, offset_s=5.0).status == "WARN"
    behind = check_clock(read=lambda: synced, offset_s=120.0)
    assert behind.status == "FAIL" and "120.0 s behind the broker's" in behind.finding
    assert broker_clock_offset(DoctorInput(broker_address="127.0.0.1:1", timeout_s=1)) is None


def test_disk_thresholds(tmp_path: Path) -> None:
    def free(n: float) -> Any:
        return lambda _p: SimpleNamespace(free=int(n * GIB))

    assert check_disk(tmp_path, usage=free(1.5)).status == "FAIL"
    assert check_disk(tmp_path, usage=free(5)).status == "WARN"
    ok = check_disk(tmp_path / "not" / "yet", usage=free(50))
    assert ok.status == "PASS" and "not created yet" in ok.finding
