"""The database tables (SQLModel rows): store models only, never seen by the core.

Money and energy columns are int64 (``BIGINT`` on PostgreSQL). A job's spec is a JSON
column (:func:`spec_to_json`); a worker's reliability history too. Importing this
module registers the tables on ``SQLModel.metadata`` (the migrations rely on it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields

from sqlalchemy import BigInteger, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from broker.economics import FarmTerms, PowerPolicy, TariffWindow
from broker.model import JobSpec, Tier
from broker.windows import Window
from rigshift.power import PowerPoint
from rigshift.scoring import Measurement

__all__ = [
    "ApiKeyRow",
    "AttemptRow",
    "CurtailmentRow",
    "FarmRow",
    "GpuRow",
    "JobEventRow",
    "JobRow",
    "LeaderRow",
    "LedgerRow",
    "LogRow",
    "SlaEventRow",
    "WorkerCredentialRow",
    "WorkerRow",
    "farm_terms",
    "measurement_from_json",
    "measurement_to_json",
    "power_curve_from_json",
    "power_curve_to_json",
    "spec_from_json",
    "spec_to_json",
]


def _big() -> int:
    """An int64 column (money in micro-dollars, energy in joules): BIGINT on PostgreSQL."""
    return Field(default=0, sa_type=BigInteger)


class FarmRow(SQLModel, table=True):
    """A farm; the enrollment token is stored hashed."""

    __tablename__ = "farms"
    id: str = Field(primary_key=True)
    display_name: str = Field(unique=True, index=True)
    region: str = ""
    tariff_micros_per_kwh: int = _big()
    pue_permille: int = 1000
    enrollment_token_sha256: str = Field(index=True)
    create_time: float = 0.0
    broker_fee_permille: int = 100
    margin_micros_per_gpu_hour: int = _big()
    mining_json: str = "{}"  # GPU model -> micro-dollars per kWh
    asks_json: str = "{}"  # GPU model -> micro-dollars per GPU-hour
    tariff_windows_json: str = "[]"  # [[start_hour, end_hour, micros_per_kwh], ...]
    power_policy: str = "MAX"  # broker.economics.PowerPolicy
    max_slowdown_percent: int = 0
    demand_response_micros_per_mwh: int = _big()


class CurtailmentRow(SQLModel, table=True):
    """A farm's curtailment window (``broker.windows.Window``); its state follows from the
    times and ``cancel_time``."""

    __tablename__ = "curtailments"
    id: str = Field(primary_key=True)
    farm_id: str = Field(foreign_key="farms.id", index=True)
    start_time: float
    end_time: float
    reason: str = ""
    include_guaranteed: bool = False
    create_time: float = 0.0
    created_by: str = ""
    cancel_time: float | None = None

    def window(self) -> Window:
        """The window as the core holds it."""
        return Window(
            self.id,
            self.farm_id,
            self.start_time,
            self.end_time,
            self.reason,
            self.include_guaranteed,
            self.create_time,
            self.created_by,
            self.cancel_time,
        )


def farm_terms(row: FarmRow) -> FarmTerms:
    """The economics of a farm row, as the core uses them."""
    return FarmTerms(
        farm_id=row.id,
        tariff_micros_per_kwh=row.tariff_micros_per_kwh,
        pue_permille=row.pue_permille,
        broker_fee_permille=row.broker_fee_permille,
        margin_micros_per_gpu_hour=row.margin_micros_per_gpu_hour,
        mining_micros_per_kwh=tuple(sorted(json.loads(row.mining_json).items())),
        ask_micros_per_gpu_hour=tuple(sorted(json.loads(row.asks_json).items())),
        tariff_windows=tuple(TariffWindow(*w) for w in json.loads(row.tariff_windows_json)),
        power_policy=PowerPolicy(row.power_policy or "MAX"),
        max_slowdown_percent=row.max_slowdown_percent,
        demand_response_micros_per_mwh=row.demand_response_micros_per_mwh,
    )


class WorkerRow(SQLModel, table=True):
    """A worker (rig)."""

    __tablename__ = "workers"
    id: str = Field(primary_key=True)
    farm_id: str = Field(foreign_key="farms.id", index=True)
    hostname: str
    agent_version: str = ""
    state: str
    last_heartbeat: float = 0.0
    metrics_address: str = ""
    runtime_name: str = ""  # container runtime, e.g. "podman"; empty: runs no containers
    runtime_version: str = ""
    first_seen: float = 0.0
    offline_since: float | None = None
    reliability_json: str = "[[], []]"  # [offline spans, attempt outcomes] in the window
    host_ram_mb: int = _big()  # the rig's self-test figures (0: not reported)
    cpu_cores: int = 0
    disk_write_mbps: int = 0


class WorkerCredentialRow(SQLModel, table=True):
    """The sha256 of a worker's credential (the credential itself is never stored)."""

    __tablename__ = "worker_credentials"
    worker_id: str = Field(primary_key=True)
    credential_sha256: str = Field(index=True)


class GpuRow(SQLModel, table=True):
    """A GPU of a worker and the attempt that holds it."""

    __tablename__ = "gpus"
    worker_id: str = Field(primary_key=True, foreign_key="workers.id")
    index: int = Field(primary_key=True)
    uuid: str = ""
    model: str
    vram_mb: int = 0
    power_limit_watts: int = 0
    price_micros_per_gpu_hour: int = _big()
    pcie_link_width: int = 16
    holder_job_id: str | None = None
    holder_attempt: int | None = None
    pcie_generation: int = 0
    # The self-test's latest figures (rigshift.scoring.Measurement as JSON; "": never
    # measured). The verdict is judged from them again on load.
    measurement_json: str = ""
    quarantine_reason: str = ""  # non-empty: QUARANTINED
    quarantined_at: float | None = None
    reinstate_required: bool = False
    power_curve_json: str = "[]"  # [[limit_watts, fp16_gflops, draw_watts], ...]
    power_limit_settable: bool = False
    ai_power_limit_watts: int = 0  # under the farm's power policy (0: the board limit)


class JobRow(SQLModel, table=True):
    """A job; its spec is stored as JSON.

    Finished jobs are read from here once the core let them go (``broker.store.reads``):
    ListJobs pages on ``(owner, create_time, id)`` or ``(state, create_time, id)``, the
    retention collector reads ``(state, update_time)``, and a CreateJob retry looks up
    ``(owner, request_id)``.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_owner_create_time_id", "owner", "create_time", "id"),
        Index("ix_jobs_state_create_time_id", "state", "create_time", "id"),
        Index("ix_jobs_state_update_time", "state", "update_time"),
        Index("ix_jobs_owner_request_id", "owner", "request_id"),
    )
    id: str = Field(primary_key=True)
    owner: str = Field(index=True)
    request_id: str = Field(default="", index=True)
    spec_json: str
    state: str = Field(index=True)
    create_time: float = Field(index=True)
    update_time: float = 0.0
    status_message: str = ""
    exit_code: int = 0
    pending_reasons_json: str = "[]"
    credit_micros: int = _big()
    checkpoint_sha256: str = ""
    checkpoint_time: float | None = None


class AttemptRow(SQLModel, table=True):
    """One placement of a job."""

    __tablename__ = "attempts"
    job_id: str = Field(primary_key=True, foreign_key="jobs.id")
    number: int = Field(primary_key=True)
    worker_id: str = Field(index=True)
    gpu_indices_json: str
    price_micros_per_gpu_hour: int = _big()
    state: str = Field(index=True)  # a restart loads the jobs with a live attempt
    schedule_time: float
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    energy_joules: int = _big()
    last_sequence: int = _big()
    message: str = ""
    charge_micros: int = _big()
    settled: bool = False
    last_checkpoint_time: float | None = None
    setup_ms: int = _big()
    output_json: str = ""  # {"sha256", "size_bytes", "time", "over_limit", "message"} or ""
    output_sha256: str = Field(default="", index=True)  # output_json's sha256 ("": none)
    power_limit_watts: int = 0  # the AI power limit it was placed with (0: none)


class JobEventRow(SQLModel, table=True):
    """One state transition of a job (its history)."""

    __tablename__ = "job_events"
    job_id: str = Field(primary_key=True, foreign_key="jobs.id")
    idx: int = Field(primary_key=True)
    time: float
    from_state: str | None = None
    to_state: str
    reason: str = ""


class SlaEventRow(SQLModel, table=True):
    """One SLA event of a job."""

    __tablename__ = "sla_events"
    job_id: str = Field(primary_key=True, foreign_key="jobs.id")
    idx: int = Field(primary_key=True)
    kind: str = Field(index=True)
    time: float
    attempt: int
    seconds: int = _big()
    credit_micros: int = _big()
    detail: str = ""


class LedgerRow(SQLModel, table=True):
    """One leg of a double-entry transaction; a transaction's legs sum to zero.

    (txn, account) is unique, so the database itself refuses a second settlement.
    """

    __tablename__ = "ledger"
    __table_args__ = (UniqueConstraint("txn", "account", name="uq_ledger_txn_account"),)
    id: int | None = Field(default=None, primary_key=True)
    txn: str = Field(index=True)
    account: str = Field(index=True)
    amount_micros: int = _big()
    kind: str
    job_id: str = Field(index=True)
    attempt: int
    time: float = Field(index=True)


class ApiKeyRow(SQLModel, table=True):
    """An API key; only the sha256 of the secret is stored."""

    __tablename__ = "api_keys"
    id: str = Field(primary_key=True)
    key_sha256: str = Field(unique=True, index=True)
    role: str
    principal: str = Field(index=True)
    farm_id: str = ""
    create_time: float = 0.0
    revoked: bool = False


class LeaderRow(SQLModel, table=True):
    """Which broker replica leads (one row, id 1; see ``broker/replica.py``)."""

    __tablename__ = "broker_leader"
    id: int = Field(default=1, primary_key=True)
    replica: str
    address: str
    epoch: int = _big()
    since: float = 0.0
    secret: str = ""  # the leader's epoch secret: followers' ReplicaService calls carry it


class MetricSnapshotRow(SQLModel, table=True):
    """The metrics' running totals over history as a broker that stopped cleanly left them
    (one row, id 1; ``broker.metrics_tally.Tally.figures``). The next broker takes it and
    deletes it as it starts, so after a crash there is none and the totals are summed from
    the tables again (``broker.store.ledger_sql.history_totals``)."""

    __tablename__ = "metric_snapshots"
    id: int = Field(default=1, primary_key=True)
    figures_json: str
    taken_at: float


class LogRow(SQLModel, table=True):
    """A piece of a job's output."""

    __tablename__ = "job_logs"
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    attempt: int
    sequence: int = _big()
    data: str


def measurement_to_json(m: Measurement | None) -> str:
    """A GPU's self-test figures as the ``measurement_json`` column holds them ("": none)."""
    if m is None:
        return ""
    return json.dumps(asdict(m), sort_keys=True)


def measurement_from_json(text: str) -> Measurement | None:
    """The figures of a ``measurement_json`` column (unknown keys of a newer broker dropped)."""
    if not text:
        return None
    known = {f.name for f in fields(Measurement)}
    return Measurement(**{k: v for k, v in json.loads(text).items() if k in known})


def power_curve_to_json(curve: tuple[PowerPoint, ...]) -> str:
    """A power curve as the ``power_curve_json`` column holds it."""
    return json.dumps([[p.limit_watts, p.fp16_gflops, p.draw_watts] for p in curve])


def power_curve_from_json(text: str) -> tuple[PowerPoint, ...]:
    """The power curve of a ``power_curve_json`` column (empty text: no curve)."""
    return tuple(PowerPoint(*p) for p in json.loads(text or "[]"))


def spec_to_json(spec: JobSpec) -> str:
    """A job spec as the ``spec_json`` column holds it."""
    return json.dumps(
        {
            "command": list(spec.command),
            "env": [list(kv) for kv in spec.env],
            "gpu_count": spec.gpu_count,
            "gpu_model": spec.gpu_model,
            "min_vram_mb": spec.min_vram_mb,
            "max_price_micros_per_gpu_hour": spec.max_price_micros_per_gpu_hour,
            "max_duration_seconds": spec.max_duration_seconds,
            "working_dir_sha256": spec.working_dir_sha256,
            "max_attempts": spec.max_attempts,
            "display_name": spec.display_name,
            "tier": spec.tier.value,
            "python_requirements": spec.python_requirements,
            "requirements_sha256": spec.requirements_sha256,
            "inputs": [list(kv) for kv in spec.inputs],
            "image": spec.image,
            "min_pcie_mbps": spec.min_pcie_mbps,
            "min_host_ram_gb_per_gpu": spec.min_host_ram_gb_per_gpu,
            "min_cpu_millicores_per_gpu": spec.min_cpu_millicores_per_gpu,
            "min_score": spec.min_score,
            "allow_unverified": spec.allow_unverified,
        },
        sort_keys=True,
    )


def spec_from_json(text: str) -> JobSpec:
    """The job spec of a ``spec_json`` column (older rows lack newer keys: they load as the
    field's default, e.g. no topology minimums and ``allow_unverified`` False)."""
    d = json.loads(text)
    d["command"] = tuple(d["command"])
    d["env"] = tuple((k, v) for k, v in d["env"])
    d["tier"] = Tier(d.get("tier", "GUARANTEED"))
    d["inputs"] = tuple((k, v) for k, v in d.get("inputs", ()))
    return JobSpec(**d)
