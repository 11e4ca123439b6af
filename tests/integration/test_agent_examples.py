"""The example training jobs: they train, checkpoint every epoch and resume after a kill."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = ["--samples", "3000", "--hidden", "32", "--min-accuracy", "0.3"]


def run(example: str, ckpt: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RIGSHIFT_CHECKPOINT_DIR": str(ckpt), "RIGSHIFT_JOB_ID": "t"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / example / "train.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_numpy_mlp_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    first = run("mlp_numpy", tmp_path, "--epochs", "3", *SMALL)
    assert first.returncode == 0, first.stderr
    assert "epoch 3/3" in first.stdout and "final test accuracy" in first.stdout
    assert (tmp_path / "checkpoint.npz").exists()
    second = run("mlp_numpy", tmp_path, "--epochs", "5", *SMALL)
    assert second.returncode == 0, second.stderr
    assert "resumed from checkpoint of epoch 3" in second.stdout
    assert "epoch 3/5" not in second.stdout and "epoch 4/5" in second.stdout


def test_numpy_mlp_resumes_after_a_kill(tmp_path: Path) -> None:
    args = ["--epochs", "60", "--samples", "20000", "--hidden", "128", "--min-accuracy", "0.3"]
    env = {**os.environ, "RIGSHIFT_CHECKPOINT_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "mlp_numpy" / "train.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 2/"):
            break
    proc.send_signal(signal.SIGKILL)  # a lost rig: no chance to clean up
    proc.wait()
    time.sleep(0.1)
    again = run("mlp_numpy", tmp_path, *args[:1], "3", *args[2:])
    assert "resumed from checkpoint of epoch" in again.stdout
    done = int(again.stdout.split("resumed from checkpoint of epoch ")[1].split()[0])
    assert done >= 2


def test_the_default_numpy_run_is_a_real_10_to_30_s_job() -> None:
    source = (EXAMPLES / "mlp_numpy" / "train.py").read_text()
    assert "default=40" in source and "default=60_000" in source  # measured: ~16 s on one core


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_torch_variant_says_torch_is_missing(tmp_path: Path) -> None:
    result = run("mlp_torch", tmp_path, "--epochs", "1")
    assert result.returncode == 3 and "torch is not installed" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs the torch extra")
def test_torch_variant_trains_and_resumes(tmp_path: Path) -> None:
    first = run("mlp_torch", tmp_path, "--epochs", "2", *SMALL)
    assert first.returncode == 0, first.stderr
    second = run("mlp_torch", tmp_path, "--epochs", "3", *SMALL)
    assert "resumed from checkpoint of epoch 2" in second.stdout
