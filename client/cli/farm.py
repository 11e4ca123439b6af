"""``rigshift farm …``: create farms, set their prices, list and drain workers, reinstate
GPUs, earnings.

``farm earnings --db URL`` (and its fallback to the local database when no broker
answers) reads a broker database directly. The client cannot do that itself: the
``rigshift`` command puts an :class:`EarningsDatabase` from the broker package in
``ctx.meta[EARNINGS_DATABASE]``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

import click

from client import output
from client.cli.common import (
    BROKER_EXPLICIT,
    USD,
    BrokerGroup,
    Converted,
    broker_address,
    broker_client,
    broker_option,
    echo_json,
    echo_listing,
    group_broker_option,
    json_option,
    listing_format,
    listing_options,
)
from client.errors import Unavailable
from client.units import (
    parse_model_price,
    parse_since,
    parse_tariff_file,
    percent_to_permille,
    pue_to_permille,
)
from rigshift.v1 import farm_pb2, farm_service_pb2

__all__ = ["EARNINGS_DATABASE", "EarningsDatabase", "farm_group"]

#: ``ctx.meta`` key of the :class:`EarningsDatabase` (absent: ``--db`` is refused).
EARNINGS_DATABASE = "rigshift.earnings_database"


class EarningsDatabase(Protocol):
    """Earnings read straight from a broker database (ops; no broker needs to run)."""

    def local(self) -> Path | None:
        """The database of a broker in ./.rigshift, else of the last ``rigshift demo``."""
        ...

    def earnings(
        self, db_url: str, farm_id: str, since: datetime | None, group_by: str
    ) -> farm_service_pb2.GetEarningsResponse:
        """GetEarnings as the broker would answer it, computed from ``db_url`` (read-only)."""
        ...


PUE = Converted("pue", pue_to_permille)
PERCENT = Converted("percent", percent_to_permille)
MODEL_PRICE = Converted("model=usd", parse_model_price)
SINCE = Converted("since", parse_since)


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


@click.group(name="farm", cls=BrokerGroup)
@group_broker_option
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
@json_option
@broker_option
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
    client = broker_client()
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
        echo_json(farm)
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


POWER_POLICIES = {"max": farm_pb2.POWER_POLICY_MAX, "efficient": farm_pb2.POWER_POLICY_EFFICIENT}
"""``--power-policy`` -> ``rigshift.v1.PowerPolicy``."""


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
@click.option(
    "--power-policy",
    type=click.Choice(["max", "efficient"]),
    default=None,
    help="max: board limits; efficient: per GPU the lowest power limit within "
    "--max-slowdown-percent of its full throughput (the most work per joule).",
)
@click.option(
    "--max-slowdown-percent",
    "max_slowdown",
    type=click.IntRange(0, 50),
    default=None,
    help="With --power-policy efficient: the most throughput a GPU may lose, 0-50.",
)
@click.option(
    "--demand-response-usd-per-mwh",
    "demand_response",
    type=USD,
    default=None,
    help="What the farm earns per MWh it does not draw in a curtailment window.",
)
@json_option
@broker_option
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
    power_policy: str | None,
    max_slowdown: int | None,
    demand_response: int | None,
    as_json: bool,
) -> None:
    """Change a farm's economics and power policy; only the options given change.

    --mining and --ask set one model's entry each and leave the other models'
    entries as they are; --tariff-file replaces all time-of-use windows.
    """
    if clear_tariff_windows:
        if tariff_windows is not None:
            raise click.UsageError("--tariff-file and --clear-tariff-windows exclude each other")
        tariff_windows = []
    client = broker_client()
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
        "power_policy": POWER_POLICIES[power_policy] if power_policy else None,
        "max_slowdown_percent": max_slowdown,
        "demand_response_micros_per_mwh": demand_response,
    }
    changed = [field for field, value in changes.items() if value is not None]
    if not changed:
        raise click.UsageError("nothing to update: give at least one option (see --help)")
    farm = client.update_farm(farm_id, **changes)
    if as_json:
        echo_json(farm)
        return
    click.echo(f"updated {farm.name}: {', '.join(changed)}")
    click.echo(output.describe_farm(farm))


@farm_group.command(name="get")
@click.argument("farm_id", metavar="ID")
@json_option
@broker_option
def farm_get(farm_id: str, as_json: bool) -> None:
    """Show a farm: tariff, PUE, mining alternative, asks, fee, margin and floor prices."""
    farm = broker_client().get_farm(farm_id)
    click.echo(output.to_json(farm) if as_json else output.describe_farm(farm))


@farm_group.command(name="workers")
@click.option("--farm", "farm_id", default="", metavar="ID", help="Only this farm's workers.")
@listing_options
@broker_option
def farm_workers(farm_id: str) -> None:
    """List workers (rigs) and their GPUs.

    Per worker: state, GPUs, reliability, container runtime, last heartbeat. Per GPU:
    score (an RTX 3090 = 100; "96 at 280 W" under a power cap), PCIe link, state
    (QUARANTINED with its reason) and verification of its claimed model (with the reason
    when not VERIFIED). -o wide adds the agent version, host RAM, CPU cores and metrics
    address per worker, and the usable VRAM and measured FP16/FP32 GFLOPS per GPU.
    """
    fmt = listing_format()
    workers = list(broker_client().iter_workers(farm_id))
    if fmt == "json":
        echo_json(farm_service_pb2.ListWorkersResponse(workers=workers))
        return
    if not workers:
        click.echo("no workers")
        return
    echo_listing(lambda wide, style: output.worker_table(workers, wide=wide, style=style))
    click.echo()
    echo_listing(lambda wide, style: output.gpu_table(workers, wide=wide, style=style))


@farm_group.command(name="drain")
@click.argument("worker_id", metavar="WORKER")
@json_option
@broker_option
def farm_drain(worker_id: str, as_json: bool) -> None:
    """Stop placing new work on a worker; its running jobs finish."""
    worker = broker_client().drain_worker(worker_id)
    if as_json:
        echo_json(worker)
        return
    click.echo(f"{worker.name} {farm_pb2.Worker.State.Name(worker.state)}")


@farm_group.group(name="gpu", cls=BrokerGroup)
def farm_gpu() -> None:
    """One GPU of a worker: reinstate it after three quarantines."""


@farm_gpu.command(name="reinstate")
@click.argument("worker_id", metavar="WORKER")
@click.argument("gpu_index", metavar="GPU", type=click.IntRange(0, 255))
@json_option
@broker_option
def farm_gpu_reinstate(worker_id: str, gpu_index: int, as_json: bool) -> None:
    """Return a GPU held out after three quarantines in 24 h to probation.

    The agent forgets the GPU's strikes and re-tests it at once; the GPU serves again
    if the self-test passes (`rigshift farm workers` shows when). The farm's operator
    or an admin only.
    """
    worker = broker_client().reinstate_gpu(worker_id, gpu_index)
    if as_json:
        echo_json(worker)
        return
    click.echo(
        f"{worker.name} GPU {gpu_index}: reinstate sent; the agent re-tests it now "
        "(it returns if the test passes)"
    )


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
@listing_options
@broker_option
def farm_earnings(farm_id: str, since: datetime | None, group_by: str, db_url: str) -> None:
    """What AI work earned: GPU-hours, kWh, revenue, energy cost, margin, $/kWh vs mining.

    Revenue is the farm's payout (client charges less the broker fee). Rows
    where AI work paid less per kWh than mining would have are marked. When no
    broker answers at the default address, the database in ./.rigshift (or the
    last `rigshift demo`'s) is read instead, and stderr says so. -o wide adds the
    attempts, the GPU-hours inside curtailment windows and the demand-response income.
    """
    fmt = listing_format()
    group_by = group_by.lower()
    if db_url:
        earnings = _database(db_url).earnings(db_url, farm_id, since, group_by)
    else:
        try:
            earnings = broker_client().get_earnings(farm_id, since=since, group_by=group_by)
        except Unavailable as err:
            ctx = click.get_current_context()
            database: EarningsDatabase | None = ctx.meta.get(EARNINGS_DATABASE)
            local = database.local() if database is not None else None
            if err.reason or ctx.meta.get(BROKER_EXPLICIT) or database is None or local is None:
                raise
            click.echo(
                f"no broker at {broker_address()}; reading the local database {local}", err=True
            )
            earnings = database.earnings(f"sqlite:///{local}", farm_id, since, group_by)
    if fmt == "json":
        click.echo(output.to_json(earnings, defaults=True))
        return
    if not earnings.rows:
        click.echo("no earnings yet" + (f" since {since:%Y-%m-%d %H:%M:%S} UTC" if since else ""))
        return
    echo_listing(
        lambda wide, style: output.earnings_table(earnings.rows, group_by, wide=wide, style=style)
    )
    for line in curtailed_lines(earnings.rows):
        click.echo(line)


def _database(db_url: str) -> EarningsDatabase:
    """The reader of broker databases the ``rigshift`` command put in ``ctx.meta``."""
    database: EarningsDatabase | None = click.get_current_context().meta.get(EARNINGS_DATABASE)
    if database is None:
        raise click.UsageError(f"--db {db_url}: this command cannot read broker databases")
    return database


# The curtailment commands live in their own module (issue 16).
from client.cli.farm_curtail import (  # noqa: E402
    curtailed_lines,
    farm_curtail,
    farm_curtailments,
)

farm_group.add_command(farm_curtail)
farm_group.add_command(farm_curtailments)
