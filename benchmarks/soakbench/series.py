"""The soak's samples file: several runs on one database make one curve.

``HOME/soak-samples.json`` holds ``{"runs": [...], "samples": [...]}``. A sample is taken
every ``--sample-every`` jobs completed (and when the series crosses 10,000 jobs); its
``jobs_completed`` counts every run of the series, so a later run continues the curve.
Each sample carries the broker's RSS, the database size and the interval's latencies
(``None`` where the interval had no such event).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["START_JOBS", "Interval", "Series", "percentile"]

#: ``rss_mb_start`` is the broker's RSS once the series has completed this many jobs.
START_JOBS = 10_000


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (sorts a copy); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return round(ordered[min(rank, len(ordered)) - 1], 2)


@dataclass
class Interval:
    """Latencies (ms) observed since the last sample."""

    submit_to_assign: list[float] = field(default_factory=list)
    create: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)

    def figures(self) -> dict[str, float | None]:
        """p50/p99 of each latency, keyed as in a sample."""
        out: dict[str, float | None] = {}
        for name, values in (
            ("submit_to_assign", self.submit_to_assign),
            ("create_job", self.create),
            ("get_job", self.get),
        ):
            out[f"{name}_p50_ms"] = percentile(values, 50)
            out[f"{name}_p99_ms"] = percentile(values, 99)
        return out


class Series:
    """The samples file of one soak home."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data: dict[str, Any] = {"runs": [], "samples": []}
        if path.exists():
            data = json.loads(path.read_text())
        self.runs: list[dict[str, Any]] = data["runs"]
        self.samples: list[dict[str, Any]] = data["samples"]

    @property
    def jobs_completed(self) -> int:
        """Jobs completed by every finished run of the series."""
        return sum(int(r["jobs_completed"]) for r in self.runs)

    def add_sample(self, sample: dict[str, Any]) -> None:
        """Append one sample and save (a run that dies keeps what it measured)."""
        self.samples.append(sample)
        self.save()

    def add_run(self, run: dict[str, Any]) -> None:
        """Record a finished run and save."""
        self.runs.append(run)
        self.save()

    def save(self) -> None:
        """Write the file atomically."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"runs": self.runs, "samples": self.samples}, indent=1))
        os.replace(tmp, self.path)

    def rss_mb_start(self) -> float | None:
        """RSS at the first sample at or past START_JOBS (else the first sample's)."""
        for s in self.samples:
            if s["jobs_completed"] >= START_JOBS:
                return float(s["rss_mb"])
        return float(self.samples[0]["rss_mb"]) if self.samples else None

    def rss_mb_end(self) -> float | None:
        """RSS at the last sample."""
        return float(self.samples[-1]["rss_mb"]) if self.samples else None
