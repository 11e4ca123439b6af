"""``rigshift job …``: quote, submit, inspect, follow and cancel training jobs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from client import output
from client.cli.common import (
    USD,
    BrokerGroup,
    Converted,
    broker_client,
    broker_option,
    echo_json,
    echo_listing,
    group_broker_option,
    json_option,
    listing_format,
    listing_options,
    short_id,
)
from client.errors import InvalidArgument
from client.live import LiveView
from client.progress import ProgressBar
from client.sdk import check_input_name, requirements_text
from client.units import gb_to_mib
from rigshift.v1 import job_pb2

__all__ = ["job_group"]

GB = Converted("gb", gb_to_mib)
_JOB_STATES = [n for n in job_pb2.Job.State.keys() if n != "STATE_UNSPECIFIED"]  # noqa: SIM118
_TIERS = ["guaranteed", "spot"]


def _env_pair(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx, param)
        env[key] = value
    return env


def _input_pairs(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, Path]:
    """Repeated NAME=PATH options → ``{name: path}``; the path must be a file or directory."""
    inputs: dict[str, Path] = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {item!r}", ctx, param)
        try:
            check_input_name(name)
        except InvalidArgument:
            raise click.BadParameter(
                f"input name {name!r}: 1-64 of letters, digits, '_', '.', '-' "
                "(starting with a letter or digit)",
                ctx,
                param,
            ) from None
        if name in inputs:
            raise click.BadParameter(f"input {name!r} given twice", ctx, param)
        if not Path(path).exists():
            raise click.BadParameter(f"{path!r}: no such file or directory", ctx, param)
        inputs[name] = Path(path)
    return inputs


# -- rigshift job ----------------------------------------------------------------


@click.group(name="job", cls=BrokerGroup)
@group_broker_option
def job_group() -> None:
    """Quote, submit, inspect, follow and cancel training jobs."""


def _spec_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options that make a JobSpec, shared by ``job submit`` and ``job quote``."""
    options = [
        click.option(
            "--gpus",
            "gpu_count",
            type=click.IntRange(min=0),  # the broker owns the upper limit and says why
            default=1,
            show_default=True,
            help="GPUs, all on one rig.",
        ),
        click.option("--gpu-model", default="", help='Exact GPU model, e.g. "RTX 3090".'),
        click.option(
            "--min-vram-gb", "min_vram_mib", type=GB, default=0, help="Minimum GiB per GPU."
        ),
        click.option(
            "--max-price-usd-per-gpu-hour",
            "max_price",
            type=USD,
            default=0,
            help="Price cap, e.g. 0.35.",
        ),
        click.option(
            "--tier",
            type=click.Choice(_TIERS, case_sensitive=False),
            default="guaranteed",
            show_default=True,
            help="guaranteed: starts within its SLA, never preempted; "
            "spot: cheaper, preemptible, resumed from its last checkpoint.",
        ),
        click.option(
            "--working-dir",
            type=click.Path(exists=True, file_okay=False),
            help="Directory to upload and run the command in.",
        ),
        click.option(
            "--env",
            "env",
            multiple=True,
            callback=_env_pair,
            metavar="KEY=VALUE",
            help="Repeatable.",
        ),
        click.option(
            "--max-attempts", type=click.IntRange(min=0), default=0, help="0: broker default."
        ),
        click.option(
            "--max-duration-s", type=click.IntRange(min=0), default=0, help="0: broker default."
        ),
        click.option("--name", "display_name", default="", help="Label shown in listings."),
        click.option(
            "--image",
            default="",
            metavar="REF",
            help="OCI image to run COMMAND in, e.g. ghcr.io/org/train:1.4; only rigs that "
            "run containers (podman) take the job.",
        ),
        click.option(
            "--min-pcie-gbps",
            type=click.FloatRange(min=0),
            default=0.0,
            help="Least measured host-to-device GB/s per GPU (a mining riser's x1 link "
            "gives under 1, an x16 slot 12 or more).",
        ),
        click.option(
            "--min-host-ram-gb-per-gpu",
            type=click.IntRange(min=0),
            default=0,
            help="Least host RAM per GPU of the rig (its RAM / its GPUs), GB.",
        ),
        click.option(
            "--min-cpu-cores-per-gpu",
            type=click.FloatRange(min=0),
            default=0.0,
            help="Least CPU cores per GPU of the rig (its cores / its GPUs).",
        ),
        click.option(
            "--min-score",
            type=click.IntRange(min=0),
            default=0,
            help="Least measured GPU score (an RTX 3090 = 100).",
        ),
        click.option(
            "--allow-unverified",
            is_flag=True,
            help="Also run on GPUs the broker has not verified (self-test pending, or "
            "measuring short of their claimed model).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@job_group.command(name="submit", context_settings={"allow_interspersed_args": False})
@_spec_options
@click.option(
    "--input",
    "inputs",
    multiple=True,
    callback=_input_pairs,
    metavar="NAME=PATH",
    help="Upload a file or directory as input NAME; the job reads it at "
    "$RIGSHIFT_INPUT_DIR/NAME (repeatable).",
)
@click.option(
    "--requirements",
    "requirements_file",
    type=click.Path(exists=True, dir_okay=False),
    help="pip requirements file: the rig builds (and caches) a Python environment with it "
    "before the job starts; the job runs with it first on PATH.",
)
@click.option(
    "--pip",
    "pip_specs",
    multiple=True,
    metavar="SPEC",
    help="One requirement, on top of --requirements, e.g. 'numpy==2.1' (repeatable).",
)
@click.option(
    "--registry-auth",
    "registry_auth_file",
    type=click.Path(exists=True, dir_okay=False),
    metavar="FILE",
    help="Credentials for pulling --image from a private registry: a containers auth file "
    "as `podman login` writes it. The broker keeps it in memory only and gives it to the "
    "rig for this job's pull alone.",
)
@click.option("--request-id", default="", help="Idempotency key; a uuid4 when omitted.")
@json_option
@broker_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def job_submit(
    gpu_count: int,
    gpu_model: str,
    min_vram_mib: int,
    max_price: int,
    tier: str,
    working_dir: str | None,
    env: dict[str, str],
    max_attempts: int,
    max_duration_s: int,
    display_name: str,
    image: str,
    min_pcie_gbps: float,
    min_host_ram_gb_per_gpu: int,
    min_cpu_cores_per_gpu: float,
    min_score: int,
    allow_unverified: bool,
    inputs: dict[str, Path],
    requirements_file: str | None,
    pip_specs: tuple[str, ...],
    registry_auth_file: str | None,
    request_id: str,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Submit COMMAND (everything after the options, or after `--`) as a job."""
    if registry_auth_file and not image:
        raise click.UsageError("--registry-auth needs --image")
    client = broker_client()
    python_requirements = requirements_text(requirements_file, pip_specs)
    sha256 = ""
    if working_dir:
        with _upload_bar(working_dir) as bar:
            sha256 = client.upload_working_dir(working_dir, progress=bar)
        click.echo(f"uploaded {working_dir} (sha256:{sha256})", err=True)
    input_shas = {}
    for name, path in inputs.items():
        with _upload_bar(f"input {name}") as bar:
            input_shas[name] = client.upload_input(path, progress=bar)
        click.echo(f"uploaded input {name} from {path} (sha256:{input_shas[name]})", err=True)
    job = client.create_job(
        command,
        gpu_count=gpu_count,
        gpu_model=gpu_model,
        min_vram_mb=min_vram_mib,
        max_price_micros_per_gpu_hour=max_price,
        env=env,
        working_dir_sha256=sha256,
        max_duration_seconds=max_duration_s,
        max_attempts=max_attempts,
        display_name=display_name,
        tier=tier,
        request_id=request_id,
        inputs=input_shas,
        python_requirements=python_requirements,
        image=image,
        registry_auth=registry_auth_file or b"",
        min_pcie_gbps=min_pcie_gbps,
        min_host_ram_gb_per_gpu=min_host_ram_gb_per_gpu,
        min_cpu_cores_per_gpu=min_cpu_cores_per_gpu,
        min_score=min_score,
        allow_unverified=allow_unverified,
    )
    if as_json:
        echo_json(job)
        return
    click.echo(f"submitted {job.name} ({job_pb2.Job.State.Name(job.state)})")
    click.echo(f"  follow it: rigshift job watch {short_id(job.name)}")


@job_group.command(name="quote", context_settings={"allow_interspersed_args": False})
@_spec_options
@json_option
@broker_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def job_quote(
    gpu_count: int,
    gpu_model: str,
    min_vram_mib: int,
    max_price: int,
    tier: str,
    working_dir: str | None,
    env: dict[str, str],
    max_attempts: int,
    max_duration_s: int,
    display_name: str,
    image: str,
    min_pcie_gbps: float,
    min_host_ram_gb_per_gpu: int,
    min_cpu_cores_per_gpu: float,
    min_score: int,
    allow_unverified: bool,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Show how many GPUs match a job now, their price range, and whether it would start;
    and the matching GPU groups with their score, verification and PCIe bandwidth.

    Takes the options of `job submit`; submits nothing and uploads nothing
    (--working-dir is accepted so a submit line can be quoted as it is).
    COMMAND is optional.
    """
    quote = broker_client().quote_job(
        command or ("true",),
        gpu_count=gpu_count,
        gpu_model=gpu_model,
        min_vram_mb=min_vram_mib,
        max_price_micros_per_gpu_hour=max_price,
        env=env,
        max_duration_seconds=max_duration_s,
        max_attempts=max_attempts,
        display_name=display_name,
        tier=tier,
        image=image,
        min_pcie_gbps=min_pcie_gbps,
        min_host_ram_gb_per_gpu=min_host_ram_gb_per_gpu,
        min_cpu_cores_per_gpu=min_cpu_cores_per_gpu,
        min_score=min_score,
        allow_unverified=allow_unverified,
    )
    click.echo(output.to_json(quote) if as_json else output.quote_summary(quote))


@job_group.command(name="list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(_JOB_STATES, case_sensitive=False),
    help="Only jobs in this state (repeatable).",
)
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@listing_options
@broker_option
def job_list(states: tuple[str, ...], limit: int) -> None:
    """List jobs, newest first.

    -o wide adds the tier, the cost so far and the owner, and prints the name or
    command whole.
    """
    fmt = listing_format()
    wanted = [job_pb2.Job.State.Value(s.upper()) for s in states]
    page = broker_client().list_jobs(wanted, page_size=limit)
    if fmt == "json":
        echo_json(page)
        return
    if not page.jobs:
        click.echo("no jobs")
    else:
        echo_listing(lambda wide, style: output.job_table(page.jobs, wide=wide, style=style))
    if page.next_page_token:
        click.echo(f"(showing the newest {len(page.jobs)}; raise --limit for more)", err=True)


@job_group.command(name="get")
@click.argument("job_id", metavar="ID")
@json_option
@broker_option
def job_get(job_id: str, as_json: bool) -> None:
    """Show a job: spec, state, why it is pending, attempts, energy, cost and history."""
    job = broker_client().get_job(job_id)
    click.echo(output.to_json(job) if as_json else output.describe_job(job))


@job_group.command(name="logs")
@click.argument("job_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job finishes.")
@broker_option
def job_logs(job_id: str, follow: bool) -> None:
    """Print a job's output as it arrives."""
    for chunk in broker_client().stream_logs(job_id, follow=follow):
        click.echo(chunk.data, nl=False)


@job_group.command(name="cancel")
@click.argument("job_id", metavar="ID")
@json_option
@broker_option
def job_cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job that has not finished."""
    job = broker_client().cancel_job(job_id)
    if as_json:
        echo_json(job)
        return
    click.echo(f"{job.name} {job_pb2.Job.State.Name(job.state)}")


def _upload_bar(label: str) -> ProgressBar:
    """Upload progress on stderr: a bar on a terminal, one line elsewhere."""
    return ProgressBar(label, skipped="already on the broker")  # on stderr


@job_group.command(name="outputs")
@click.argument("job_id", metavar="ID")
@click.option(
    "--download",
    "download_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Download an output and unpack it into DIR (new or empty).",
)
@click.option(
    "--attempt",
    type=click.IntRange(min=0),
    default=0,
    help="With --download: this attempt's output [default: the latest one kept].",
)
@listing_options
@broker_option
def job_outputs(job_id: str, download_dir: Path | None, attempt: int) -> None:
    """List what a job's attempts wrote to $RIGSHIFT_OUTPUT_DIR, or download one.

    Outputs are kept for the broker's retention period after the job ends; an
    output over the job's limit is listed but was not kept. -o wide prints the
    whole SHA-256 and the size in bytes.
    """
    fmt = listing_format()
    as_json = fmt == "json"
    client = broker_client()
    if download_dir is None:
        if attempt:
            raise click.UsageError("--attempt goes with --download")
        outputs = client.list_outputs(job_id)
        if as_json:
            click.echo(json.dumps(output.outputs_json(outputs), indent=2))
            return
        if not outputs:
            click.echo("no outputs yet")
        else:
            echo_listing(lambda wide, style: output.outputs_table(outputs, wide=wide, style=style))
        return
    if as_json:
        raise click.UsageError("--json lists outputs; it does not go with --download")
    if fmt == "wide":
        raise click.UsageError("-o wide lists outputs; it does not go with --download")
    label = f"output of {short_id(job_id)}" + (f" attempt {attempt}" if attempt else "")
    with ProgressBar(label) as bar:  # on stderr
        path = client.download_outputs(job_id, download_dir, attempt, progress=bar)
    click.echo(f"downloaded the {label} into {path}")


@job_group.command(name="watch")
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@broker_option
def job_watch(job_id: str, as_json: bool) -> None:
    """Print one line per change of a job, until it finishes.

    On a terminal the lines scroll above a live status line (the job's state and
    attempt, while waiting for the next change); --json prints the JSON lines only.
    """
    updates = broker_client().watch_job(job_id)
    if as_json:
        for job in updates:
            click.echo(output.to_json(job, one_line=True))
        return
    with LiveView() as view:
        view.status(f"watching {job_id} …")
        for job in updates:
            view.line(output.job_line(job))
            state = job_pb2.Job.State.Name(job.state) if job.state else "no state yet"
            view.status(
                f"watching {short_id(job.name)}: {state}, attempt {job.attempt_count} "
                "(Ctrl-C stops watching, not the job)"
            )
