"""``rigshift agent …`` is cheap to import: a fresh interpreter imports the CLI without Ray,
pynvml or the agent."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_cli_does_not_import_ray_or_grpc_stubs() -> None:
    code = (
        "import sys, worker_agent.cli, worker_agent;"
        "bad = [m for m in ('ray', 'pynvml', 'worker_agent.agent') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
