"""The ``rigshift`` command line: ``rigshift job …``, ``rigshift farm …`` and friends.

``job`` and ``farm`` talk to the broker through :class:`client.sdk.Client`;
``--broker`` (or ``$RIGSHIFT_BROKER``) says where it is. Every listing and
every command that returns a resource takes ``--json``, which prints the API
response as proto JSON. Errors from the broker print ``error: …`` on stderr and
exit 1; usage mistakes exit 2 (click's convention).
"""

from __future__ import annotations

import importlib
import shlex
from collections.abc import Callable
from typing import Any

import click

from client import output
from client.errors import RigshiftError, Unavailable
from client.sdk import DEFAULT_BROKER, Client
from client.units import gb_to_mib, pue_to_permille, usd_to_micros
from rigshift.v1 import farm_pb2, farm_service_pb2, job_pb2

__all__ = ["farm_group", "job_group", "main"]

_BROKER_KEY = "rigshift.broker"


# -- parameter types ----------------------------------------------------------


class _Converted(click.ParamType):
    """A click type wrapping a ``units`` converter; its ValueError becomes a usage error."""

    def __init__(self, name: str, convert: Callable[[str], int]) -> None:
        self.name = name
        self._convert = convert

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return self._convert(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


USD = _Converted("usd", usd_to_micros)
GB = _Converted("gb", gb_to_mib)
PUE = _Converted("pue", pue_to_permille)
_JOB_STATES = [n for n in job_pb2.Job.State.keys() if n != "STATE_UNSPECIFIED"]  # noqa: SIM118


def _env_pair(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx, param)
        env[key] = value
    return env


# -- broker address, client and error handling ---------------------------------


def _remember_broker(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[_BROKER_KEY] = value


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
    """Submit, inspect, follow and cancel training jobs."""


@job_group.command(name="submit", context_settings={"allow_interspersed_args": False})
@click.option(
    "--gpus",
    "gpu_count",
    type=click.IntRange(min=0),  # the broker owns the upper limit and says why
    default=1,
    show_default=True,
    help="GPUs, all on one rig.",
)
@click.option("--gpu-model", default="", help='Exact GPU model, e.g. "RTX 3090".')
@click.option("--min-vram-gb", "min_vram_mib", type=GB, default=0, help="Minimum GiB per GPU.")
@click.option(
    "--max-price-usd-per-gpu-hour", "max_price", type=USD, default=0, help="Price cap, e.g. 0.35."
)
@click.option(
    "--working-dir",
    type=click.Path(exists=True, file_okay=False),
    help="Directory to upload and run the command in.",
)
@click.option(
    "--env", "env", multiple=True, callback=_env_pair, metavar="KEY=VALUE", help="Repeatable."
)
@click.option("--max-attempts", type=click.IntRange(min=0), default=0, help="0: broker default.")
@click.option("--max-duration-s", type=click.IntRange(min=0), default=0, help="0: broker default.")
@click.option("--name", "display_name", default="", help="Label shown in listings.")
@click.option("--request-id", default="", help="Idempotency key; a uuid4 when omitted.")
@_json_option
@_broker_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def job_submit(
    gpu_count: int,
    gpu_model: str,
    min_vram_mib: int,
    max_price: int,
    working_dir: str | None,
    env: dict[str, str],
    max_attempts: int,
    max_duration_s: int,
    display_name: str,
    request_id: str,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Submit COMMAND (everything after the options, or after `--`) as a job."""
    client = _client()
    sha256 = ""
    if working_dir:
        sha256 = client.upload_working_dir(working_dir)
        click.echo(f"uploaded {working_dir} (sha256:{sha256})", err=True)
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
        request_id=request_id,
    )
    if as_json:
        _echo_json(job)
        return
    click.echo(f"submitted {job.name} ({job_pb2.Job.State.Name(job.state)})")
    click.echo(f"  follow it: rigshift job watch {_short_id(job.name)}")


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
    """Create farms, list and drain their workers."""


@farm_group.command(name="create")
@click.argument("display_name", metavar="NAME")
@click.option("--region", default="", help='Region label, e.g. "eu-north".')
@click.option("--tariff-usd-per-kwh", "tariff", type=USD, default=0, help="e.g. 0.12")
@click.option("--pue", type=PUE, default=0, help="Power usage effectiveness, e.g. 1.25.")
@_json_option
@_broker_option
def farm_create(display_name: str, region: str, tariff: int, pue: int, as_json: bool) -> None:
    """Create a farm and print its enrollment token and the agent command for each rig."""
    client = _client()
    farm = client.create_farm(
        display_name, region=region, tariff_micros_per_kwh=tariff, pue_permille=pue
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


@farm_group.command(name="get")
@click.argument("farm_id", metavar="ID")
@_json_option
@_broker_option
def farm_get(farm_id: str, as_json: bool) -> None:
    """Show a farm."""
    farm = _client().get_farm(farm_id)
    click.echo(output.to_json(farm) if as_json else output.describe_farm(farm))


@farm_group.command(name="workers")
@click.option("--farm", "farm_id", default="", metavar="ID", help="Only this farm's workers.")
@_json_option
@_broker_option
def farm_workers(farm_id: str, as_json: bool) -> None:
    """List workers (rigs): state, GPUs and last heartbeat."""
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
    if isinstance(command, click.Command):
        main.add_command(command, name)


_attach("broker.cli", "broker_group", "broker")
_attach("worker_agent.cli", "agent_group", "agent")
_attach("client.demo", "demo_command", "demo")
