"""The broker process's settings: every ``rigshift broker serve`` option, from a TOML file,
``RIGSHIFT_BROKER_*`` environment variables or the command line.

Precedence, highest first: command-line options > environment > ``--config`` file >
defaults. Keys of the file and the variables' suffixes are the field names below
(``lease_ttl_s`` in the file, ``RIGSHIFT_BROKER_LEASE_TTL_S`` in the environment,
``--lease-ttl-s`` on the command line; the one exception is ``--db`` for ``db_url``).
An unknown key in the file is refused, so a typo never falls back to a default.

:class:`BrokerSettings` is what an operator writes; :meth:`BrokerSettings.broker_config`
turns it into the :class:`broker.server.BrokerConfig` the broker runs on, which keeps its
own consistency checks (heartbeat vs lease TTL, queue policy, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from rigshift.defaults import BROKER_ADDRESS, HEARTBEAT_INTERVAL_S, LEASE_TTL_S
from rigshift.settings_text import mask_url_password, validation_message

if TYPE_CHECKING:
    from broker.server import BrokerConfig

__all__ = ["ENV_PREFIX", "BrokerSettings", "SettingsError", "load_broker_settings"]

#: Prefix of the broker's environment variables.
ENV_PREFIX = "RIGSHIFT_BROKER_"

# The --config file of the settings being built (a source needs it; the model cannot
# take it as a field without also reading it from the file itself).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("broker_config_file", default=None)


class SettingsError(ValueError):
    """The settings cannot be read or are inconsistent; the message says which and why."""


class BrokerSettings(BaseSettings):
    """Settings of one ``rigshift broker serve`` process (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    listen: str = BROKER_ADDRESS
    """gRPC host:port; port 0 picks a free port."""
    db_url: str = ""
    """SQLAlchemy URL (``--db``); empty: SQLite in ``home``. Its password is masked when shown."""
    home: str = ".rigshift"
    """Data directory: the default SQLite database and artifact store."""
    artifact_dir: str = ""
    """Archive store; empty: ``home/artifacts``."""
    metrics_listen: str = ""
    """host:port for ``/metrics`` and ``/sd`` (Prometheus); empty: off."""
    lease_ttl_s: float = LEASE_TTL_S
    """A worker that has not renewed its lease for this long is offline."""
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    """How often agents are told to renew (at most a third of ``lease_ttl_s``)."""
    max_attempts: int = Field(3, ge=1, le=20)
    """Attempts a job gets when its spec does not say."""
    spot_percent: int = Field(60, ge=1, le=100)
    """Spot jobs pay this share of the ask, percent."""
    start_deadline_s: float = 60.0
    """Guaranteed jobs starting later than this after submission earn an SLA credit."""
    broker_fee_percent: float = Field(10.0, ge=0, le=100)
    """The broker's fee for farms that do not set their own, percent of each charge."""
    rate_limit_per_s: float = 50.0
    """Calls per second per client or operator key (burst: twice that); 0: off."""
    queue_policy: Literal["fifo", "short-first"] = "fifo"
    """Order of pending jobs; short-first: smallest declared GPU time first, aged."""
    max_input_bytes: int = Field(10 << 30, ge=1)
    """Largest input archive a client may upload (``job submit --input``)."""
    max_output_bytes: int = Field(1 << 30, ge=1)
    """Largest output archive kept per attempt; a larger one is reported, not kept."""
    artifact_retention_days: int = Field(30, ge=0)
    """Remove archives older than this that no job needs (hourly); 0: keep everything."""
    db_outage_unhealthy_s: float = Field(60.0, ge=0)
    """Health turns NOT_SERVING once the database has been away this long; 0: never."""
    curtailment_lead_s: float = Field(3600.0, ge=0)
    """Before a farm's curtailment window, jobs without a declared max duration are not
    placed there within this many seconds."""
    tls_cert: str = ""
    """PEM certificate chain: serve gRPC over TLS; empty: plaintext."""
    tls_key: str = ""
    """PEM private key for ``tls_cert``."""
    tls_client_ca: str = ""
    """PEM CA: when set, clients must present a certificate it signed (mutual TLS)."""
    replica: bool = False
    """Run as one of several replicas on one PostgreSQL (``docs/replicas.md``)."""
    internal_listen: str = "127.0.0.1:0"
    """Replicas: host:port of the core while this replica leads (other replicas dial it)."""
    advertise_host: str = ""
    """Replicas: host other replicas use for ``internal_listen``; empty: its host."""
    log_level: str = "INFO"
    """Python logging level."""

    @model_validator(mode="after")
    def _consistent(self) -> BrokerSettings:
        # The messages name the flags, as they did when these checks lived in the CLI.
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.replica and not self.db_url.startswith("postgresql"):
            raise ValueError("--replica needs a PostgreSQL --db (postgresql+psycopg://…)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init arguments) > environment > the ``--config`` TOML file > defaults."""
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=_CONFIG_FILE.get()),
        )

    def broker_config(self) -> BrokerConfig:
        """The :class:`BrokerConfig` these settings describe (its checks run here)."""
        from broker.server import BrokerConfig

        return BrokerConfig(
            listen=self.listen,
            home=self.home,
            db_url=self.db_url,
            artifact_dir=self.artifact_dir,
            lease_ttl_s=self.lease_ttl_s,
            heartbeat_interval_s=self.heartbeat_interval_s,
            default_max_attempts=self.max_attempts,
            metrics_listen=self.metrics_listen,
            spot_permille=self.spot_percent * 10,
            start_deadline_s=self.start_deadline_s,
            broker_fee_permille=round(self.broker_fee_percent * 10),
            rate_limit_per_s=self.rate_limit_per_s,
            queue_policy=self.queue_policy,
            max_input_bytes=self.max_input_bytes,
            max_output_bytes=self.max_output_bytes,
            artifact_retention_days=self.artifact_retention_days,
            db_outage_unhealthy_s=self.db_outage_unhealthy_s,
            curtailment_lead_s=self.curtailment_lead_s,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_client_ca=self.tls_client_ca,
        )

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked (the database URL's password)."""
        values = self.model_dump()
        values["db_url"] = mask_url_password(self.db_url)
        return values


def load_broker_settings(
    config_file: Path | None = None, flags: Mapping[str, Any] | None = None
) -> BrokerSettings:
    """The effective settings: ``flags`` over ``RIGSHIFT_BROKER_*`` over ``config_file``.

    ``flags`` holds only options given on the command line (field names as keys).
    Raises :class:`SettingsError` with one readable line; :meth:`BrokerSettings.broker_config`
    is called too, so a heartbeat not well under the TTL is refused here.
    """
    import tomllib

    if config_file is not None:
        try:
            tomllib.loads(config_file.read_text())  # the source would fail less clearly
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise SettingsError(f"cannot read {config_file}: {err}") from err
    token = _CONFIG_FILE.set(config_file)
    try:
        settings = BrokerSettings(**dict(flags or {}))
        settings.broker_config()
    except ValidationError as err:
        raise SettingsError(validation_message(err, "broker settings")) from err
    finally:
        _CONFIG_FILE.reset(token)
    return settings
