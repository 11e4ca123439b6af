"""examples/torch_ddp without torch: run.sh's process count and the pinned torch wheel.

run.sh runs for real under ``sh`` with a fake ``python`` first on PATH that prints its
arguments, one a line. The training itself (torch, two gloo processes) is the end-to-end
test's business.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torch_ddp"
FAKE_PYTHON = '#!/bin/sh\nprintf "%s\\n" "$@"\nprintf "OMP_NUM_THREADS=%s\\n" "$OMP_NUM_THREADS"\n'


def run_sh(tmp_path: Path, cuda_visible_devices: str | None, *args: str) -> list[str]:
    """The arguments run.sh gives ``python`` (then the OMP_NUM_THREADS it exports)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {
        k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
    }
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    sh = shutil.which("sh")
    assert sh is not None
    done = subprocess.run(
        [sh, str(EXAMPLE / "run.sh"), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.parametrize(
    ("devices", "nproc"),
    [
        ("0,1", 2),
        (None, 1),
        ("", 1),
        ("3", 1),
        ("0,1,2,3,4,5,6,7", 8),
        ("GPU-8f1c,GPU-22ab", 2),  # UUIDs count the same
        ("0,1,", 2),  # a trailing comma adds no process
        ("*,?", 2),  # entries are never globbed against the working directory
    ],
)
def test_run_sh_starts_one_process_per_visible_gpu(
    tmp_path: Path, devices: str | None, nproc: int
) -> None:
    (tmp_path / "a").touch()  # something for a stray glob to match
    argv = run_sh(tmp_path, devices, "--epochs", "5")
    assert argv == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(EXAMPLE / "train.py"),
        "--epochs",
        "5",
        "OMP_NUM_THREADS=1",
    ]


def test_run_sh_passes_arguments_through_unchanged(tmp_path: Path) -> None:
    argv = run_sh(tmp_path, "0,1", "--data", "a file.pt", "--lr", "")
    assert argv[-5:-1] == ["--data", "a file.pt", "--lr", ""]


def wheel_dirs() -> list[Path]:
    """The directories pip's ``PIP_FIND_LINKS`` names (space-separated), /opt/wheels if unset."""
    return [Path(p) for p in (os.environ.get("PIP_FIND_LINKS") or "/opt/wheels").split()]


def test_requirements_pin_torch_alone_and_the_disk_has_that_wheel() -> None:
    lines = [
        line.split("#")[0].strip()
        for line in (EXAMPLE / "requirements.txt").read_text().splitlines()
    ]
    pins = [line for line in lines if line]
    assert len(pins) == 1, pins
    name, _, version = pins[0].partition("==")
    assert name == "torch" and re.fullmatch(r"\d+\.\d+\.\d+", version), pins
    wheels = [w.name for d in wheel_dirs() if d.is_dir() for w in d.glob("torch-*.whl")]
    # `torch==X` matches the local version `X+cpu`; the wheel's name carries it
    matching = [w for w in wheels if re.match(rf"torch-{re.escape(version)}(\+[\w.]+)?-", w)]
    assert matching, f"no wheel for torch=={version} in {wheel_dirs()}: {wheels}"


@pytest.mark.parametrize("name", ["train.py", "make_data.py"])
def test_python_files_parse_and_document_themselves(name: str) -> None:
    tree = ast.parse((EXAMPLE / name).read_text())
    assert ast.get_docstring(tree)
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert "main" in {f.name for f in functions}
    assert all(ast.get_docstring(f) for f in functions if not f.name.startswith("_"))
