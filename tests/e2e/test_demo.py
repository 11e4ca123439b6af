"""``rigshift demo`` end to end: a broker, two farms of two rigs, a dozen jobs, < 3 minutes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from harness.fleet import rigshift_argv


def test_demo_passes_in_under_3_minutes(tmp_path: Path) -> None:
    t0 = time.monotonic()
    result = subprocess.run(
        [*rigshift_argv(), "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    took = time.monotonic() - t0
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "demo PASSED" in out and "every process the demo started has exited" in out
    assert out.count(" SUCCEEDED ") >= 12  # the summary table
    assert "north-farm" in out and "south-farm" in out
    assert took < 180, f"the demo took {took:.0f} s"
