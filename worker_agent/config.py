"""The agent's configuration: one frozen dataclass, units in the names, checked on creation.

Every duration is in seconds (``_s``), every price in integer micro-dollars
(``_micros_``), every size in bytes. :class:`AgentConfig` refuses values that
cannot work together, most importantly a heartbeat interval that is not well
under the lease TTL: with fewer than three heartbeats per TTL, one lost packet
or one slow broker tick expires the lease and requeues every job on the rig.
The lease defaults and that rule are shared with the broker (``rigshift.defaults``);
money is parsed by ``rigshift.units`` and GPU models are matched as
``rigshift.catalogue`` does.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from rigshift.catalogue import model_key
from rigshift.defaults import (
    BROKER_MIN_PING_INTERVAL_S,
    HEARTBEAT_INTERVAL_S,
    HEARTBEATS_PER_TTL,
    LEASE_TTL_S,
    max_heartbeat_interval_s,
)
from worker_agent.health import HealthConfig, parse_fault

__all__ = [
    "DEFAULT_SIMULATE_SPEC",
    "AgentConfig",
    "ConfigError",
    "ContainersConfig",
    "EnvironmentsConfig",
    "MiningConfig",
    "MiningModel",
    "effective_heartbeat_s",
]

#: What the agent simulates when no NVIDIA driver is present and no SPEC was given.
DEFAULT_SIMULATE_SPEC = "RTX3060x2"


class ConfigError(ValueError):
    """A configuration value is invalid or inconsistent with another; the message says how."""


@dataclass(frozen=True, slots=True)
class MiningModel:
    """The mining fallback of one GPU model (a ``[mining.models."RTX 3090"]`` table)."""

    command: tuple[str, ...] = ()
    """The miner's argv for GPUs of this model; empty uses ``MiningConfig.command``."""

    revenue_micros_per_kwh: int | None = None
    """Mining revenue per kWh of this model; None uses ``MiningConfig.revenue_micros_per_kwh``."""


@dataclass(frozen=True, slots=True)
class MiningConfig:
    """What an idle GPU does: run the operator's miner, and when it is worth it.

    The miner runs bound to one GPU (``CUDA_VISIBLE_DEVICES``); ``{gpu}`` in its
    argv becomes the GPU index (e.g. a worker name ``rig1-{gpu}`` for the pool).
    The policy (``worker_agent/mining.py``) compares the GPU's AI revenue per kWh
    (its ask per GPU-hour over its power limit) with ``revenue_micros_per_kwh``.
    """

    command: tuple[str, ...] = ()
    """The miner's argv for every GPU without a per-model command; empty: no mining."""

    revenue_micros_per_kwh: int = 0
    """What mining earns per kWh the GPU draws, micro-dollars (0: unknown, mine only as filler)."""

    models: Mapping[str, MiningModel] = field(default_factory=dict)
    """Per-GPU-model overrides, keyed by model name (matched without spaces and case)."""

    min_dwell_s: float = 60.0
    """A GPU stays at least this long in a state before the policy moves it.

    The revenue preference (AI or mining) changes at most once per dwell, and an
    idle GPU waits this long for AI work before its miner starts (unless mining
    is preferred). An assignment always takes the GPU at once.
    """

    hysteresis_percent: int = 10
    """The other side must pay this many percent more per kWh before the preference flips."""

    stop_grace_s: float = 2.0
    """The stopped miner's process tree gets SIGTERM, then SIGKILL after this long."""

    check_interval_s: float = 1.0
    """How often the agent re-evaluates the policy for every GPU."""

    restart_delay_s: float = 10.0
    """A miner that exited on its own is started again no sooner than this."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("min_dwell_s", "stop_grace_s", "check_interval_s", "restart_delay_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool) and value > 0):
                problems.append(
                    f"mining.{name} must be a positive number of seconds, got {value!r}"
                )
        if self.stop_grace_s > 4.0:
            problems.append("mining.stop_grace_s must be at most 4 s: an AI job waits for it")
        if not 0 <= self.hysteresis_percent <= 1000:
            problems.append(
                f"mining.hysteresis_percent must be 0-1000, got {self.hysteresis_percent!r}"
            )
        if self.revenue_micros_per_kwh < 0:
            problems.append("mining.revenue_usd_per_kwh must not be negative")
        for model, m in self.models.items():
            if m.revenue_micros_per_kwh is not None and m.revenue_micros_per_kwh < 0:
                problems.append(f"mining.models.{model!r}.revenue_usd_per_kwh must not be negative")
        if problems:
            raise ConfigError("invalid agent config: " + "; ".join(problems))

    def _model(self, model: str) -> MiningModel | None:
        key = model_key(model)
        return next((m for name, m in self.models.items() if model_key(name) == key), None)

    def command_for(self, model: str) -> tuple[str, ...]:
        """The miner's argv for a GPU of ``model`` (empty: this GPU does not mine)."""
        m = self._model(model)
        return m.command if m is not None and m.command else self.command

    def revenue_for(self, model: str) -> int:
        """Mining revenue per kWh for ``model``, micro-dollars."""
        m = self._model(model)
        if m is not None and m.revenue_micros_per_kwh is not None:
            return m.revenue_micros_per_kwh
        return self.revenue_micros_per_kwh


@dataclass(frozen=True, slots=True)
class EnvironmentsConfig:
    """How the agent builds the Python environments of jobs with requirements (the
    ``[environments]`` table; see ``worker_agent/environments.py``).

    Package sources given here come before those of ``$PIP_INDEX_URL``,
    ``$PIP_EXTRA_INDEX_URL`` and ``$PIP_FIND_LINKS``, which uv would not read itself.
    """

    max_cache_gb: float = 20.0
    """Disk all cached environments may take (GB, 10**9 bytes); least recently used go first."""

    index_url: str = ""
    """The main package index (``--index-url``); empty: ``$PIP_INDEX_URL`` or PyPI."""

    extra_index_urls: tuple[str, ...] = ()
    """More package indexes (``--extra-index-url``); uv prefers them to the main one."""

    find_links: tuple[str, ...] = ()
    """Directories or pages of wheels to install from (``--find-links``), e.g. local builds."""

    max_setup_s: float = 900.0
    """One build may take this long; past it, it is killed and fails as the rig's fault."""

    python: str = ""
    """Interpreter the environments are built on; empty: the agent's own, or a system
    Python when jobs run as a user who cannot execute the agent's (``job_python``)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name, unit in (("max_cache_gb", "GB"), ("max_setup_s", "seconds")):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool) and value > 0):
                problems.append(
                    f"environments.{name} must be a positive number of {unit}, got {value!r}"
                )
        for name in ("index_url", "python"):
            if not isinstance(getattr(self, name), str):
                value = getattr(self, name)
                problems.append(f"environments.{name} must be a string, got {value!r}")
        for name in ("extra_index_urls", "find_links"):
            value = getattr(self, name)
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                object.__setattr__(self, name, tuple(value))
            else:
                problems.append(f"environments.{name} must be a list of strings, got {value!r}")
        if problems:
            raise ConfigError("invalid agent config: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class ContainersConfig:
    """How the agent runs jobs that bring a container image (the ``[containers]`` table;
    see ``worker_agent/containers.py``). The agent passes its own environment
    (``CONTAINERS_CONF``, ``CONTAINERS_REGISTRIES_CONF``, ...) on to podman unchanged."""

    enabled: str = "auto"
    """``auto``: run image jobs when podman is found and works; ``true``: the same, and the
    agent says loudly when it is not; ``false``: never (image jobs are placed elsewhere)."""

    podman: str = "podman"
    """The podman executable: a name looked up on ``PATH`` or an absolute path."""

    max_cache_gb: float = 50.0
    """Disk the pulled images may take (GB, 10**9 bytes); least recently used go first,
    never one a running attempt uses (``podman rmi``)."""

    network: str = "none"
    """The containers' network (``podman run --network``): ``none`` (no network at all),
    or what the operator allows, e.g. ``slirp4netns`` or ``host``."""

    max_pull_s: float = 900.0
    """One pull may take this long; past it, it is killed and fails as the rig's fault."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.enabled not in ("auto", "true", "false"):
            problems.append(f"containers.enabled must be auto, true or false, got {self.enabled!r}")
        for name, unit in (("max_cache_gb", "GB"), ("max_pull_s", "seconds")):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool) and value > 0):
                problems.append(
                    f"containers.{name} must be a positive number of {unit}, got {value!r}"
                )
        for name in ("podman", "network"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value and not value.startswith("-")):
                problems.append(f"containers.{name} must be a non-empty string, got {value!r}")
        if problems:
            raise ConfigError("invalid agent config: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything one worker agent process needs to know.

    Build it directly in tests and from ``rigshift agent run`` options on a rig.
    Values that the broker also sends at registration (lease TTL, heartbeat
    interval) are the agent's expectation; the agent then uses the stricter of
    the two (see :func:`effective_heartbeat_s`).
    """

    broker_address: str
    """Broker gRPC address, ``host:port``. The agent only dials out."""

    enrollment_token: str
    """The farm's enrollment token (``rigshift farm create`` prints it)."""

    state_dir: Path = Path(".rigshift/agent")
    """Where the worker identity, the Ray token, working and checkpoint directories live."""

    hostname: str = field(default_factory=socket.gethostname)
    """Host name reported to the broker."""

    simulate: str = ""
    """Simulated GPUs, e.g. ``RTX3090x4`` or ``RTX3080x6,RTX3060x2``; empty means NVML."""

    ray_address: str = ""
    """Existing Ray cluster to join; empty starts a local head with exactly this rig's GPUs."""

    tls_ca: Path | None = None
    """PEM CA bundle that signed the broker's TLS certificate; None dials plaintext."""

    tls_cert: Path | None = None
    """PEM client certificate for a broker that requires mutual TLS (with ``tls_key``)."""

    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""

    ray_dashboard: bool = False
    """Start the Ray dashboard (and its Jobs API, token-protected) with the local head."""

    ray_auth_token_path: Path | None = None
    """File holding the Ray auth token; default ``state_dir/ray_auth_token`` for a local head."""

    metrics_listen: str = ""
    """``host:port`` to serve Prometheus metrics on; empty turns metrics off."""

    price_micros_per_gpu_hour: int | None = None
    """Ask price for every GPU in micro-dollars per GPU-hour; None uses the model's default."""

    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    """How often the lease is renewed (the broker's value wins when it is smaller)."""
    session_protocol: bool = True
    """Renew the lease on ``WorkerService.Session`` (issue 17: one message on a stream per
    renewal) instead of unary Heartbeat calls beside StreamInstructions; against a broker
    without Session the agent falls back on those by itself. False keeps the unary calls
    (``--no-session``): the in-process agent tests use it, because a grpc.aio test server
    in the agent's own event loop sometimes hangs its teardown (docs/scale.md §2)."""

    lease_ttl_s: float = LEASE_TTL_S
    """Lease TTL the agent expects; the broker's value replaces it at registration."""

    lease_grace_s: float = 15.0
    """How long past the lease TTL running jobs are kept while the broker *refuses*
    connections (it is not running, so nobody can requeue them; a broker that starts gives
    live workers a fresh lease). An unreachable broker (timeouts: it may be alive and
    requeue them) gets no grace: the jobs are stopped before the TTL (``worker_agent/lease.py``).
    """

    keepalive_time_s: float = 10.0
    """gRPC keepalive: ping the broker after this long without a frame from it, so a
    half-open connection (packets dropped, no reset) is found and replaced. At least
    ``rigshift.defaults.BROKER_MIN_PING_INTERVAL_S``: the broker answers more frequent
    pings with GOAWAY."""

    keepalive_timeout_s: float = 5.0
    """gRPC keepalive: a ping not acknowledged within this long closes the connection; its
    calls fail with UNAVAILABLE and the agent reconnects on a new one."""

    report_flush_s: float = 0.1
    """Output is batched this long before it is sent; start and finish are sent at once."""

    progress_interval_s: float = 5.0
    """How often cumulative energy is reported for each running attempt."""

    energy_sample_interval_s: float = 1.0
    """Power sampling period for GPUs without a hardware energy counter."""

    reconnect_min_s: float = 0.2
    """First reconnect delay; doubles per failure (with full jitter)."""

    reconnect_max_s: float = 10.0
    """Cap of the reconnect delay."""

    drain_grace_s: float = 60.0
    """On SIGTERM, running jobs get this long to finish before they are handed back."""

    cancel_grace_s: float = 2.0
    """A cancelled job gets SIGTERM, then SIGKILL after this long (kept under 5 s in total)."""

    selftest_at_start: bool = True
    """Run the self-test (``selftest.py``) at start and register its figures; False
    registers none (the broker shows the GPUs PENDING: placed only for unverified jobs)."""

    selftest_python: str = ""
    """Interpreter with torch for the self-test on real GPUs; empty: the agent's own."""

    selftest_budget_s: float = 50.0
    """The GPUs' self-test takes at most this long for the whole rig."""

    max_log_backlog_bytes: int = 4 << 20
    """Per attempt, unsent output beyond this is dropped (with a marker) while the broker is away.

    Keeps a rig's memory bounded through a long broker outage.
    """

    max_working_dir_bytes: int = 512 << 20
    """Largest working-directory archive the agent downloads."""

    checkpoint_scan_interval_s: float = 2.0
    """How often a running attempt's checkpoint directory is checked for changes to upload."""

    checkpoint_min_interval_s: float = 10.0
    """Checkpoint uploads of one attempt start at least this far apart, whatever the job's
    cadence; a directory that keeps changing is uploaded (one consistent snapshot) once
    its change has waited this long (``worker_agent/checkpoints.py``)."""

    max_checkpoint_bytes: int = 256 << 20
    """Largest checkpoint archive the agent uploads (it is packed in memory)."""

    sandbox: str = "auto"
    """Job isolation: ``bwrap`` (refuse to start without a working bubblewrap), ``auto`` (bwrap
    when installed and working, else none with a warning) or ``none`` (see ``sandbox.py``)."""

    job_user: str = ""
    """User a root agent runs jobs as; empty: ``rigshift-job`` if it exists, else ``nobody``."""

    agent_version: str = "rigshift-agent/0.1.0"
    """Version string sent at registration."""

    mining: MiningConfig | None = None
    """The mining fallback for idle GPUs (the ``[mining]`` table of the config file); None: off."""

    environments: EnvironmentsConfig = field(default_factory=EnvironmentsConfig)
    """How jobs' Python environments are built and cached (the ``[environments]`` table)."""

    containers: ContainersConfig = field(default_factory=ContainersConfig)
    """How jobs with a container image run (the ``[containers]`` table)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """GPU health checks and quarantine (the ``[health]`` table, ``health.py``)."""
    simulate_faults: tuple[str, ...] = ()
    """Faults injected into a simulated rig, ``GPU:KIND:AFTER_S`` (``--simulate-fault``)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if ":" not in self.broker_address:
            problems.append(f"broker_address must be host:port, got {self.broker_address!r}")
        if not self.enrollment_token:
            problems.append("enrollment_token is required (rigshift farm create prints one)")
        if not self.hostname.strip():
            problems.append("hostname must not be empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together")
        if self.tls_cert is not None and self.tls_ca is None:
            problems.append("tls_cert needs tls_ca (the client certificate is sent over TLS)")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_s") and not (isinstance(value, int | float) and value > 0):
                problems.append(f"{f.name} must be a positive number of seconds, got {value!r}")
        if self.price_micros_per_gpu_hour is not None and self.price_micros_per_gpu_hour < 0:
            problems.append("price_micros_per_gpu_hour must not be negative")
        if self.cancel_grace_s > 4.0:
            problems.append(
                "cancel_grace_s must be at most 4 s: a cancelled job is gone within 5 s"
            )
        if self.reconnect_min_s > self.reconnect_max_s:
            problems.append("reconnect_min_s must not exceed reconnect_max_s")
        keepalive = self.keepalive_time_s
        if isinstance(keepalive, int | float) and 0 < keepalive < BROKER_MIN_PING_INTERVAL_S:
            problems.append(
                f"keepalive_time_s={self.keepalive_time_s:g} is under the broker's minimum ping "
                f"interval of {BROKER_MIN_PING_INTERVAL_S:g} s: the broker would close the "
                "connection (GOAWAY too_many_pings)"
            )
        object.__setattr__(self, "simulate_faults", tuple(self.simulate_faults))  # TOML: a list
        for fault in self.simulate_faults:
            try:
                parse_fault(fault)
            except ValueError as err:
                problems.append(str(err))
        if self.sandbox not in ("auto", "bwrap", "none"):
            problems.append(f"sandbox must be auto, bwrap or none, got {self.sandbox!r}")
        if not problems:
            try:
                check_heartbeat(self.heartbeat_interval_s, self.lease_ttl_s)
            except ConfigError as err:
                problems.append(str(err))
        if problems:
            raise ConfigError("invalid agent config: " + "; ".join(problems))

    @property
    def ray_token_path(self) -> Path:
        """The Ray auth token file the agent uses (created for a local head when missing)."""
        return self.ray_auth_token_path or self.state_dir / "ray_auth_token"

    def with_changes(self, **changes: object) -> AgentConfig:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def check_heartbeat(heartbeat_interval_s: float, lease_ttl_s: float) -> None:
    """Refuse a heartbeat interval that is not well under the lease TTL (at most
    TTL / ``HEARTBEATS_PER_TTL``, ``rigshift.defaults``)."""
    if heartbeat_interval_s * HEARTBEATS_PER_TTL > lease_ttl_s:
        raise ConfigError(
            f"heartbeat_interval_s={heartbeat_interval_s:g} is not well under "
            f"lease_ttl_s={lease_ttl_s:g}: at least {HEARTBEATS_PER_TTL} heartbeats must fit "
            f"in one lease, so use a heartbeat interval of at most "
            f"{max_heartbeat_interval_s(lease_ttl_s):g} s (or a longer lease)"
        )


def effective_heartbeat_s(
    config: AgentConfig, broker_interval_s: float, broker_ttl_s: float
) -> float:
    """The heartbeat interval to use once the broker has said its TTL and interval.

    The smallest of the agent's, the broker's and TTL/3, so that a broker with a
    shorter lease than the agent expected never sees the lease lapse.
    """
    candidates = [config.heartbeat_interval_s]
    if broker_interval_s > 0:
        candidates.append(broker_interval_s)
    if broker_ttl_s > 0:
        candidates.append(max_heartbeat_interval_s(broker_ttl_s))
    return min(candidates)
