"""``rigshift demo``: the whole marketplace on this machine, in one command.

What it does, all with real processes on loopback:

1. starts ``rigshift broker serve`` on SQLite under ``.rigshift/demo/`` (fresh each run);
2. creates two farms and starts two simulated rigs on each (``rigshift agent run
   --simulate …``, one process and one Ray head per rig);
3. uploads ``examples/mlp_numpy`` and submits a dozen training jobs asking for
   1, 2 and 4 GPUs, plus one job that brings its own Python requirements
   (``tabulate``, which Rigshift itself does not install): its rig builds a
   virtual environment for it with uv first, and the job writes a report to
   ``$RIGSHIFT_OUTPUT_DIR``, which the demo downloads at the end;
4. prints every state change as it happens, then a summary: each job's state,
   rig, GPU-seconds, energy and final accuracy, and energy per farm;
5. stops every process it started (agents drain, then the broker) and exits 0
   only if every job SUCCEEDED and nothing was left running.

Logs of every process are kept in ``.rigshift/demo/logs/``.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from client.live import LiveView
from client.progress import ProgressBar

__all__ = ["demo_command"]

#: (farm, rig, simulated GPUs) — 12 GPUs in all; two rigs can take a 4-GPU job.
RIGS = [
    ("north-farm", "north-1", "RTX3090x4"),
    ("north-farm", "north-2", "RTX3070x2"),
    ("south-farm", "south-1", "RTX3080x4"),
    ("south-farm", "south-2", "A4000x2"),
]
#: GPUs asked by the dozen jobs: six 1-GPU, four 2-GPU and two 4-GPU jobs.
GPU_COUNTS = [1, 2, 4, 1, 1, 2, 1, 4, 2, 1, 2, 1]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mlp_numpy"
#: What mining would earn per kWh on each model (the operators' mining alternative).
MINING_MICROS_PER_KWH = {
    "RTX 3090": 150_000,
    "RTX 3080": 140_000,
    "RTX 3070": 160_000,
    "A4000": 180_000,
}
#: The job that brings its own environment: a package Rigshift does not depend on.
REPORT_REQUIREMENTS = "tabulate==0.9.0\n"
REPORT_SCRIPT = """\
import os, platform, sys
from tabulate import tabulate
rows = [["python", sys.executable], ["virtual env", os.environ.get("VIRTUAL_ENV", "-")],
        ["gpus", os.environ["CUDA_VISIBLE_DEVICES"]], ["host", platform.node()]]
report = tabulate(rows, headers=["what", "value"])
print(report)
with open(os.path.join(os.environ["RIGSHIFT_OUTPUT_DIR"], "report.txt"), "w") as f:
    f.write(report + "\\n")
"""


def _state_name(state: int) -> str:
    from rigshift.v1 import job_pb2

    return job_pb2.Job.State.Name(state)


def _clock(start: float) -> str:
    return f"{time.monotonic() - start:6.1f}s"


@click.command("demo")
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".rigshift/demo"),
    show_default=True,
    help="Where the broker's database, the agents' state and the logs go (wiped first).",
)
@click.option("--epochs", type=int, default=8, show_default=True, help="Epochs per job.")
@click.option("--samples", type=int, default=16_000, show_default=True, help="Points per job.")
@click.option("--timeout-s", type=float, default=170.0, show_default=True)
@click.option(
    "--prometheus",
    is_flag=True,
    help="Also run a local Prometheus (Debian's `prometheus`) scraping the demo; print its URL "
    "and keep everything running after the summary until Ctrl-C.",
)
def demo_command(root: Path, epochs: int, samples: int, timeout_s: float, prometheus: bool) -> None:
    """Run a broker, two farms of two simulated rigs and a dozen jobs; print a summary."""
    from harness.fleet import FleetError, LocalFleet

    prom_binary = shutil.which("prometheus") if prometheus else None
    if prometheus and prom_binary is None:
        raise click.ClickException(
            "--prometheus needs Debian's prometheus (apt-get install prometheus)"
        )

    if not (EXAMPLE / "train.py").exists():
        raise click.ClickException(f"the example job is missing: {EXAMPLE}/train.py")
    t0 = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)
    fleet = LocalFleet(root.resolve())
    ok = False
    prom = None
    try:
        metrics_port = _free_port()
        if prom_binary:
            prom = _start_prometheus(prom_binary, root.resolve(), f"127.0.0.1:{metrics_port}", t0)
        ok = _run(fleet, t0, epochs, samples, timeout_s, metrics_port)
        if prom is not None:
            click.echo(
                f"[{_clock(t0)}] Prometheus keeps scraping the demo at {prom[1]} "
                "(try rigshift_farm_revenue_usd_total); press Ctrl-C to stop everything"
            )
            while prom[0].poll() is None:
                time.sleep(1)
    except FleetError as err:
        click.echo(f"error: {err}", err=True)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
    finally:
        if prom is not None and prom[0].poll() is None:
            prom[0].terminate()
            prom[0].wait(timeout=30)
        click.echo(f"[{_clock(t0)}] stopping the agents (drain) and the broker …")
        fleet.stop()
        left = fleet.leftovers()
        if left:
            click.echo(f"error: processes still running after the demo: {left}", err=True)
            ok = False
        else:
            click.echo(f"[{_clock(t0)}] every process the demo started has exited")
    elapsed = time.monotonic() - t0
    click.echo(f"demo {'PASSED' if ok else 'FAILED'} in {elapsed:.1f} s (logs: {root}/logs/)")
    db = root / "broker" / "broker.db"
    if db.is_file():
        from broker.store import local_database

        if local_database() == db:
            hint = "rigshift farm earnings --json; rigshift admin verify-ledger"
        else:
            hint = (
                f"rigshift farm earnings --db sqlite:///{db}; "
                f"rigshift admin verify-ledger --home {db.parent}"
            )
        click.echo(f"the demo's database stays for a look afterwards: {hint}")
    sys.exit(0 if ok else 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_prometheus(binary: str, root: Path, broker_metrics: str, t0: float) -> tuple[Any, str]:
    """Prometheus scraping the broker and, through its /sd endpoint, every agent."""
    import subprocess

    port = _free_port()
    (root / "prometheus").mkdir(parents=True, exist_ok=True)
    config = root / "prometheus" / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 2s, evaluation_interval: 2s}\n"
        "scrape_configs:\n"
        f"  - job_name: rigshift-broker\n    static_configs: [{{targets: ['{broker_metrics}']}}]\n"
        "  - job_name: rigshift-agent\n    honor_labels: true\n"
        f"    http_sd_configs: [{{url: 'http://{broker_metrics}/sd', refresh_interval: 5s}}]\n"
    )
    log = open(root / "prometheus" / "prometheus.log", "ab")  # noqa: SIM115 (lives with the process)
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'prometheus' / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    click.echo(f"[{_clock(t0)}] Prometheus on {url} (scraping the broker and every agent)")
    return proc, url


def _run(
    fleet: Any, t0: float, epochs: int, samples: int, timeout_s: float, metrics_port: int
) -> bool:
    echo = click.echo
    address = fleet.start_broker(
        lease_ttl_s=10, heartbeat_interval_s=2, metrics_listen=f"127.0.0.1:{metrics_port}"
    )
    echo(f"[{_clock(t0)}] broker listening on {address} (SQLite in {fleet.root}/broker)")
    client = fleet.client()
    tokens: dict[str, str] = {}
    for farm_name, tariff in (("north-farm", 110_000), ("south-farm", 140_000)):
        farm = client.create_farm(
            farm_name,
            region=farm_name.split("-")[0],
            tariff_micros_per_kwh=tariff,
            mining_micros_per_kwh=MINING_MICROS_PER_KWH,
        )
        tokens[farm_name] = farm.enrollment_token
        echo(f"[{_clock(t0)}] created {farm.name} ({farm_name}, ${tariff / 1e6:.2f}/kWh)")
    for farm_name, rig, spec in RIGS:
        fleet.start_agent(
            rig,
            tokens[farm_name],
            simulate=spec,
            heartbeat_interval_s=2,
            lease_ttl_s=10,
            metrics_listen="127.0.0.1:0",
        )
        echo(f"[{_clock(t0)}] started agent {rig} on {farm_name}: simulated {spec} (Ray head)")
        time.sleep(0.5)  # four Ray heads starting at the same instant overload two cores
    workers = fleet.wait_workers(len(RIGS), timeout_s=120)
    echo(f"[{_clock(t0)}] {len(workers)} rigs online, {sum(len(w.gpus) for w in workers)} GPUs")
    worker_names = {w.name: w.hostname for w in workers}
    farm_of = {rig: farm for farm, rig, _ in RIGS}

    if sys.stderr.isatty():  # a bar on a terminal; elsewhere the demo's lines as they were
        with ProgressBar("examples/mlp_numpy", skipped="already on the broker") as bar:
            sha = client.upload_working_dir(EXAMPLE, progress=bar)
    else:
        sha = client.upload_working_dir(EXAMPLE)
    echo(f"[{_clock(t0)}] uploaded examples/mlp_numpy (sha256:{sha[:12]}…)")
    command = [sys.executable, "train.py", "--epochs", str(epochs), "--samples", str(samples)]
    jobs: dict[str, int] = {}
    for i, gpus in enumerate(GPU_COUNTS, 1):
        job = client.create_job(
            [*command, "--seed", str(i), "--min-accuracy", "0.5"],
            gpu_count=gpus,
            working_dir_sha256=sha,
            display_name=f"mlp-{i:02d}",
        )
        jobs[job.name] = gpus
    echo(f"[{_clock(t0)}] submitted {len(jobs)} jobs: {dict(Counter(GPU_COUNTS))} (GPUs: jobs)")
    report = client.create_job(
        ["python", "-c", REPORT_SCRIPT],
        gpu_count=1,
        python_requirements=REPORT_REQUIREMENTS,
        display_name="report",
    )
    jobs[report.name] = 1
    echo(
        f"[{_clock(t0)}] submitted {report.spec.display_name}: its own requirements "
        f"({REPORT_REQUIREMENTS.strip()}), built on the rig with uv before it starts"
    )

    final = _follow(client, jobs, worker_names, t0, timeout_s)
    _summary(client, final, worker_names, farm_of)
    ok = _report_output(client, final[report.name], fleet.root / "outputs", t0)
    return (
        ok
        and all(j.state == _state_value("SUCCEEDED") for j in final.values())
        and len(final) == len(jobs)
    )


def _report_output(client: Any, job: Any, into: Path, t0: float) -> bool:
    """Download what the report job wrote to its output directory and show it."""
    echo = click.echo
    if job.state != _state_value("SUCCEEDED"):
        echo(f"[{_clock(t0)}] {job.spec.display_name} did not succeed: {job.status_message}")
        return False
    setup_s = job.attempts[-1].setup_milliseconds / 1000
    path = client.download_outputs(job.name, into)
    report = (path / "report.txt").read_text()
    echo(
        f"[{_clock(t0)}] {job.spec.display_name}: environment ready after {setup_s:.1f} s of "
        f"setup (not billed); its output, downloaded to {path}/report.txt:"
    )
    for line in report.splitlines():
        echo(f"    {line}")
    return "virtual env" in report


def _state_value(name: str) -> int:
    from rigshift.v1 import job_pb2

    return job_pb2.Job.State.Value(name)


def _follow(
    client: Any, jobs: dict[str, int], workers: dict[str, str], t0: float, timeout_s: float
) -> dict[str, Any]:
    """Print each state change until every job is final (or the time is up).

    Every 5 s a ``…`` line counts the jobs by state, with the epoch of a few running
    ones; on a terminal that count is a live status line instead, updated every second.
    """
    with LiveView() as view:
        return _follow_in(view, client, jobs, workers, t0, timeout_s)


def _follow_in(
    view: LiveView,
    client: Any,
    jobs: dict[str, int],
    workers: dict[str, str],
    t0: float,
    timeout_s: float,
) -> dict[str, Any]:
    terminal = {_state_value(s) for s in ("SUCCEEDED", "FAILED", "CANCELLED")}
    seen: dict[str, int] = {}
    latest: dict[str, Any] = {}
    last_summary = 0.0
    summary_every_s = 1.0 if view.tty else 5.0
    while time.monotonic() - t0 < timeout_s:
        page = client.list_jobs(page_size=100).jobs
        for job in sorted(page, key=lambda j: j.spec.display_name):
            if job.name not in jobs:
                continue
            latest[job.name] = job
            if seen.get(job.name) == job.state:
                continue
            seen[job.name] = job.state
            where = ""
            if job.attempts:
                a = job.attempts[-1]
                rig = workers.get(a.worker, a.worker)
                where = f" on {rig} GPUs {','.join(map(str, a.gpu_indices))}"
            view.line(
                f"[{_clock(t0)}] {job.spec.display_name} ({jobs[job.name]} GPU) "
                f"{_state_name(job.state):<9}{where}"
            )
        if len(latest) == len(jobs) and all(j.state in terminal for j in latest.values()):
            break
        if time.monotonic() - last_summary > summary_every_s:
            last_summary = time.monotonic()
            counts = Counter(_state_name(j.state).lower() for j in latest.values())
            line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            running = [j for j in latest.values() if j.state == _state_value("RUNNING")]
            epochs = [f"{j.spec.display_name} {_last_epoch(client, j.name)}" for j in running[:4]]
            text = f"[{_clock(t0)}]   … {line}" + (f" ({', '.join(epochs)})" if epochs else "")
            if view.tty:
                view.status(text)
            else:
                view.line(text)
        time.sleep(0.25)
    return {name: client.get_job(name) for name in jobs}


def _last_epoch(client: Any, name: str) -> str:
    """``epoch 3/6`` from the job's output so far (live progress)."""
    text = "".join(c.data for c in client.stream_logs(name))
    for line in reversed(text.splitlines()):
        if line.startswith("epoch "):
            return line.split(" ", 2)[1].join(("epoch ", ""))
    return "starting"


def _accuracy(client: Any, name: str) -> str:
    text = "".join(c.data for c in client.stream_logs(name))
    for line in reversed(text.splitlines()):
        if line.startswith("final test accuracy"):
            return line.rsplit(" ", 1)[1]
    return "-"


def _summary(
    client: Any, final: dict[str, Any], workers: dict[str, str], farm_of: dict[str, str]
) -> None:
    echo = click.echo
    echo("")
    header = ("JOB", "GPUS", "RIG", "STATE", "GPU-SECONDS", "ENERGY (J)", "ACCURACY")
    echo("{:<8} {:>4}  {:<8} {:<10} {:>11} {:>10}  {}".format(*header))
    per_farm: dict[str, list[int]] = {}
    for name, job in sorted(final.items(), key=lambda kv: kv[1].spec.display_name):
        a = job.attempts[-1] if job.attempts else None
        rig = workers.get(a.worker, "-") if a else "-"
        gpu_s = sum(x.gpu_milliseconds for x in job.attempts) / 1000
        energy = sum(x.energy_joules for x in job.attempts)
        farm = farm_of.get(rig, "-")
        totals = per_farm.setdefault(farm, [0, 0, 0])
        totals[0] += 1
        totals[1] += int(gpu_s * 1000)
        totals[2] += energy
        echo(
            f"{job.spec.display_name:<8} {job.spec.gpu_count:>4}  {rig:<8} "
            f"{_state_name(job.state):<10} {gpu_s:>11.1f} {energy:>10}  {_accuracy(client, name)}"
        )
    echo("")
    echo(f"{'FARM':<11} {'JOBS':>4} {'GPU-SECONDS':>11} {'ENERGY (J)':>10} {'kWh':>9}")
    for farm, (n, gpu_ms, joules) in sorted(per_farm.items()):
        echo(f"{farm:<11} {n:>4} {gpu_ms / 1000:>11.1f} {joules:>10} {joules / 3.6e6:>9.5f}")
    echo("")
    _earnings(client)


def _earnings(client: Any) -> None:
    """Per farm: what the AI work paid, next to what mining would have paid (from the ledger)."""
    echo = click.echo
    names: dict[str, str] = {}
    for w in client.iter_workers():
        names.setdefault(w.farm, client.get_farm(w.farm).display_name)
    echo(
        f"{'EARNINGS':<11} {'REVENUE':>11} {'ENERGY COST':>12} {'MARGIN':>11} "
        f"{'AI $/kWh':>9} {'MINING $/kWh':>13}"
    )
    for row in client.get_earnings().rows:
        echo(
            f"{names.get(row.farm, row.farm):<11} {row.revenue_micros / 1e6:>11.6f} "
            f"{row.energy_cost_micros / 1e6:>12.6f} {row.margin_micros / 1e6:>11.6f} "
            f"{row.revenue_usd_per_kwh:>9.3f} {row.mining_usd_per_kwh:>13.3f}"
        )
    echo("")
