import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from rigshift.v1 import farm_pb2 as _farm_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionRequest(_message.Message):
    __slots__ = ("worker", "status")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    status: WorkerStatus
    def __init__(self, worker: _Optional[str] = ..., status: _Optional[_Union[WorkerStatus, _Mapping]] = ...) -> None: ...

class LeaseRenewed(_message.Message):
    __slots__ = ("lease_expire_time", "status_wanted")
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_WANTED_FIELD_NUMBER: _ClassVar[int]
    lease_expire_time: _timestamp_pb2.Timestamp
    status_wanted: bool
    def __init__(self, lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status_wanted: _Optional[bool] = ...) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("index", "uuid", "model", "vram_mb", "power_limit_watts", "price_micros_per_gpu_hour", "pcie_link_width", "pcie_generation", "measurement", "health", "power_curve", "power_limit_settable")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VRAM_MB_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    PRICE_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    PCIE_LINK_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PCIE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    POWER_CURVE_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_SETTABLE_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    model: str
    vram_mb: int
    power_limit_watts: int
    price_micros_per_gpu_hour: int
    pcie_link_width: int
    pcie_generation: int
    measurement: _farm_pb2.GpuMeasurement
    health: GpuHealth
    power_curve: _containers.RepeatedCompositeFieldContainer[_farm_pb2.PowerPoint]
    power_limit_settable: bool
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., model: _Optional[str] = ..., vram_mb: _Optional[int] = ..., power_limit_watts: _Optional[int] = ..., price_micros_per_gpu_hour: _Optional[int] = ..., pcie_link_width: _Optional[int] = ..., pcie_generation: _Optional[int] = ..., measurement: _Optional[_Union[_farm_pb2.GpuMeasurement, _Mapping]] = ..., health: _Optional[_Union[GpuHealth, _Mapping]] = ..., power_curve: _Optional[_Iterable[_Union[_farm_pb2.PowerPoint, _Mapping]]] = ..., power_limit_settable: _Optional[bool] = ...) -> None: ...

class GpuHealth(_message.Message):
    __slots__ = ("index", "quarantined", "reason", "since", "strikes", "reinstate_required", "measurement")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    STRIKES_FIELD_NUMBER: _ClassVar[int]
    REINSTATE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    quarantined: bool
    reason: str
    since: _timestamp_pb2.Timestamp
    strikes: int
    reinstate_required: bool
    measurement: _farm_pb2.GpuMeasurement
    def __init__(self, index: _Optional[int] = ..., quarantined: _Optional[bool] = ..., reason: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., strikes: _Optional[int] = ..., reinstate_required: _Optional[bool] = ..., measurement: _Optional[_Union[_farm_pb2.GpuMeasurement, _Mapping]] = ...) -> None: ...

class ReportGpuHealthRequest(_message.Message):
    __slots__ = ("worker", "gpus")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuHealth]
    def __init__(self, worker: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuHealth, _Mapping]]] = ...) -> None: ...

class ReportGpuHealthResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("enrollment_token", "hostname", "agent_version", "gpus", "worker", "metrics_address", "container_runtime", "host")
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_RUNTIME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    enrollment_token: str
    hostname: str
    agent_version: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    worker: str
    metrics_address: str
    container_runtime: _farm_pb2.ContainerRuntime
    host: _farm_pb2.HostInfo
    def __init__(self, enrollment_token: _Optional[str] = ..., hostname: _Optional[str] = ..., agent_version: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., worker: _Optional[str] = ..., metrics_address: _Optional[str] = ..., container_runtime: _Optional[_Union[_farm_pb2.ContainerRuntime, _Mapping]] = ..., host: _Optional[_Union[_farm_pb2.HostInfo, _Mapping]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("worker", "credential", "lease_ttl_seconds", "heartbeat_interval_seconds")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    credential: str
    lease_ttl_seconds: int
    heartbeat_interval_seconds: int
    def __init__(self, worker: _Optional[str] = ..., credential: _Optional[str] = ..., lease_ttl_seconds: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker", "status")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    status: WorkerStatus
    def __init__(self, worker: _Optional[str] = ..., status: _Optional[_Union[WorkerStatus, _Mapping]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("environments", "images")
    ENVIRONMENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    environments: _containers.RepeatedScalarFieldContainer[str]
    images: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, environments: _Optional[_Iterable[str]] = ..., images: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_expire_time", "status_wanted")
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_WANTED_FIELD_NUMBER: _ClassVar[int]
    lease_expire_time: _timestamp_pb2.Timestamp
    status_wanted: bool
    def __init__(self, lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status_wanted: _Optional[bool] = ...) -> None: ...

class StreamInstructionsRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: str
    def __init__(self, worker: _Optional[str] = ...) -> None: ...

class Instruction(_message.Message):
    __slots__ = ("reconcile", "assignment", "cancellation", "reinstate", "curtail", "lease_renewed")
    RECONCILE_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    CANCELLATION_FIELD_NUMBER: _ClassVar[int]
    REINSTATE_FIELD_NUMBER: _ClassVar[int]
    CURTAIL_FIELD_NUMBER: _ClassVar[int]
    LEASE_RENEWED_FIELD_NUMBER: _ClassVar[int]
    reconcile: Reconcile
    assignment: Assignment
    cancellation: Cancellation
    reinstate: Reinstate
    curtail: Curtail
    lease_renewed: LeaseRenewed
    def __init__(self, reconcile: _Optional[_Union[Reconcile, _Mapping]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., cancellation: _Optional[_Union[Cancellation, _Mapping]] = ..., reinstate: _Optional[_Union[Reinstate, _Mapping]] = ..., curtail: _Optional[_Union[Curtail, _Mapping]] = ..., lease_renewed: _Optional[_Union[LeaseRenewed, _Mapping]] = ...) -> None: ...

class Reconcile(_message.Message):
    __slots__ = ("assignments", "curtail")
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    CURTAIL_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    curtail: Curtail
    def __init__(self, assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., curtail: _Optional[_Union[Curtail, _Mapping]] = ...) -> None: ...

class Curtail(_message.Message):
    __slots__ = ("active", "end_time", "reason")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    active: bool
    end_time: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, active: _Optional[bool] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("job", "attempt", "spec", "gpu_indices", "checkpoint_sha256", "power_limit_watts")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    job: str
    attempt: int
    spec: AssignedSpec
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    checkpoint_sha256: str
    power_limit_watts: int
    def __init__(self, job: _Optional[str] = ..., attempt: _Optional[int] = ..., spec: _Optional[_Union[AssignedSpec, _Mapping]] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., checkpoint_sha256: _Optional[str] = ..., power_limit_watts: _Optional[int] = ...) -> None: ...

class AssignedSpec(_message.Message):
    __slots__ = ("command", "env", "working_dir_sha256", "max_duration_seconds", "python_requirements", "requirements_sha256", "inputs", "max_output_bytes", "image", "registry_auth")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_SHA256_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PYTHON_REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_AUTH_FIELD_NUMBER: _ClassVar[int]
    command: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    working_dir_sha256: str
    max_duration_seconds: int
    python_requirements: str
    requirements_sha256: str
    inputs: _containers.ScalarMap[str, str]
    max_output_bytes: int
    image: str
    registry_auth: bytes
    def __init__(self, command: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., working_dir_sha256: _Optional[str] = ..., max_duration_seconds: _Optional[int] = ..., python_requirements: _Optional[str] = ..., requirements_sha256: _Optional[str] = ..., inputs: _Optional[_Mapping[str, str]] = ..., max_output_bytes: _Optional[int] = ..., image: _Optional[str] = ..., registry_auth: _Optional[bytes] = ...) -> None: ...

class Reinstate(_message.Message):
    __slots__ = ("gpu_index", "requested_by")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    requested_by: str
    def __init__(self, gpu_index: _Optional[int] = ..., requested_by: _Optional[str] = ...) -> None: ...

class Cancellation(_message.Message):
    __slots__ = ("job", "attempt", "reason")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job: str
    attempt: int
    reason: str
    def __init__(self, job: _Optional[str] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportJobEventsRequest(_message.Message):
    __slots__ = ("worker", "events")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    events: _containers.RepeatedCompositeFieldContainer[JobEvent]
    def __init__(self, worker: _Optional[str] = ..., events: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job", "attempt", "sequence", "time", "started", "log", "progress", "finished", "checkpoint", "preparing", "output")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PREPARING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    job: str
    attempt: int
    sequence: int
    time: _timestamp_pb2.Timestamp
    started: Started
    log: LogOutput
    progress: Progress
    finished: Finished
    checkpoint: Checkpointed
    preparing: Preparing
    output: OutputUploaded
    def __init__(self, job: _Optional[str] = ..., attempt: _Optional[int] = ..., sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., log: _Optional[_Union[LogOutput, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpointed, _Mapping]] = ..., preparing: _Optional[_Union[Preparing, _Mapping]] = ..., output: _Optional[_Union[OutputUploaded, _Mapping]] = ...) -> None: ...

class Preparing(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OutputUploaded(_message.Message):
    __slots__ = ("sha256", "size_bytes", "over_limit", "message")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    over_limit: bool
    message: str
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., over_limit: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class Checkpointed(_message.Message):
    __slots__ = ("sha256", "size_bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("setup_milliseconds",)
    SETUP_MILLISECONDS_FIELD_NUMBER: _ClassVar[int]
    setup_milliseconds: int
    def __init__(self, setup_milliseconds: _Optional[int] = ...) -> None: ...

class LogOutput(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: str
    def __init__(self, data: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("energy_joules",)
    ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    energy_joules: int
    def __init__(self, energy_joules: _Optional[int] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("exit_code", "energy_joules", "message", "cause", "setup_milliseconds")
    class Cause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CAUSE_UNSPECIFIED: _ClassVar[Finished.Cause]
        SETUP_CLIENT: _ClassVar[Finished.Cause]
        SETUP_RIG: _ClassVar[Finished.Cause]
    CAUSE_UNSPECIFIED: Finished.Cause
    SETUP_CLIENT: Finished.Cause
    SETUP_RIG: Finished.Cause
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    SETUP_MILLISECONDS_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    energy_joules: int
    message: str
    cause: Finished.Cause
    setup_milliseconds: int
    def __init__(self, exit_code: _Optional[int] = ..., energy_joules: _Optional[int] = ..., message: _Optional[str] = ..., cause: _Optional[_Union[Finished.Cause, str]] = ..., setup_milliseconds: _Optional[int] = ...) -> None: ...

class ReportJobEventsResponse(_message.Message):
    __slots__ = ("applied", "stale")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    applied: int
    stale: _containers.RepeatedCompositeFieldContainer[Cancellation]
    def __init__(self, applied: _Optional[int] = ..., stale: _Optional[_Iterable[_Union[Cancellation, _Mapping]]] = ...) -> None: ...
