"""``rigshift agent selftest [--json]`` on simulated rigs (no process: CliRunner)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker_agent import gpu
from worker_agent.cli import agent_group
from worker_agent.gpu import SimulatedBackend
from worker_agent.mining import STATUS_FILE


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(agent_group, ["selftest", *args])
    return result.exit_code, result.output


def test_json_has_each_gpus_figures_score_verdict_and_the_host(tmp_path: Path) -> None:
    code, out = run("--simulate", "RTX3090x2,A5000", "--state-dir", str(tmp_path), "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["backend"] == "simulated"
    assert [g["model"] for g in doc["gpus"]] == ["RTX 3090", "RTX 3090", "A5000"]
    for g in doc["gpus"]:
        assert g["verification"] == "VERIFIED" and g["reason"] == ""
        assert g["measurement"]["method"] == "simulated" and g["measurement"]["error"] == ""
    riser, slot = doc["gpus"][0], doc["gpus"][2]
    assert 95 <= riser["score"] <= 103 and 120 <= slot["score"] <= 130
    assert (riser["pcie_generation"], riser["pcie_link_width"]) == (1, 1)
    assert riser["measurement"]["h2d_mbps"] < 1000 < 24_000 < slot["measurement"]["h2d_mbps"]
    assert doc["host"]["cpu_cores"] == os.cpu_count() and doc["host"]["ram_mb"] > 0
    assert doc["host"]["disk_write_mbps"] > 0


def test_text_output(tmp_path: Path) -> None:
    code, out = run("--simulate", "CMP90HX", "--state-dir", str(tmp_path))
    assert code == 0, out
    assert "GPU  0  CMP 90HX" in out and "VERIFIED" in out
    assert "PCIe gen1 x4" in out and "TFLOPS" in out
    assert "CPU cores" in out and "MiB RAM" in out


def test_only_the_gpus_asked_for(tmp_path: Path) -> None:
    code, out = run("--simulate", "RTX3060x4", "--state-dir", str(tmp_path), "--gpu", "2", "--json")
    assert code == 0, out
    assert [g["index"] for g in json.loads(out)["gpus"]] == [2]


def test_gpus_a_running_agent_uses_are_skipped(tmp_path: Path) -> None:
    # What a running agent writes (mining.py): our own pid stands for the live agent.
    rows = [
        {"index": 0, "state": "idle"},
        {"index": 1, "state": "ai"},
        {"index": 2, "state": "mining"},
    ]
    (tmp_path / STATUS_FILE).write_text(json.dumps({"pid": os.getpid(), "gpus": rows}))
    code, out = run("--simulate", "RTX3090x3", "--state-dir", str(tmp_path), "--json")
    assert code == 0, out
    gpus = {g["index"]: g for g in json.loads(out)["gpus"]}
    assert "measurement" in gpus[0] and "skipped" not in gpus[0]
    assert gpus[1]["skipped"] == "holds a job's attempt (the agent running here)"
    assert "measurement" not in gpus[1] and "verification" not in gpus[1]
    assert "miner" in gpus[2]["skipped"]
    code, out = run("--simulate", "RTX3090x3", "--state-dir", str(tmp_path))
    assert "GPU  1  RTX 3090     skipped: holds a job's attempt" in out


def test_an_agent_no_longer_running_leaves_every_gpu_to_test(tmp_path: Path) -> None:
    rows = [{"index": 0, "state": "ai"}]
    (tmp_path / STATUS_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "gpus": rows}))
    code, out = run("--simulate", "RTX3090", "--state-dir", str(tmp_path), "--json")
    assert code == 0 and "measurement" in json.loads(out)["gpus"][0]


def test_an_impostor_is_unverified_and_the_exit_status_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Impostor(SimulatedBackend):
        def selftest_factor(self, index: int) -> float:
            return 1 / 3 if index == 0 else 1.0

    monkeypatch.setattr(gpu, "open_backend", lambda spec: Impostor(spec, seed="t"))
    code, out = run("--simulate", "RTX3090x2", "--state-dir", str(tmp_path), "--json")
    assert code == 1
    gpus = json.loads(out)["gpus"]
    assert gpus[0]["verification"] == "UNVERIFIED" and gpus[1]["verification"] == "VERIFIED"
    assert "of a RTX 3090's" in gpus[0]["reason"] and gpus[0]["score"] < 40


def test_settings_from_the_agents_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    state = tmp_path / "state"
    path.write_text(
        f'broker_address = "b:1"\nenrollment_token = "t"\nsimulate = "A4000x2"\n'
        f'state_dir = "{state}"\n'
    )
    code, out = run("--config", str(path), "--json")
    assert code == 0, out
    assert [g["model"] for g in json.loads(out)["gpus"]] == ["A4000", "A4000"]
    assert state.is_dir() and list(state.iterdir()) == []


def test_an_unknown_model_is_a_usage_error(tmp_path: Path) -> None:
    code, out = run("--simulate", "GTX1080x2", "--state-dir", str(tmp_path))
    assert code == 2 and "unknown GPU model 'GTX1080'" in out
