"""`rigshift broker …` commands."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

__all__ = ["broker_group"]


@click.group("broker")
def broker_group() -> None:
    """Run the broker (the marketplace's central service)."""


@broker_group.command("serve")
@click.option("--listen", default="127.0.0.1:50051", show_default=True, help="gRPC host:port.")
@click.option("--db", "db_url", default="", help="SQLAlchemy URL [default: SQLite in --home].")
@click.option("--home", default=".rigshift", show_default=True, help="Data directory.")
@click.option("--artifact-dir", default="", help="Archive store [default: HOME/artifacts].")
@click.option("--metrics-listen", default="", help="host:port for /metrics (off when empty).")
@click.option("--lease-ttl-s", default=15.0, show_default=True, type=float)
@click.option("--heartbeat-interval-s", default=3.0, show_default=True, type=float)
@click.option("--max-attempts", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--log-level", default="INFO", show_default=True)
def serve(
    listen: str,
    db_url: str,
    home: str,
    artifact_dir: str,
    metrics_listen: str,
    lease_ttl_s: float,
    heartbeat_interval_s: float,
    max_attempts: int,
    log_level: str,
) -> None:
    """Serve the rigshift.v1 API until SIGTERM or SIGINT, then stop gracefully."""
    from broker.server import Broker, BrokerConfig

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        config = BrokerConfig(
            listen=listen,
            home=home,
            db_url=db_url,
            artifact_dir=artifact_dir,
            lease_ttl_s=lease_ttl_s,
            heartbeat_interval_s=heartbeat_interval_s,
            default_max_attempts=max_attempts,
        )
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    if metrics_listen:
        host, _, port = metrics_listen.rpartition(":")
        from prometheus_client import start_http_server

        start_http_server(int(port), addr=host or "127.0.0.1")

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        click.echo(f"rigshift broker listening on {broker.address}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.stop()

    try:
        asyncio.run(main())
    except OSError as err:
        raise click.ClickException(f"cannot serve on {listen}: {err}") from err
