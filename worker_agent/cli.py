"""``rigshift agent …``: run the worker agent on a rig, list its GPUs.

The ``rigshift`` CLI imports this module for every command, so it imports
nothing heavy at module level: Ray, gRPC stubs and NVML load inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from worker_agent.selftest_cli import selftest_command

__all__ = ["agent_group"]


class _Usd(click.ParamType):
    """A price in USD, parsed with Decimal into integer micro-dollars."""

    name = "usd"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """``"0.25"`` → ``250000``; a value that is not whole micro-dollars is a usage error."""
        from rigshift.units import usd_to_micros

        if isinstance(value, int):
            return value
        try:
            return usd_to_micros(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


@click.group("agent")
def agent_group() -> None:
    """Run the worker agent on a GPU rig."""


agent_group.add_command(selftest_command)


class _RequiredUnlessConfig(click.Option):
    """Required unless ``--config`` was given or its ``RIGSHIFT_AGENT_*`` variable is set
    (the file or the environment may hold the value)."""

    def __init__(self, *args: Any, settings_env: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings_env = settings_env

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        """The value, or MissingParameter when neither it, ``--config`` nor the variable is."""
        import os

        value = super().process_value(ctx, value)
        config = ctx.params.get("config_file")
        has_config = config is not None and not self.value_is_missing(config)
        has_env = bool(os.environ.get(self.settings_env))
        if (self.value_is_missing(value) or value == "") and not (has_config or has_env):
            raise click.MissingParameter(ctx=ctx, param=self)
        return value


def _check_faults(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    """Refuse a ``--simulate-fault`` that is not GPU:KIND:AFTER_S with a known KIND."""
    from worker_agent.health import parse_fault

    for text in value:
        try:
            parse_fault(text)
        except ValueError as err:
            raise click.BadParameter(str(err)) from err
    return value


@agent_group.command("run")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    is_eager=True,
    help="TOML file of AgentConfig fields (RIGSHIFT_AGENT_* and options override it).",
)
@click.option(
    "--broker",
    "broker_address",
    cls=_RequiredUnlessConfig,
    settings_env="RIGSHIFT_AGENT_BROKER_ADDRESS",
    metavar="HOST:PORT",
    help="Broker address (env RIGSHIFT_AGENT_BROKER_ADDRESS).",
)
@click.option(
    "--token",
    cls=_RequiredUnlessConfig,
    settings_env="RIGSHIFT_AGENT_ENROLLMENT_TOKEN",
    envvar="RIGSHIFT_ENROLLMENT_TOKEN",
    help="Farm enrollment token (env RIGSHIFT_ENROLLMENT_TOKEN).",
)
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM CA that signed the broker's certificate: dial the broker over TLS.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM client certificate, for a broker that requires mutual TLS.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM private key of --tls-cert.",
)
@click.option("--simulate", metavar="SPEC", help="Simulated GPUs, e.g. RTX3090x4.")
@click.option(
    "--simulate-fault",
    "faults",
    multiple=True,
    metavar="GPU:KIND:AFTER_S",
    callback=_check_faults,
    help="Inject a fault into the simulated rig (repeatable), e.g. 1:xid79:30; KIND: xid79, "
    "xid48, ecc-dbe, overheat, lost, impostor.",
)
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
    "--session/--no-session",
    "session_protocol",
    default=None,
    help="Renew the lease as messages on one Session stream (the default), or as unary "
    "Heartbeat calls (--no-session).",
)
@click.option(
    "--executor",
    type=click.Choice(["ray", "local"]),
    default="ray",
    show_default=True,
    help="local: plain subprocesses without Ray (benchmark baseline; no Ray GPU binding).",
)
@click.option(
    "--sandbox",
    type=click.Choice(["auto", "bwrap", "none"]),
    help="Job isolation: bwrap, none, or auto (bwrap when it works here) [default: auto].",
)
@click.option(
    "--job-user",
    metavar="USER",
    help="User a root agent runs jobs as [default: rigshift-job if it exists, else nobody].",
)
@click.option("--log-level", default="INFO", show_default=True)
def run_command(
    config_file: Path | None,
    broker_address: str | None,
    token: str | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    simulate: str | None,
    faults: tuple[str, ...],
    ray_address: str | None,
    ray_dashboard: bool | None,
    metrics_listen: str | None,
    price: int | None,
    state_dir: Path | None,
    hostname: str | None,
    heartbeat_interval_s: float | None,
    lease_ttl_s: float | None,
    drain_grace_s: float | None,
    session_protocol: bool | None,
    executor: str,
    sandbox: str | None,
    job_user: str | None,
    log_level: str,
) -> None:
    """Register this rig with the broker and run the jobs it assigns, until SIGTERM.

    Settings come from --config (TOML, AgentConfig field names), then the
    environment (RIGSHIFT_AGENT_<FIELD>, e.g. RIGSHIFT_AGENT_BROKER_ADDRESS; the token
    also as RIGSHIFT_ENROLLMENT_TOKEN), then these options; later ones win.
    SIGTERM or Ctrl-C drains: no new work, running jobs get --drain-grace-s to
    finish, the rest is handed back to the broker. A second signal skips the grace.
    """
    import asyncio
    import logging
    import signal

    from worker_agent.agent import Agent, AgentError
    from worker_agent.config import ConfigError
    from worker_agent.executor import LocalExecutor
    from worker_agent.gpu import parse_spec
    from worker_agent.health import parse_fault
    from worker_agent.sandbox import SandboxError, policy_for
    from worker_agent.settings import load_agent_config

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    given = {
        "broker_address": broker_address,
        "enrollment_token": token,
        "tls_ca": tls_ca,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "simulate": simulate,
        "simulate_faults": faults or None,
        "ray_address": ray_address,
        "ray_dashboard": ray_dashboard,
        "metrics_listen": metrics_listen,
        "price_micros_per_gpu_hour": price,
        "state_dir": state_dir,
        "hostname": hostname,
        "heartbeat_interval_s": heartbeat_interval_s,
        "lease_ttl_s": lease_ttl_s,
        "drain_grace_s": drain_grace_s,
        "session_protocol": session_protocol,
        "sandbox": sandbox,
        "job_user": job_user,
    }
    try:
        config = load_agent_config(config_file, {k: v for k, v in given.items() if v is not None})
        if config.simulate:
            count = len(parse_spec(config.simulate))
            for fault in map(parse_fault, config.simulate_faults):
                if fault.gpu >= count:
                    raise ConfigError(f"--simulate-fault on GPU {fault.gpu}: the rig has {count}")
        elif config.simulate_faults:
            raise ConfigError("--simulate-fault needs --simulate SPEC (faults are simulated)")
    except (ConfigError, ValueError) as err:
        raise click.UsageError(str(err)) from err

    async def main() -> None:
        local = LocalExecutor(sandbox=policy_for(config)) if executor == "local" else None
        agent = Agent(config, executor=local)
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
    except (AgentError, SandboxError) as err:
        raise click.ClickException(str(err)) from err


@agent_group.group("config")
def config_group() -> None:
    """The agent's settings (file, RIGSHIFT_AGENT_* variables, options)."""


@config_group.command("show")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The TOML file `agent run --config` would read.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of TOML.")
def config_show_command(config_file: Path | None, as_json: bool) -> None:
    """Print the effective settings (file, then environment) with the token masked.

    The TOML has the file's layout; money shows in integer micro-dollars (the *_micros_* fields).
    """
    from rigshift.settings_text import render_settings
    from worker_agent.config import ConfigError
    from worker_agent.settings import load_agent_config, masked_config

    try:
        config = load_agent_config(config_file)
    except (ConfigError, ValueError) as err:
        raise click.UsageError(str(err)) from err
    click.echo(render_settings(masked_config(config), as_json=as_json), nl=False)


@agent_group.command("gpus")
@click.option("--simulate", default="", metavar="SPEC", help="Show a simulated rig instead.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".rigshift/agent"),
    show_default=True,
    help="State directory of the agent running on this rig (for each GPU's state).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per GPU.")
def gpus_command(simulate: str, state_dir: Path, as_json: bool) -> None:
    """List the GPUs the agent would register (NVML, or simulated without a driver).

    When an agent runs with this --state-dir, each GPU also shows what it does
    (ai, mining or idle) and, with a [mining] config, AI revenue per kWh next to
    mining revenue per kWh and the energy spent mining.
    """
    from worker_agent.gpu import Load, open_backend
    from worker_agent.mining import read_status

    try:
        backend = open_backend(simulate)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    status = read_status(state_dir)
    try:
        for gpu in backend.gpus():
            live = status.get(gpu.index, {})
            # A simulated rig draws what its agent makes it do (NVML ignores this).
            load = {"mining": Load.MINING, "ai": Load.TRAINING}.get(live.get("state", ""))
            if load is not None:
                backend.set_load([gpu.index], load)
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
                "state": live.get("state", "no agent"),
            }
            if live.get("miner"):
                row.update(
                    {
                        k: live[k]
                        for k in (
                            "preference",
                            "advertise",
                            "ai_usd_per_kwh",
                            "mining_usd_per_kwh",
                            "mining_joules",
                        )
                    }
                )
            if as_json:
                click.echo(json.dumps(row))
                continue
            line = (
                f"{gpu.index:>2}  {gpu.model:<12} {gpu.vram_mb:>6} MiB  "
                f"{gpu.power_limit_watts:>4} W  PCIe x{gpu.pcie_link_width:<2}  "
                f"{t.power_watts:6.1f} W now  {gpu.uuid}  ({backend.name})  {row['state']}"
            )
            if live.get("miner"):
                line += (
                    f"  [AI ${live['ai_usd_per_kwh']}/kWh vs mining "
                    f"${live['mining_usd_per_kwh']}/kWh: {live['preference']} preferred; "
                    f"{live['mining_joules'] / 3_600_000:.3f} kWh mined]"
                )
            click.echo(line)
    finally:
        backend.close()


@agent_group.command("install")
@click.option("--broker", "broker_address", required=True, metavar="HOST:PORT", help="Broker.")
@click.option(
    "--token",
    required=True,
    envvar="RIGSHIFT_ENROLLMENT_TOKEN",
    help="Farm enrollment token (env RIGSHIFT_ENROLLMENT_TOKEN).",
)
@click.option("--simulate", default="", metavar="SPEC", help="Simulated GPUs (test rigs).")
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA of the broker's certificate (refused while the agent has no TLS option).",
)
@click.option("--metrics-listen", default="", metavar="HOST:PORT", help="Serve /metrics here.")
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="/etc/rigshift",
    show_default=True,
    help="Where agent.toml goes.",
)
@click.option(
    "--unit-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="/etc/systemd/system",
    show_default=True,
    help="Where rigshift-agent.service goes.",
)
@click.option("--user", default="rigshift", show_default=True, help="The service's User=.")
@click.option("--dry-run", is_flag=True, help="Print both files (token masked); write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing config and unit.")
@click.option(
    "--start", is_flag=True, help="Then run systemctl daemon-reload and enable --now the unit."
)
@click.option(
    "--containers",
    is_flag=True,
    help="This rig runs image jobs: [containers] enabled, and a unit drop-in for podman.",
)
def install_command(
    broker_address: str,
    token: str,
    simulate: str,
    tls_ca: Path | None,
    metrics_listen: str,
    config_dir: Path,
    unit_dir: Path,
    user: str,
    dry_run: bool,
    force: bool,
    start: bool,
    containers: bool,
) -> None:
    """Write agent.toml (mode 0600) and the systemd unit that runs `rigshift agent run --config`.

    Nothing runs systemctl unless --start is given; the next steps are printed.
    """
    import subprocess

    from worker_agent.install import (
        InstallError,
        find_executable,
        next_steps,
        plan_install,
        write_install,
    )

    if dry_run and start:
        raise click.UsageError("--dry-run and --start exclude each other")
    try:
        plan = plan_install(
            broker_address=broker_address,
            token=token,
            executable=find_executable(),
            simulate=simulate,
            tls_ca=tls_ca,
            metrics_listen=metrics_listen,
            config_dir=config_dir,
            unit_dir=unit_dir,
            user=user,
            containers=containers,
        )
        for warning in plan.warnings:
            click.echo(f"warning: {warning}", err=True)
        if dry_run:
            click.echo(f"# {plan.config_path} (mode 0600; token masked here)")
            click.echo(plan.masked_config_text)
            click.echo(f"# {plan.unit_path} (mode 0644)")
            click.echo(plan.unit_text, nl=False)
            if plan.dropin_path is not None:
                click.echo(f"# {plan.dropin_path} (mode 0644)")
                click.echo(plan.dropin_text, nl=False)
            click.echo("# dry run: nothing written", err=True)
            return
        result = write_install(plan, force=force)
    except InstallError as err:
        raise click.ClickException(str(err)) from err
    owner = f", owner {result.config_owner}" if result.config_owner else ""
    click.echo(f"wrote {plan.config_path} (mode 0600{owner})")
    click.echo(f"wrote {plan.unit_path}")
    if plan.dropin_path is not None:
        click.echo(f"wrote {plan.dropin_path}")
    steps = next_steps(plan, result)
    if start:
        unit = plan.unit_path.name
        for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", unit]):
            click.echo("$ " + " ".join(argv))
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            except OSError as err:
                raise click.ClickException(f"{argv[0]}: {err}") from err
            if done.returncode != 0:
                raise click.ClickException(
                    f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}"
                )
        steps = [s for s in steps if not s.startswith("systemctl ")]
    click.echo("next:")
    for step in steps:
        click.echo(f"  {step}")


@agent_group.command("doctor")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The agent's TOML config [default: /etc/rigshift/agent.toml when it exists].",
)
@click.option("--broker", "broker_address", metavar="HOST:PORT", help="Broker address.")
@click.option(
    "--token",
    envvar="RIGSHIFT_ENROLLMENT_TOKEN",
    help="Enrollment token (checked for presence only: redeeming it would register a worker).",
)
@click.option("--simulate", metavar="SPEC", help="Simulated GPUs, as for `agent run`.")
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Verify the broker's TLS certificate with this CA.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The agent's state directory (disk check) [default: from the config].",
)
@click.option("--timeout-s", type=float, default=5.0, show_default=True, help="Per network check.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of {check,status,finding,fix}.")
def doctor_command(
    config_file: Path | None,
    broker_address: str | None,
    token: str | None,
    simulate: str | None,
    tls_ca: Path | None,
    state_dir: Path | None,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Check this rig: GPU driver, power readings, broker, TLS, Ray, /dev/shm, clock, disk.

    One line per check, PASS, WARN or FAIL, with the fix under each WARN and FAIL.
    Exits 1 when any check FAILs.
    """
    from worker_agent.config import AgentConfig, ConfigError
    from worker_agent.config_file import read_config_file
    from worker_agent.doctor import (
        DoctorInput,
        Finding,
        findings_json,
        format_finding,
        run_checks,
    )
    from worker_agent.install import DEFAULT_CONFIG_DIR

    default_config = DEFAULT_CONFIG_DIR / "agent.toml"
    if config_file is None and broker_address is None and default_config.exists():
        config_file = default_config
    values: dict[str, Any] = {}
    config_error = ""
    if config_file is not None:
        try:
            values = read_config_file(config_file)
            AgentConfig(**values)
        except (ConfigError, ValueError, TypeError) as err:
            config_error = str(err)
    inp = DoctorInput(
        broker_address=broker_address or str(values.get("broker_address", "")),
        simulate=simulate if simulate is not None else str(values.get("simulate", "")),
        tls_ca=tls_ca,
        state_dir=state_dir or Path(str(values.get("state_dir", ".rigshift/agent"))),
        ray_address=str(values.get("ray_address", "")),
        config_path=config_file,
        config_error=config_error,
        timeout_s=timeout_s,
        **_containers_input(values.get("containers")),
    )
    extra: list[Finding] = []
    if config_file is None and not token:
        extra.append(
            Finding(
                "token",
                "WARN",
                "no enrollment token given (--token, $RIGSHIFT_ENROLLMENT_TOKEN or --config)",
                "`rigshift farm create` prints the farm's token; `agent run` needs it",
            )
        )

    def show(f: Finding) -> None:
        if not as_json:
            click.echo(format_finding(f))

    for f in extra:
        show(f)
    findings = extra + run_checks(inp, on_finding=show)
    if as_json:
        click.echo(findings_json(findings))
    if any(f.status == "FAIL" for f in findings):
        raise SystemExit(1)


def _containers_input(table: object) -> dict[str, str]:
    """The doctor's containers settings from a config file's ``[containers]`` table."""
    from worker_agent.config import ContainersConfig

    if not isinstance(table, ContainersConfig):
        return {}
    return {"podman": table.podman, "containers_enabled": table.enabled}
