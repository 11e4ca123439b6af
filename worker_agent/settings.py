"""The agent process's settings: a TOML file, ``RIGSHIFT_AGENT_*`` variables and options.

Precedence, highest first: ``rigshift agent run`` options > environment > ``--config``
file > defaults. The file's keys and the variables' suffixes are
:class:`~worker_agent.config.AgentConfig` field names (``drain_grace_s`` in the file,
``RIGSHIFT_AGENT_DRAIN_GRACE_S`` in the environment, ``--drain-grace-s`` on the
command line). The enrollment token may also come from ``RIGSHIFT_ENROLLMENT_TOKEN``
(the name the agent has always read). The tables (``[mining]``, ``[environments]``,
``[containers]``, ``[health]``) come only from the file.

:class:`AgentSettings` (pydantic-settings) types and layers the single values;
:func:`load_agent_config` then builds the frozen :class:`AgentConfig` the agent runs on,
whose checks (heartbeat well under the lease TTL and the rest) refuse what cannot work
together, with the messages they always had.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from rigshift.defaults import HEARTBEAT_INTERVAL_S, LEASE_TTL_S
from rigshift.settings_text import MASK, validation_message
from worker_agent.config import AgentConfig, ConfigError

__all__ = ["ENV_PREFIX", "TOKEN_ENV", "AgentSettings", "load_agent_config", "masked_config"]

#: Prefix of the agent's environment variables.
ENV_PREFIX = "RIGSHIFT_AGENT_"
#: The enrollment token's variable of old (``RIGSHIFT_AGENT_ENROLLMENT_TOKEN`` works too).
TOKEN_ENV = "RIGSHIFT_ENROLLMENT_TOKEN"

# The single values read from the --config file for the settings being built.
_FILE_VALUES: ContextVar[Mapping[str, Any] | None] = ContextVar("agent_file_values", default=None)


class AgentSettings(BaseSettings):
    """The agent's single-valued settings, layered (see the module docstring).

    Field meanings and units are those of :class:`AgentConfig`; empty strings mean
    "not set" as they do there.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )

    broker_address: str = ""
    """Broker gRPC address, host:port (required)."""
    enrollment_token: str = Field(
        "",
        validation_alias=AliasChoices(
            "enrollment_token", f"{ENV_PREFIX}ENROLLMENT_TOKEN", TOKEN_ENV
        ),
    )
    """The farm's enrollment token (required; masked by ``config show``)."""
    state_dir: Path = Path(".rigshift/agent")
    """Worker identity, Ray token, working and checkpoint directories."""
    hostname: str = Field(default_factory=socket.gethostname)
    """Host name reported to the broker."""
    simulate: str = ""
    """Simulated GPUs, e.g. RTX3090x4; empty: the real GPUs (NVML)."""
    simulate_faults: tuple[str, ...] = ()
    """Faults injected into a simulated rig, GPU:KIND:AFTER_S (env: a JSON list)."""
    ray_address: str = ""
    """Ray cluster to join; empty: a local head with this rig's GPUs."""
    ray_dashboard: bool = False
    """Start the Ray dashboard (token-protected) with the local head."""
    ray_auth_token_path: Path | None = None
    """File of the Ray auth token; default state_dir/ray_auth_token."""
    tls_ca: Path | None = None
    """PEM CA of the broker's certificate; unset: plaintext."""
    tls_cert: Path | None = None
    """PEM client certificate (mutual TLS), with tls_key."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    metrics_listen: str = ""
    """host:port of /metrics; empty: off."""
    price_micros_per_gpu_hour: int | None = None
    """Ask per GPU-hour, micro-dollars (the file also takes price_usd_per_gpu_hour)."""
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    """Lease renewal period; at most a third of lease_ttl_s."""
    session_protocol: bool = True
    """Renew the lease as messages on one Session stream (docs/scale.md), not unary calls."""
    lease_ttl_s: float = LEASE_TTL_S
    """Lease TTL the agent expects (the broker's replaces it)."""
    lease_grace_s: float = 15.0
    """Jobs kept this long past the TTL while the broker refuses connections."""
    keepalive_time_s: float = 10.0
    """gRPC keepalive ping after this long without a frame (>= the broker's minimum)."""
    keepalive_timeout_s: float = 5.0
    """An unanswered keepalive ping closes the connection after this long."""
    report_flush_s: float = 0.1
    """Output is batched this long before it is sent."""
    progress_interval_s: float = 5.0
    """Energy progress report period per running attempt."""
    energy_sample_interval_s: float = 1.0
    """Power sampling period for GPUs without an energy counter."""
    reconnect_min_s: float = 0.2
    """First reconnect delay (doubles per failure, jittered)."""
    reconnect_max_s: float = 10.0
    """Largest reconnect delay."""
    drain_grace_s: float = 60.0
    """On SIGTERM, running jobs get this long before they are handed back."""
    cancel_grace_s: float = 2.0
    """SIGTERM to SIGKILL of a cancelled job (at most 4 s)."""
    selftest_at_start: bool = True
    """Run the GPU self-test at start and register its figures."""
    selftest_python: str = ""
    """Interpreter with torch for the self-test; empty: the agent's."""
    selftest_budget_s: float = 50.0
    """The whole rig's self-test takes at most this long."""
    max_log_backlog_bytes: int = 4 << 20
    """Unsent output per attempt beyond this is dropped while the broker is away."""
    max_working_dir_bytes: int = 512 << 20
    """Largest working-directory archive downloaded."""
    checkpoint_scan_interval_s: float = 2.0
    """Checkpoint directories are checked for changes this often."""
    checkpoint_min_interval_s: float = 10.0
    """Checkpoint uploads of one attempt start at least this far apart."""
    max_checkpoint_bytes: int = 256 << 20
    """Largest checkpoint archive uploaded."""
    sandbox: str = "auto"
    """Job isolation: bwrap, auto or none."""
    job_user: str = ""
    """User a root agent runs jobs as; empty: rigshift-job or nobody."""
    agent_version: str = "rigshift-agent/0.1.0"
    """Version string sent at registration."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Options (init arguments) > environment > the ``--config`` file > defaults."""
        return (
            init_settings,
            env_settings,
            InitSettingsSource(settings_cls, init_kwargs=dict(_FILE_VALUES.get() or {})),
        )


def load_agent_config(
    config_file: Path | None = None, flags: Mapping[str, Any] | None = None
) -> AgentConfig:
    """The :class:`AgentConfig` from ``flags`` over ``RIGSHIFT_AGENT_*`` over ``config_file``.

    ``flags`` holds only the options given (AgentConfig field names as keys). Raises
    :class:`ConfigError`: the file's own refusals, a value of the wrong type, a missing
    broker address or token, or AgentConfig's consistency checks.
    """
    from worker_agent.config_file import TABLES, read_config_file

    file_values = read_config_file(config_file) if config_file is not None else {}
    tables = {k: file_values.pop(k) for k in TABLES if k in file_values}
    token = _FILE_VALUES.set(file_values)
    try:
        settings = AgentSettings(**dict(flags or {}))
    except ValidationError as err:
        raise ConfigError(validation_message(err, "agent config")) from err
    finally:
        _FILE_VALUES.reset(token)
    for key, flag in (("broker_address", "--broker"), ("enrollment_token", "--token")):
        if not getattr(settings, key):
            env = TOKEN_ENV if key == "enrollment_token" else ENV_PREFIX + key.upper()
            raise ConfigError(f"{flag} (or {key} in --config, or ${env}) is required")
    return AgentConfig(**settings.model_dump(), **tables)


def masked_config(config: AgentConfig) -> dict[str, Any]:
    """``config`` as a dict for ``rigshift agent config show``, the enrollment token masked."""
    values = asdict(config)
    values["enrollment_token"] = MASK
    if config.mining is not None:  # the models table is keyed by GPU model
        values["mining"]["models"] = dict(values["mining"]["models"])
    return values
