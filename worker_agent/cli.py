"""``rigshift agent …``: run the worker agent on a rig, list its GPUs.

The ``rigshift`` CLI imports this module for every command, so it imports
nothing heavy at module level: Ray, gRPC stubs and NVML load inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

__all__ = ["agent_group"]


class _Usd(click.ParamType):
    """A price in USD, parsed with Decimal into integer micro-dollars."""

    name = "usd"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """``"0.25"`` → ``250000``; a value that is not whole micro-dollars is a usage error."""
        from client.units import usd_to_micros

        if isinstance(value, int):
            return value
        try:
            return usd_to_micros(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


@click.group("agent")
def agent_group() -> None:
    """Run the worker agent on a GPU rig."""


class _RequiredUnlessConfig(click.Option):
    """Required unless ``--config`` was given (the file may hold the value)."""

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        """The value, or MissingParameter when neither it nor ``--config`` was given."""
        value = super().process_value(ctx, value)
        config = ctx.params.get("config_file")
        has_config = config is not None and not self.value_is_missing(config)
        if (self.value_is_missing(value) or value == "") and not has_config:
            raise click.MissingParameter(ctx=ctx, param=self)
        return value


@agent_group.command("run")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    is_eager=True,
    help="TOML file of AgentConfig fields (options and env override it).",
)
@click.option(
    "--broker",
    "broker_address",
    cls=_RequiredUnlessConfig,
    metavar="HOST:PORT",
    help="Broker address.",
)
@click.option(
    "--token",
    cls=_RequiredUnlessConfig,
    envvar="RIGSHIFT_ENROLLMENT_TOKEN",
    help="Farm enrollment token (env RIGSHIFT_ENROLLMENT_TOKEN).",
)
@click.option("--simulate", metavar="SPEC", help="Simulated GPUs, e.g. RTX3090x4.")
@click.option("--ray-address", help="Join this Ray cluster instead of a local head.")
@click.option(
    "--ray-dashboard", is_flag=True, default=None, help="Start the Ray dashboard (token-protected)."
)
@click.option("--metrics-listen", metavar="HOST:PORT", help="Serve /metrics here.")
@click.option("--price-usd-per-gpu-hour", "price", type=_Usd(), help="Ask price, e.g. 0.25.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Identity, Ray token, working and checkpoint directories [default: .rigshift/agent].",
)
@click.option("--hostname", help="Host name to report [default: this host's].")
@click.option("--heartbeat-interval-s", type=float, help="[default: 3]")
@click.option("--lease-ttl-s", type=float, help="[default: 15]")
@click.option("--drain-grace-s", type=float, help="[default: 60]")
@click.option(
    "--executor",
    type=click.Choice(["ray", "local"]),
    default="ray",
    show_default=True,
    help="local: plain subprocesses without Ray (benchmark baseline; no Ray GPU binding).",
)
@click.option("--log-level", default="INFO", show_default=True)
def run_command(
    config_file: Path | None,
    broker_address: str | None,
    token: str | None,
    simulate: str | None,
    ray_address: str | None,
    ray_dashboard: bool | None,
    metrics_listen: str | None,
    price: int | None,
    state_dir: Path | None,
    hostname: str | None,
    heartbeat_interval_s: float | None,
    lease_ttl_s: float | None,
    drain_grace_s: float | None,
    executor: str,
    log_level: str,
) -> None:
    """Register this rig with the broker and run the jobs it assigns, until SIGTERM.

    Settings come from --config (TOML, AgentConfig field names), then the
    environment (RIGSHIFT_ENROLLMENT_TOKEN), then these options; later ones win.
    SIGTERM or Ctrl-C drains: no new work, running jobs get --drain-grace-s to
    finish, the rest is handed back to the broker. A second signal skips the grace.
    """
    import asyncio
    import logging
    import signal

    from worker_agent.agent import Agent, AgentError
    from worker_agent.config import AgentConfig, ConfigError, load_config_file
    from worker_agent.executor import LocalExecutor
    from worker_agent.gpu import parse_spec

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    given = {
        "broker_address": broker_address,
        "enrollment_token": token,
        "simulate": simulate,
        "ray_address": ray_address,
        "ray_dashboard": ray_dashboard,
        "metrics_listen": metrics_listen,
        "price_micros_per_gpu_hour": price,
        "state_dir": state_dir,
        "hostname": hostname,
        "heartbeat_interval_s": heartbeat_interval_s,
        "lease_ttl_s": lease_ttl_s,
        "drain_grace_s": drain_grace_s,
    }
    try:
        values = load_config_file(config_file) if config_file else {}
        values.update({k: v for k, v in given.items() if v is not None})
        for key, flag in (("broker_address", "--broker"), ("enrollment_token", "--token")):
            if not values.get(key):
                raise ConfigError(f"{flag} (or {key} in --config) is required")
        if values.get("simulate"):
            parse_spec(str(values["simulate"]))
        config = AgentConfig(**values)  # type: ignore[arg-type]
    except (ConfigError, ValueError) as err:
        raise click.UsageError(str(err)) from err

    async def main() -> None:
        agent = Agent(config, executor=LocalExecutor() if executor == "local" else None)
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if agent.state == "draining":
                agent.request_shutdown(force=True)
            else:
                agent.request_shutdown()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await agent.run()

    try:
        asyncio.run(main())
    except AgentError as err:
        raise click.ClickException(str(err)) from err


@agent_group.command("gpus")
@click.option("--simulate", default="", metavar="SPEC", help="Show a simulated rig instead.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per GPU.")
def gpus_command(simulate: str, as_json: bool) -> None:
    """List the GPUs the agent would register (NVML, or simulated without a driver)."""
    from worker_agent.gpu import open_backend

    try:
        backend = open_backend(simulate)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    try:
        for gpu in backend.gpus():
            t = backend.telemetry(gpu.index)
            row = {
                "index": gpu.index,
                "model": gpu.model,
                "uuid": gpu.uuid,
                "vram_mb": gpu.vram_mb,
                "power_limit_watts": gpu.power_limit_watts,
                "pcie_link_width": gpu.pcie_link_width,
                "power_watts": round(t.power_watts, 1),
                "temperature_celsius": t.temperature_celsius,
                "backend": backend.name,
            }
            if as_json:
                click.echo(json.dumps(row))
            else:
                click.echo(
                    f"{gpu.index:>2}  {gpu.model:<12} {gpu.vram_mb:>6} MiB  "
                    f"{gpu.power_limit_watts:>4} W  PCIe x{gpu.pcie_link_width:<2}  "
                    f"{t.power_watts:6.1f} W now  {gpu.uuid}  ({backend.name})"
                )
    finally:
        backend.close()
