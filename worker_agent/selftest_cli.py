"""``rigshift agent selftest``: run the self-test on this rig and show what the broker
will make of it (``worker_agent/selftest.py``; ``docs/gpu.md``).

GPUs that an agent running with the same state directory uses are left out: its
``gpus.json`` (``mining.read_status``) says which GPUs hold a job's attempt (``ai``) or
run the operator's miner; those are listed as skipped, never measured under a job.
Imports nothing heavy at module level (the ``rigshift`` CLI imports this module).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

__all__ = ["selftest_command"]

_BUSY = {
    "ai": "holds a job's attempt (the agent running here)",
    "mining": "the operator's miner runs on it (the agent running here)",
}


@click.command("selftest")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The agent's TOML config (simulate, state_dir, selftest_python, selftest_budget_s).",
)
@click.option("--simulate", metavar="SPEC", help="Test a simulated rig, e.g. RTX3090x4.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The agent's state directory (busy GPUs, disk speed) [default: .rigshift/agent].",
)
@click.option("--gpu", "only", type=int, multiple=True, help="Test only this GPU (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: {gpus: [...], host}.")
def selftest_command(
    config_file: Path | None,
    simulate: str | None,
    state_dir: Path | None,
    only: tuple[int, ...],
    as_json: bool,
) -> None:
    """Measure each GPU (fp16/fp32 matmul, usable VRAM, host<->device bandwidth, and its
    power curve: throughput and draw at 50-100 % of the board limit) and the host (RAM,
    CPU cores, disk), and print each GPU's score and the broker's verdict.

    GPUs busy with a job or a miner of an agent running with this --state-dir are
    skipped. Exits 1 when a measured GPU would be UNVERIFIED.
    """
    import asyncio

    from worker_agent.config import ConfigError
    from worker_agent.config_file import read_config_file
    from worker_agent.gpu import open_backend
    from worker_agent.mining import read_status
    from worker_agent.selftest import GPU_BUDGET_S, measure_rig

    try:
        values = read_config_file(config_file) if config_file else {}
    except ConfigError as err:
        raise click.UsageError(str(err)) from err
    spec = simulate if simulate is not None else str(values.get("simulate", ""))
    state = state_dir or Path(values.get("state_dir", ".rigshift/agent"))
    try:
        backend = open_backend(spec)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    try:
        indices = [g.index for g in backend.gpus() if not only or g.index in only]
        status = read_status(state)
        busy = {
            i: _BUSY[row["state"]]
            for i, row in status.items()
            if i in indices and row.get("state") in _BUSY
        }
        figures = asyncio.run(
            measure_rig(
                backend,
                state,
                indices=indices,
                skipped=busy,
                budget_s=float(values.get("selftest_budget_s", GPU_BUDGET_S)),
                python=str(values.get("selftest_python", "")),
            )
        )
        rows = _rows(backend, figures)
    finally:
        backend.close()
    host = asdict(figures.host)
    if as_json:
        click.echo(json.dumps({"backend": backend.name, "gpus": rows, "host": host}, indent=2))
    else:
        for row in rows:
            click.echo(_line(row))
        per = max(1, len(rows))
        click.echo(
            f"host: {host['ram_mb']} MiB RAM ({host['ram_mb'] // per} per GPU), "
            f"{host['cpu_cores']} CPU cores, disk write {host['disk_write_mbps']} MB/s"
        )
    if any(r.get("verification") == "UNVERIFIED" for r in rows):
        raise SystemExit(1)


def _rows(backend: Any, figures: Any) -> list[dict[str, Any]]:
    """One dict per GPU: its claim, its figures, score and verdict (or why it was skipped)."""
    from rigshift.scoring import judge

    rows: list[dict[str, Any]] = []
    for g in backend.gpus():
        row: dict[str, Any] = {
            "index": g.index,
            "model": g.model,
            "uuid": g.uuid,
            "vram_mb": g.vram_mb,
            "pcie_link_width": g.pcie_link_width,
        }
        if g.index in figures.skipped:
            row["skipped"] = figures.skipped[g.index]
        m = figures.gpus.get(g.index)
        if m is None:
            if "skipped" in row:
                rows.append(row)
            continue
        verdict = judge(g.model, g.vram_mb, m)
        measurement = asdict(m)
        measurement.pop("measured_at")
        row.update(
            pcie_generation=figures.pcie_generation.get(g.index, 0),
            measurement=measurement,
            score=verdict.score,
            verification=verdict.verification.value,
            reason=verdict.reason,
            power_limit_settable=figures.power_settable.get(g.index, False),
            power_curve=[asdict(p) for p in figures.power_curves.get(g.index, [])],
        )
        rows.append(row)
    return rows


def _line(row: dict[str, Any]) -> str:
    """A GPU's row for people."""
    head = f"GPU {row['index']:>2}  {row['model']:<12}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    m = row["measurement"]
    link = f"PCIe gen{row['pcie_generation'] or '?'} x{row['pcie_link_width']}"
    if m["error"]:
        figures = f"not measured: {m['error']}"
    else:
        figures = (
            f"fp16 {m['fp16_gflops'] / 1000:.1f} / fp32 {m['fp32_gflops'] / 1000:.1f} TFLOPS, "
            f"{m['usable_vram_mb']} of {row['vram_mb']} MiB VRAM usable, "
            f"h2d {m['h2d_mbps'] / 1000:.2f} / d2h {m['d2h_mbps'] / 1000:.2f} GB/s"
        )
    verdict = row["verification"] + (f" ({row['reason']})" if row["reason"] else "")
    out = f"{head} score {row['score']:>3}  {verdict}\n        {figures}, {link}"
    curve = row.get("power_curve") or []
    if curve:
        top = curve[-1]["fp16_gflops"] or 1
        points = ", ".join(
            f"{p['limit_watts']} W: {100 * p['fp16_gflops'] // top} % at {p['draw_watts']} W"
            for p in curve
        )
        out += f"\n        power curve (fp16 throughput, draw): {points}"
    elif not row.get("power_limit_settable", True):
        out += "\n        power limit cannot be set (not root, or unsupported): no curve"
    return out
