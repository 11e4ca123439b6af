"""The agent's ``--config`` TOML file read into :class:`~worker_agent.config.AgentConfig` fields.

The file is the lowest layer of the agent's settings (``worker_agent/settings.py`` puts
``RIGSHIFT_AGENT_*`` variables and ``rigshift agent run`` options on top). It stays a
parser of its own rather than pydantic-settings' TOML source because its tables
(``[mining]``, ``[environments]``, ``[containers]``, ``[health]``) become the frozen
dataclasses the agent runs on, money is written in USD strings and becomes integer
micro-dollars, and its refusals (``unknown key ...; known: ...``) are a documented
contract that operators and tests rely on.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from rigshift.units import usd_to_micros
from worker_agent.config import (
    AgentConfig,
    ConfigError,
    ContainersConfig,
    EnvironmentsConfig,
    MiningConfig,
    MiningModel,
)
from worker_agent.health import health_table

__all__ = ["TABLES", "read_config_file"]

#: Keys of the file that are tables (nested settings), not single values.
TABLES = ("mining", "environments", "containers", "health")

_PATH_FIELDS = ("state_dir", "ray_auth_token_path", "tls_ca", "tls_cert", "tls_key")


def read_config_file(path: Path) -> dict[str, Any]:
    """AgentConfig fields from a TOML file (e.g. ``/etc/rigshift/agent.toml``).

    Keys are AgentConfig field names; money may also be given as
    ``price_usd_per_gpu_hour = "0.25"`` (a string or integer, never a float:
    it becomes integer micro-dollars through Decimal). Unknown keys are refused
    with the list of known ones, so a typo never silently falls back to a default.
    """
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    known = {f.name for f in fields(AgentConfig)}
    out: dict[str, object] = {}
    for key, value in data.items():
        if key == "price_usd_per_gpu_hour":
            out["price_micros_per_gpu_hour"] = _usd_micros(path, key, value)
        elif key == "mining":
            out["mining"] = _mining_table(path, value)
        elif key == "environments":
            out["environments"] = _environments_table(path, value)
        elif key == "containers":
            out["containers"] = _containers_table(path, value)
        elif key == "health":
            try:
                out["health"] = health_table(value)
            except ValueError as err:
                raise ConfigError(f"{path}: {err}") from err
        elif key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; known: {', '.join(sorted(known))}")
        else:
            out[key] = Path(value) if key in _PATH_FIELDS else value
    return out


def _usd_micros(path: Path, key: str, value: object) -> int:
    """A USD amount written as a string or integer (never a float) in integer micro-dollars
    (:func:`rigshift.units.usd_to_micros`)."""
    if isinstance(value, float | bool):
        raise ConfigError(f'{path}: write {key} as a string, e.g. "0.25" (money is no float)')
    if not isinstance(value, str | int):
        raise ConfigError(f"{path}: {key} is not a number: {value!r}")
    try:
        return usd_to_micros(value)
    except ValueError as err:
        raise ConfigError(f"{path}: {key}: {err}") from err


def _argv(path: Path, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ConfigError(
            f'{path}: {key} must be a list of strings, e.g. ["t-rex", "-a", "ethash"]'
        )
    return tuple(value)


_MINING_MODEL_KEYS = ("command", "revenue_usd_per_kwh")
_MINING_KEYS = (
    *_MINING_MODEL_KEYS,
    "models",
    "min_dwell_s",
    "hysteresis_percent",
    "stop_grace_s",
    "check_interval_s",
    "restart_delay_s",
)


def _mining_table(path: Path, table: object) -> MiningConfig:
    """``[mining]`` (and ``[mining.models."MODEL"]``) as a :class:`MiningConfig`."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: mining must be a table ([mining])")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _MINING_KEYS:
            known = ", ".join(sorted(_MINING_KEYS))
            raise ConfigError(f"{path}: unknown key mining.{key!r}; known: {known}")
        if key == "command":
            values["command"] = _argv(path, "mining.command", value)
        elif key == "revenue_usd_per_kwh":
            values["revenue_micros_per_kwh"] = _usd_micros(path, f"mining.{key}", value)
        elif key == "models":
            if not isinstance(value, dict):
                raise ConfigError(
                    f'{path}: mining.models must be tables ([mining.models."RTX 3090"])'
                )
            values["models"] = {
                model: _mining_model(path, model, entry) for model, entry in value.items()
            }
        elif key == "hysteresis_percent":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{path}: mining.hysteresis_percent must be a whole number")
            values[key] = value
        else:
            values[key] = value
    return MiningConfig(**values)


def _mining_model(path: Path, model: str, entry: object) -> MiningModel:
    if not isinstance(entry, dict):
        raise ConfigError(f'{path}: mining.models."{model}" must be a table')
    unknown = set(entry) - set(_MINING_MODEL_KEYS)
    if unknown:
        raise ConfigError(
            f'{path}: unknown key mining.models."{model}".{sorted(unknown)[0]!r}; '
            f"known: {', '.join(_MINING_MODEL_KEYS)}"
        )
    command = _argv(path, f'mining.models."{model}".command', entry.get("command", []))
    revenue = entry.get("revenue_usd_per_kwh")
    micros = (
        None if revenue is None else _usd_micros(path, f'mining.models."{model}".revenue', revenue)
    )
    return MiningModel(command=command, revenue_micros_per_kwh=micros)


_ENVIRONMENTS_KEYS = tuple(f.name for f in fields(EnvironmentsConfig))


def _environments_table(path: Path, table: object) -> EnvironmentsConfig:
    """``[environments]`` as an :class:`EnvironmentsConfig` (validated by it)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: environments must be a table ([environments])")
    for key in table:
        if key not in _ENVIRONMENTS_KEYS:
            known = ", ".join(sorted(_ENVIRONMENTS_KEYS))
            raise ConfigError(f"{path}: unknown key environments.{key!r}; known: {known}")
    return EnvironmentsConfig(**table)


_CONTAINERS_KEYS = tuple(f.name for f in fields(ContainersConfig))


def _containers_table(path: Path, table: object) -> ContainersConfig:
    """``[containers]`` as a :class:`ContainersConfig` (validated by it); ``enabled`` may be
    a TOML boolean."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: containers must be a table ([containers])")
    for key in table:
        if key not in _CONTAINERS_KEYS:
            known = ", ".join(_CONTAINERS_KEYS)
            raise ConfigError(f"{path}: unknown key containers.{key!r}; known: {known}")
    if isinstance(table.get("enabled"), bool):
        table = {**table, "enabled": "true" if table["enabled"] else "false"}
    return ContainersConfig(**table)
