"""The soak's PNG: broker RSS (and database size), p99 latencies and lifecycles/s over jobs
completed (the whole series; a dotted line where a run started a broker on the database).

matplotlib is the ``bench`` extra (``pip install -e '.[bench]'``); without it
:func:`write_plot` writes nothing and returns a sentence saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_plot"]


def write_plot(samples: list[dict[str, Any]], path: Path, title: str) -> str:
    """Draw the samples to ``path``; return an empty string, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is missing (pip install -e '.[bench]')"
    if not samples:
        return "no plot: no samples"
    x = [s["jobs_completed"] for s in samples]
    fig, (ax_rss, ax_lat, ax_rate) = plt.subplots(
        3, 1, sharex=True, figsize=(8, 8), dpi=80, height_ratios=(3, 3, 2)
    )
    ax_rss.plot(x, [s["rss_mb"] for s in samples], marker=".", label="broker RSS")
    ax_rss.set_ylabel("RSS (MB)")
    ax_db = ax_rss.twinx()
    ax_db.plot(
        x, [s["db_bytes"] / 2**20 for s in samples], color="tab:gray", ls="--", label="database"
    )
    ax_db.set_ylabel("database (MB)", color="tab:gray")
    lines = ax_rss.get_lines() + ax_db.get_lines()
    ax_rss.legend(lines, [str(ln.get_label()) for ln in lines], loc="upper left")
    for key, label in (
        ("submit_to_assign_p99_ms", "p99 submit→assign"),
        ("create_job_p99_ms", "p99 CreateJob"),
        ("get_job_p99_ms", "p99 GetJob"),
    ):
        pts = [(xi, s[key]) for xi, s in zip(x, samples, strict=True) if s.get(key) is not None]
        if pts:
            ax_lat.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
    ax_lat.set_ylabel("ms (per interval)")
    ax_lat.legend(loc="upper left")
    rates = [(xi, s["lifecycles_per_s"]) for xi, s in zip(x, samples, strict=True)]
    rates = [r for r in rates if r[1] is not None]
    ax_rate.plot([r[0] for r in rates], [r[1] for r in rates], color="tab:green", marker=".")
    ax_rate.set_ylabel("lifecycles/s")
    ax_rate.set_ylim(bottom=0)
    ax_rate.set_xlabel("jobs completed")
    starts = sorted({s["jobs_completed"] - s["run_jobs_completed"] for s in samples})
    for start in starts[1:]:  # a broker restart between runs of the series
        for ax in (ax_rss, ax_lat, ax_rate):
            ax.axvline(start, color="tab:red", lw=0.5, ls=":")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return ""
