"""The ``rigshift`` command line: ``rigshift job …``, ``rigshift farm …`` and friends.

``job`` and ``farm`` talk to the broker through :class:`client.sdk.Client`;
``--broker`` (or ``$RIGSHIFT_BROKER``) says where it is. Every listing and
every command that returns a resource takes ``--json``, which prints the API
response as proto JSON. Errors from the broker print ``error: …`` on stderr and
exit 1; usage mistakes exit 2 (click's convention).
"""

from __future__ import annotations

import importlib
import json
import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import click

from client import output
from client.errors import InvalidArgument, RigshiftError, Unavailable
from client.progress import ProgressBar
from client.sdk import DEFAULT_BROKER, Client, check_input_name, requirements_text
from client.units import (
    gb_to_mib,
    parse_model_price,
    parse_since,
    parse_tariff_file,
    percent_to_permille,
    pue_to_permille,
    usd_to_micros,
)
from rigshift.v1 import farm_pb2, farm_service_pb2, job_pb2

__all__ = ["farm_group", "job_group", "main"]

_BROKER_KEY = "rigshift.broker"
_BROKER_EXPLICIT = "rigshift.broker_explicit"


# -- parameter types ----------------------------------------------------------


class _Converted(click.ParamType):
    """A click type wrapping a ``units`` converter; its ValueError becomes a usage error."""

    def __init__(self, name: str, convert: Callable[[str], Any]) -> None:
        self.name = name
        self._convert = convert

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):  # a default that is converted already
            return value
        try:
            return self._convert(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


USD = _Converted("usd", usd_to_micros)
GB = _Converted("gb", gb_to_mib)
PUE = _Converted("pue", pue_to_permille)
PERCENT = _Converted("percent", percent_to_permille)
MODEL_PRICE = _Converted("model=usd", parse_model_price)
SINCE = _Converted("since", parse_since)
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


def _price_map(
    ctx: click.Context, param: click.Parameter, values: tuple[tuple[str, int], ...]
) -> dict[str, int] | None:
    """Repeated MODEL=USD options → ``{model: micros}``; None when the option was not given."""
    if not values:
        return None
    prices: dict[str, int] = {}
    for model, micros in values:
        if model in prices:
            raise click.BadParameter(f"{model!r} given twice", ctx, param)
        prices[model] = micros
    return prices


def _tariff_file(
    ctx: click.Context, param: click.Parameter, file: IO[str] | None
) -> list[tuple[int, int, int]] | None:
    """Read and parse ``--tariff-file``; a bad line is a usage error naming file and line."""
    if file is None:
        return None
    try:
        return parse_tariff_file(file.read())
    except ValueError as exc:
        raise click.BadParameter(f"{file.name}: {exc}", ctx, param) from None
    except UnicodeDecodeError:
        raise click.BadParameter(f"{file.name}: not a text file", ctx, param) from None


# -- broker address, client and error handling ---------------------------------


def _remember_broker(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[_BROKER_KEY] = value
        source = ctx.get_parameter_source(param.name) if param.name else None
        if source not in (None, click.core.ParameterSource.DEFAULT):
            ctx.meta[_BROKER_EXPLICIT] = True


def _group_broker_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--broker",
        envvar="RIGSHIFT_BROKER",
        default=DEFAULT_BROKER,
        show_default=True,
        metavar="HOST:PORT",
        expose_value=False,
        callback=_remember_broker,
        help="Broker address (env RIGSHIFT_BROKER).",
    )(f)


def _broker_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The same ``--broker`` on each subcommand, so it may also come after the command name."""
    return click.option(
        "--broker",
        default=None,
        metavar="HOST:PORT",
        expose_value=False,
        callback=_remember_broker,
        help="Broker address; overrides the group's --broker.",
    )(f)


def _client() -> Client:
    """A client for the chosen broker, closed when the command ends."""
    ctx = click.get_current_context()
    return ctx.with_resource(Client(ctx.meta.get(_BROKER_KEY, DEFAULT_BROKER)))


def _report(exc: RigshiftError, address: str) -> None:
    if isinstance(exc, Unavailable) and not exc.reason:
        click.echo(
            f"error: cannot reach the broker at {address} (is `rigshift broker serve` running?)",
            err=True,
        )
        return
    line = str(exc)
    click.echo(f"error: {line}", err=True)
    for field, description in exc.field_violations:
        if f"{field}: {description}" not in line:
            click.echo(f"  {field}: {description}", err=True)
    if exc.request_id and isinstance(exc, Unavailable):
        click.echo(
            f"  the job may exist once the broker recovers: retry with --request-id "
            f"{exc.request_id} (the same id never makes a second job)",
            err=True,
        )


class _BrokerGroup(click.Group):
    """A group whose commands talk to the broker: turns client errors into ``error: …``, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RigshiftError as exc:
            _report(exc, ctx.meta.get(_BROKER_KEY, DEFAULT_BROKER))
        except OSError as exc:  # e.g. an unreadable file in --working-dir
            click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(1)


def _echo_json(msg: Any) -> None:
    click.echo(output.to_json(msg))


def _short_id(name: str) -> str:
    return name.partition("/")[2] or name


_json_option = click.option("--json", "as_json", is_flag=True, help="Print the response as JSON.")


# -- rigshift ------------------------------------------------------------------


@click.group(name="rigshift", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Rigshift: AI training jobs on former crypto-mining GPU farms."""


# -- rigshift job ----------------------------------------------------------------


@main.group(name="job", cls=_BrokerGroup)
@_group_broker_option
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
@click.option("--request-id", default="", help="Idempotency key; a uuid4 when omitted.")
@_json_option
@_broker_option
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
    inputs: dict[str, Path],
    requirements_file: str | None,
    pip_specs: tuple[str, ...],
    request_id: str,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Submit COMMAND (everything after the options, or after `--`) as a job."""
    client = _client()
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
    )
    if as_json:
        _echo_json(job)
        return
    click.echo(f"submitted {job.name} ({job_pb2.Job.State.Name(job.state)})")
    click.echo(f"  follow it: rigshift job watch {_short_id(job.name)}")


@job_group.command(name="quote", context_settings={"allow_interspersed_args": False})
@_spec_options
@_json_option
@_broker_option
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
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Show how many GPUs match a job now, their price range, and whether it would start.

    Takes the options of `job submit`; submits nothing and uploads nothing
    (--working-dir is accepted so a submit line can be quoted as it is).
    COMMAND is optional.
    """
    quote = _client().quote_job(
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
@_json_option
@_broker_option
def job_list(states: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    wanted = [job_pb2.Job.State.Value(s.upper()) for s in states]
    page = _client().list_jobs(wanted, page_size=limit)
    if as_json:
        _echo_json(page)
        return
    click.echo(output.job_table(page.jobs) if page.jobs else "no jobs")
    if page.next_page_token:
        click.echo(f"(showing the newest {len(page.jobs)}; raise --limit for more)", err=True)


@job_group.command(name="get")
@click.argument("job_id", metavar="ID")
@_json_option
@_broker_option
def job_get(job_id: str, as_json: bool) -> None:
    """Show a job: spec, state, why it is pending, attempts, energy, cost and history."""
    job = _client().get_job(job_id)
    click.echo(output.to_json(job) if as_json else output.describe_job(job))


@job_group.command(name="logs")
@click.argument("job_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job finishes.")
@_broker_option
def job_logs(job_id: str, follow: bool) -> None:
    """Print a job's output as it arrives."""
    for chunk in _client().stream_logs(job_id, follow=follow):
        click.echo(chunk.data, nl=False)


@job_group.command(name="cancel")
@click.argument("job_id", metavar="ID")
@_json_option
@_broker_option
def job_cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job that has not finished."""
    job = _client().cancel_job(job_id)
    if as_json:
        _echo_json(job)
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
@click.option("--json", "as_json", is_flag=True, help="List the outputs as JSON.")
@_broker_option
def job_outputs(job_id: str, download_dir: Path | None, attempt: int, as_json: bool) -> None:
    """List what a job's attempts wrote to $RIGSHIFT_OUTPUT_DIR, or download one.

    Outputs are kept for the broker's retention period after the job ends; an
    output over the job's limit is listed but was not kept.
    """
    client = _client()
    if download_dir is None:
        if attempt:
            raise click.UsageError("--attempt goes with --download")
        outputs = client.list_outputs(job_id)
        if as_json:
            click.echo(json.dumps(output.outputs_json(outputs), indent=2))
            return
        click.echo(output.outputs_table(outputs) if outputs else "no outputs yet")
        return
    if as_json:
        raise click.UsageError("--json lists outputs; it does not go with --download")
    label = f"output of {_short_id(job_id)}" + (f" attempt {attempt}" if attempt else "")
    with ProgressBar(label) as bar:  # on stderr
        path = client.download_outputs(job_id, download_dir, attempt, progress=bar)
    click.echo(f"downloaded the {label} into {path}")


@job_group.command(name="watch")
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_broker_option
def job_watch(job_id: str, as_json: bool) -> None:
    """Print one line per change of a job, until it finishes."""
    for job in _client().watch_job(job_id):
        click.echo(output.to_json(job, one_line=True) if as_json else output.job_line(job))


# -- rigshift farm -----------------------------------------------------------------


@main.group(name="farm", cls=_BrokerGroup)
@_group_broker_option
def farm_group() -> None:
    """Create farms, set their prices, list and drain their workers, see earnings."""


def _economics_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Farm economics options, shared by ``farm create`` and ``farm update`` (None: not given)."""
    options = [
        click.option("--region", default=None, help='Region label, e.g. "eu-north".'),
        click.option(
            "--tariff-usd-per-kwh",
            "tariff",
            type=USD,
            default=None,
            help="Electricity price, e.g. 0.12 (outside the --tariff-file windows).",
        ),
        click.option(
            "--tariff-file",
            "tariff_windows",
            type=click.File("r"),
            default=None,
            callback=_tariff_file,
            help="Time-of-use table: lines 'START-END USD_PER_KWH' in UTC hours, "
            "e.g. '17-21 0.31'; '#' comments.",
        ),
        click.option("--pue", type=PUE, default=None, help="Power usage effectiveness, e.g. 1.25."),
        click.option(
            "--mining",
            type=MODEL_PRICE,
            multiple=True,
            callback=_price_map,
            metavar="MODEL=USD_PER_KWH",
            help="What mining earns per kWh on this GPU model (repeatable).",
        ),
        click.option(
            "--ask",
            type=MODEL_PRICE,
            multiple=True,
            callback=_price_map,
            metavar="MODEL=USD_PER_GPU_HOUR",
            help="Ask price for this GPU model (repeatable); must not be under the floor.",
        ),
        click.option(
            "--broker-fee-percent",
            "broker_fee",
            type=PERCENT,
            default=None,
            help="Broker fee on each charge, e.g. 10.",
        ),
        click.option(
            "--margin-usd-per-gpu-hour",
            "margin",
            type=USD,
            default=None,
            help="Margin on top of the floor price, e.g. 0.02.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@farm_group.command(name="create")
@click.argument("display_name", metavar="NAME")
@_economics_options
@_json_option
@_broker_option
def farm_create(
    display_name: str,
    region: str | None,
    tariff: int | None,
    tariff_windows: list[tuple[int, int, int]] | None,
    pue: int | None,
    mining: dict[str, int] | None,
    ask: dict[str, int] | None,
    broker_fee: int | None,
    margin: int | None,
    as_json: bool,
) -> None:
    """Create a farm and print its enrollment token and the agent command for each rig.

    Floor price per GPU-hour = max(energy cost x PUE, mining revenue) + margin;
    an --ask under its model's floor is refused with the reason.
    """
    client = _client()
    farm = client.create_farm(
        display_name,
        region=region or "",
        tariff_micros_per_kwh=tariff or 0,
        pue_permille=pue or 0,
        mining_micros_per_kwh=mining,
        ask_micros_per_gpu_hour=ask,
        broker_fee_permille=broker_fee or 0,
        margin_micros_per_gpu_hour=margin or 0,
        tariff_windows=tariff_windows or (),
    )
    if as_json:
        _echo_json(farm)
        return
    agent_cmd = shlex.join(
        ["rigshift", "agent", "run", "--broker", client.address, "--token", farm.enrollment_token]
    )
    click.echo(f"created {farm.name} ({farm.display_name})")
    click.echo(f"enrollment token: {farm.enrollment_token}")
    click.echo("  (shown only now; keep it secret)")
    click.echo("on each rig, run:")
    click.echo(f"  {agent_cmd}")


def _merge_prices(
    current: dict[str, int], new: dict[str, int] | None, remove: tuple[str, ...], what: str
) -> dict[str, int] | None:
    """The farm's map with ``new`` entries set and ``remove`` models dropped; None: unchanged."""
    if new is None and not remove:
        return None
    merged = dict(current)
    for model in remove:
        if model not in merged:
            raise click.UsageError(f"the farm has no {what} for {model!r} to remove")
        del merged[model]
    merged.update(new or {})
    return merged


@farm_group.command(name="update")
@click.argument("farm_id", metavar="ID")
@_economics_options
@click.option(
    "--remove-mining", multiple=True, metavar="MODEL", help="Drop a model's mining figure."
)
@click.option("--remove-ask", multiple=True, metavar="MODEL", help="Drop a model's ask price.")
@click.option(
    "--clear-tariff-windows", is_flag=True, help="Drop the time-of-use windows (flat tariff)."
)
@_json_option
@_broker_option
def farm_update(
    farm_id: str,
    region: str | None,
    tariff: int | None,
    tariff_windows: list[tuple[int, int, int]] | None,
    pue: int | None,
    mining: dict[str, int] | None,
    ask: dict[str, int] | None,
    broker_fee: int | None,
    margin: int | None,
    remove_mining: tuple[str, ...],
    remove_ask: tuple[str, ...],
    clear_tariff_windows: bool,
    as_json: bool,
) -> None:
    """Change a farm's economics; only the options given change.

    --mining and --ask set one model's entry each and leave the other models'
    entries as they are; --tariff-file replaces all time-of-use windows.
    """
    if clear_tariff_windows:
        if tariff_windows is not None:
            raise click.UsageError("--tariff-file and --clear-tariff-windows exclude each other")
        tariff_windows = []
    client = _client()
    if mining is not None or ask is not None or remove_mining or remove_ask:
        current = client.get_farm(farm_id)
        mining = _merge_prices(
            dict(current.mining_micros_per_kwh), mining, remove_mining, "mining figure"
        )
        ask = _merge_prices(dict(current.ask_micros_per_gpu_hour), ask, remove_ask, "ask price")
    changes: dict[str, Any] = {
        "region": region,
        "tariff_micros_per_kwh": tariff,
        "pue_permille": pue,
        "mining_micros_per_kwh": mining,
        "ask_micros_per_gpu_hour": ask,
        "broker_fee_permille": broker_fee,
        "margin_micros_per_gpu_hour": margin,
        "tariff_windows": tariff_windows,
    }
    changed = [field for field, value in changes.items() if value is not None]
    if not changed:
        raise click.UsageError("nothing to update: give at least one option (see --help)")
    farm = client.update_farm(farm_id, **changes)
    if as_json:
        _echo_json(farm)
        return
    click.echo(f"updated {farm.name}: {', '.join(changed)}")
    click.echo(output.describe_farm(farm))


@farm_group.command(name="get")
@click.argument("farm_id", metavar="ID")
@_json_option
@_broker_option
def farm_get(farm_id: str, as_json: bool) -> None:
    """Show a farm: tariff, PUE, mining alternative, asks, fee, margin and floor prices."""
    farm = _client().get_farm(farm_id)
    click.echo(output.to_json(farm) if as_json else output.describe_farm(farm))


@farm_group.command(name="workers")
@click.option("--farm", "farm_id", default="", metavar="ID", help="Only this farm's workers.")
@_json_option
@_broker_option
def farm_workers(farm_id: str, as_json: bool) -> None:
    """List workers (rigs): state, GPUs, reliability and last heartbeat."""
    workers = list(_client().iter_workers(farm_id))
    if as_json:
        _echo_json(farm_service_pb2.ListWorkersResponse(workers=workers))
        return
    click.echo(output.worker_table(workers) if workers else "no workers")


@farm_group.command(name="drain")
@click.argument("worker_id", metavar="WORKER")
@_json_option
@_broker_option
def farm_drain(worker_id: str, as_json: bool) -> None:
    """Stop placing new work on a worker; its running jobs finish."""
    worker = _client().drain_worker(worker_id)
    if as_json:
        _echo_json(worker)
        return
    click.echo(f"{worker.name} {farm_pb2.Worker.State.Name(worker.state)}")


@farm_group.command(name="earnings")
@click.option("--farm", "farm_id", default="", metavar="ID", help="Only this farm.")
@click.option(
    "--since",
    type=SINCE,
    default=None,
    metavar="WHEN",
    help="Only attempts that ended since: 30m, 24h, 7d, or an ISO-8601 time [default: ever].",
)
@click.option(
    "--by",
    "group_by",
    type=click.Choice(["farm", "worker", "gpu"], case_sensitive=False),
    default="farm",
    show_default=True,
    help="One row per farm, worker (rig) or GPU.",
)
@click.option(
    "--db",
    "db_url",
    default="",
    metavar="URL",
    help="Read this broker database directly instead of asking the broker (ops).",
)
@_json_option
@_broker_option
def farm_earnings(
    farm_id: str, since: datetime | None, group_by: str, db_url: str, as_json: bool
) -> None:
    """What AI work earned: GPU-hours, kWh, revenue, energy cost, margin, $/kWh vs mining.

    Revenue is the farm's payout (client charges less the broker fee). Rows
    where AI work paid less per kWh than mining would have are marked. When no
    broker answers at the default address, the database in ./.rigshift (or the
    last `rigshift demo`'s) is read instead, and stderr says so.
    """
    group_by = group_by.lower()
    if db_url:
        earnings = _earnings_from_db(db_url, farm_id, since, group_by)
    else:
        try:
            earnings = _client().get_earnings(farm_id, since=since, group_by=group_by)
        except Unavailable as err:
            from broker.store import local_database

            ctx = click.get_current_context()
            local = local_database()
            if err.reason or ctx.meta.get(_BROKER_EXPLICIT) or local is None:
                raise
            click.echo(
                f"no broker at {ctx.meta.get(_BROKER_KEY, DEFAULT_BROKER)}; "
                f"reading the local database {local}",
                err=True,
            )
            earnings = _earnings_from_db(f"sqlite:///{local}", farm_id, since, group_by)
    if as_json:
        click.echo(output.to_json(earnings, defaults=True))
        return
    if not earnings.rows:
        click.echo("no earnings yet" + (f" since {since:%Y-%m-%d %H:%M:%S} UTC" if since else ""))
        return
    click.echo(output.earnings_table(earnings.rows, group_by))


def _earnings_from_db(
    db_url: str, farm_id: str, since: datetime | None, group_by: str
) -> farm_service_pb2.GetEarningsResponse:
    """GetEarnings computed from a broker database, as the broker would (read-only)."""
    from broker.convert import earnings_pb
    from broker.core import BrokerCore
    from broker.store import Store

    store = Store(db_url, create=False)
    try:
        core = BrokerCore()
        store.load(core)
        farm = farm_id.removeprefix("farms/")
        if farm and farm not in core.farms:
            raise click.ClickException(f"farms/{farm} not found in {db_url}")
        return earnings_pb(
            core,
            farm_id=farm,
            since=since.timestamp() if since else 0.0,
            group_by=group_by,
            farm_name=lambda fid: store.get_farm(fid).display_name,
        )
    finally:
        store.close()


# -- groups owned by other packages ------------------------------------------------


def _attach(module: str, attr: str, name: str) -> None:
    """Add ``module.attr`` as subcommand ``name``, or skip it while it does not exist yet.

    Parallel development: broker/, worker_agent/ and client/demo.py are being
    written at the same time as this file. Remove the skipping once they land;
    a missing dependency *inside* one of them is still raised, not hidden.
    """
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise
        return
    command = getattr(mod, attr, None)
    existing = main.commands.get(name)
    if isinstance(command, click.Group) and isinstance(existing, click.Group):
        for sub_name, sub in command.commands.items():  # one group of both packages' commands
            existing.add_command(sub, sub_name)
    elif isinstance(command, click.Command):
        main.add_command(command, name)


_attach("broker.cli", "broker_group", "broker")
_attach("client.cli_admin", "admin_group", "admin")
_attach("broker.cli", "admin_group", "admin")
_attach("worker_agent.cli", "agent_group", "agent")
_attach("client.demo", "demo_command", "demo")
