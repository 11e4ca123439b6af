"""``rigshift broker …`` and the broker's own ``rigshift admin …`` commands.

The ``admin`` group here holds what works on the broker's database directly
(``verify-ledger``); the API-key commands, which call the broker's API, are the
client's (``client.cli.admin``), and the ``rigshift`` command shows both in one group.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

if TYPE_CHECKING:
    from broker.server import BrokerConfig

from rigshift.credentials import credentials_path
from rigshift.defaults import BROKER_ADDRESS, HEARTBEAT_INTERVAL_S, LEASE_TTL_S

__all__ = ["admin_group", "broker_group"]


@click.group("broker")
def broker_group() -> None:
    """Run the broker (the marketplace's central service)."""


def _given(ctx: click.Context, options: dict[str, object]) -> dict[str, object]:
    """The options typed on the command line (not click's defaults): the settings' top layer.

    The options keep their defaults for ``--help``; the settings model has the same ones.
    """
    return {
        name: value
        for name, value in options.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }


@broker_group.command("serve")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file of settings (broker/settings.py); RIGSHIFT_BROKER_* and options override it.",
)
@click.option("--listen", default=BROKER_ADDRESS, show_default=True, help="gRPC host:port.")
@click.option("--db", "db_url", default="", help="SQLAlchemy URL [default: SQLite in --home].")
@click.option("--home", default=".rigshift", show_default=True, help="Data directory.")
@click.option("--artifact-dir", default="", help="Archive store [default: HOME/artifacts].")
@click.option(
    "--metrics-listen", default="", help="host:port for /metrics and /sd (off when empty)."
)
@click.option("--lease-ttl-s", default=LEASE_TTL_S, show_default=True, type=float)
@click.option("--heartbeat-interval-s", default=HEARTBEAT_INTERVAL_S, show_default=True, type=float)
@click.option("--max-attempts", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option(
    "--spot-percent",
    default=60,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Spot jobs pay this share of the ask.",
)
@click.option(
    "--start-deadline-s",
    default=60.0,
    show_default=True,
    type=float,
    help="Guaranteed jobs starting later than this earn an SLA credit.",
)
@click.option(
    "--broker-fee-percent",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, 100),
    help="Fee for farms that do not set their own.",
)
@click.option(
    "--rate-limit-per-s",
    default=50.0,
    show_default=True,
    type=float,
    help="Calls per second per client/operator key (0: off).",
)
@click.option(
    "--queue-policy",
    default="fifo",
    show_default=True,
    type=click.Choice(["fifo", "short-first"]),
    help="Order of pending jobs; short-first: smallest declared GPU time first, aged.",
)
@click.option(
    "--max-input-bytes",
    default=10 << 30,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest input archive a client may upload (job submit --input).",
)
@click.option(
    "--max-output-bytes",
    default=1 << 30,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest output archive kept per attempt; a larger one is reported, not kept.",
)
@click.option(
    "--artifact-retention-days",
    default=30,
    show_default=True,
    type=click.IntRange(min=0),
    help="Remove archives older than this that no job needs (hourly); 0: keep everything.",
)
@click.option(
    "--db-outage-unhealthy-s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Health turns NOT_SERVING once the database has been away this long (0: never).",
)
@click.option(
    "--curtailment-lead-s",
    default=3600.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Before a farm's curtailment window, jobs without a declared max duration are not "
    "placed there within this many seconds.",
)
@click.option("--tls-cert", default="", help="PEM certificate chain: serve gRPC over TLS.")
@click.option("--tls-key", default="", help="PEM private key for --tls-cert.")
@click.option("--tls-client-ca", default="", help="PEM CA: require client certificates.")
@click.option(
    "--replica",
    is_flag=True,
    help="Run as one of several replicas on one PostgreSQL (see docs/replicas.md).",
)
@click.option(
    "--internal-listen",
    default="127.0.0.1:0",
    show_default=True,
    help="Replicas: host:port of the core while this replica leads (other replicas dial it).",
)
@click.option(
    "--advertise-host",
    default="",
    help="Replicas: host other replicas use for --internal-listen [default: its host].",
)
@click.option("--log-level", default="INFO", show_default=True)
@click.pass_context
def serve(ctx: click.Context, config_file: Path | None, **options: object) -> None:
    """Serve the rigshift.v1 API until SIGTERM or SIGINT, then stop gracefully.

    Settings come from --config (TOML), then RIGSHIFT_BROKER_* variables (e.g.
    RIGSHIFT_BROKER_DB_URL), then these options; later ones win (docs/ops.md).
    """
    from broker.server import Broker
    from broker.settings import load_broker_settings

    try:
        settings = load_broker_settings(config_file, _given(ctx, options))
        config = settings.broker_config()
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    replica, listen = settings.replica, settings.listen
    internal_listen, advertise_host = settings.internal_listen, settings.advertise_host

    async def main() -> None:
        if replica:
            await serve_replica(config, internal_listen, advertise_host)
            return
        broker = Broker(config)
        await broker.start()
        click.echo(f"rigshift broker listening on {broker.address}")
        if broker.admin_key:
            click.echo(f"rigshift broker created an admin key; saved to {credentials_path()}")
        if broker.metrics_address:
            click.echo(f"rigshift broker metrics on http://{broker.metrics_address}/metrics")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.stop()

    from broker.errors import DatabaseUnavailable
    from broker.schema import SchemaOutOfDate

    try:
        asyncio.run(main())
    except ReplicaFenced as err:
        raise click.ClickException(str(err)) from err
    except DatabaseUnavailable as err:  # at start: nothing to serve from yet
        raise click.ClickException(f"cannot start: {err.message}") from err
    except SchemaOutOfDate as err:
        raise click.ClickException(err.message) from err
    except OSError as err:
        raise click.ClickException(f"cannot serve on {listen}: {err}") from err


@broker_group.group("config")
def config_group() -> None:
    """The broker's settings (file, RIGSHIFT_BROKER_* variables, options)."""


@config_group.command("show")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The TOML file `broker serve --config` would read.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of TOML.")
def config_show_command(config_file: Path | None, as_json: bool) -> None:
    """Print the effective settings (file, then environment) with secrets masked.

    The TOML printed is a valid --config file; the database URL's password shows as ***.
    """
    from broker.settings import load_broker_settings
    from rigshift.settings_text import render_settings

    try:
        settings = load_broker_settings(config_file)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    click.echo(render_settings(settings.masked(), as_json=as_json), nl=False)


class ReplicaFenced(Exception):
    """The replica stopped leading because it lost its lock or found a newer writer."""


async def serve_replica(config: BrokerConfig, internal_listen: str, advertise_host: str) -> None:
    """Run one replica until SIGTERM/SIGINT; raise ReplicaFenced when it fenced itself off."""
    from broker.replica import ReplicaBroker

    replica = ReplicaBroker(config, internal_listen=internal_listen, advertise_host=advertise_host)
    await replica.start()
    role = "leader" if replica.leading else f"follower of {replica.leader_address or '(none yet)'}"
    click.echo(
        f"rigshift broker replica {replica.replica_id} listening on {replica.address} ({role})"
    )
    if replica.admin_key and config.write_credentials:
        click.echo(f"rigshift broker created an admin key; saved to {credentials_path()}")
    if replica.metrics_address:
        click.echo(f"rigshift broker metrics on http://{replica.metrics_address}/metrics")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = loop.create_task(stop.wait())
    fenced = loop.create_task(replica.failed.wait())
    await asyncio.wait({stopped, fenced}, return_when=asyncio.FIRST_COMPLETED)
    await replica.stop()
    if replica.failed.is_set() and not stop.is_set():
        raise ReplicaFenced("this replica stopped leading (see the log); restart it to rejoin")


@click.group("admin")
def admin_group() -> None:
    """Operate on the broker's database directly (ops): the ledger."""


@admin_group.command("verify-ledger")
@click.option("--db", "db_url", default="", help="SQLAlchemy URL [default: SQLite in --home].")
@click.option("--home", default=".rigshift", show_default=True, help="Data directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_ledger_command(db_url: str, home: str, as_json: bool) -> None:
    """Check that the ledger balances and every finished attempt is settled exactly once.

    Exits 0 when it does; otherwise prints the first discrepancy (all of them with
    --json) and exits 1.
    """
    import json
    from pathlib import Path

    from broker.ledger import verify_ledger
    from broker.store import Store, local_database

    if not db_url:
        found = local_database(home)
        if found is None:
            raise click.ClickException(
                f"no broker database at {Path(home) / 'broker.db'} (use --db or --home)"
            )
        if found.parent != Path(home):
            click.echo(f"using the last demo's database {found}", err=True)
        db_url = f"sqlite:///{found}"
    store = Store(db_url)
    try:
        problems, summary = verify_ledger(store)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems, **summary}))
    elif problems:
        click.echo(f"ledger NOT OK: {problems[0]}", err=True)
        if len(problems) > 1:
            click.echo(f"({len(problems) - 1} more discrepancies; --json lists all)", err=True)
    else:
        click.echo(
            f"ledger OK: {summary['entries']} entries in {summary['transactions']} transactions "
            f"balance to 0; {summary['settled_attempts']} attempts settled exactly once"
        )
    if problems:
        raise SystemExit(1)


@broker_group.command("migrate")
@click.option("--db", "db_url", default="", help="SQLAlchemy URL [default: SQLite in --home].")
@click.option("--home", default=".rigshift", show_default=True, help="Data directory.")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def migrate_command(db_url: str, home: str, revision: str) -> None:
    """Upgrade the database schema (run before starting a new broker version)."""
    from broker.schema import current_revision, migrate
    from broker.store import Store

    if not db_url:
        from pathlib import Path

        Path(home).mkdir(parents=True, exist_ok=True)
        db_url = f"sqlite:///{Path(home) / 'broker.db'}"
    store = Store(db_url, create=False)
    try:
        before = current_revision(store.engine)
        migrate(store.engine, revision)
        after = current_revision(store.engine)
    finally:
        store.close()
    click.echo(f"schema at {after} (was {before or 'empty'})")
