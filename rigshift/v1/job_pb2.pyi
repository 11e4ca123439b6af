import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    GUARANTEED: _ClassVar[Tier]
    SPOT: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
GUARANTEED: Tier
SPOT: Tier

class Job(_message.Message):
    __slots__ = ("name", "spec", "state", "owner", "create_time", "update_time", "attempt_count", "attempts", "pending_reasons", "status_message", "exit_code", "history", "request_id", "sla_events", "cost_micros", "credit_micros", "checkpoint_sha256", "checkpoint_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        PENDING: _ClassVar[Job.State]
        SCHEDULED: _ClassVar[Job.State]
        RUNNING: _ClassVar[Job.State]
        SUCCEEDED: _ClassVar[Job.State]
        FAILED: _ClassVar[Job.State]
        CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    PENDING: Job.State
    SCHEDULED: Job.State
    RUNNING: Job.State
    SUCCEEDED: Job.State
    FAILED: Job.State
    CANCELLED: Job.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PENDING_REASONS_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLA_EVENTS_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: JobSpec
    state: Job.State
    owner: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    attempt_count: int
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    pending_reasons: _containers.RepeatedCompositeFieldContainer[SchedulingReason]
    status_message: str
    exit_code: int
    history: _containers.RepeatedCompositeFieldContainer[StateTransition]
    request_id: str
    sla_events: _containers.RepeatedCompositeFieldContainer[SlaEvent]
    cost_micros: int
    credit_micros: int
    checkpoint_sha256: str
    checkpoint_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[Job.State, str]] = ..., owner: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt_count: _Optional[int] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., pending_reasons: _Optional[_Iterable[_Union[SchedulingReason, _Mapping]]] = ..., status_message: _Optional[str] = ..., exit_code: _Optional[int] = ..., history: _Optional[_Iterable[_Union[StateTransition, _Mapping]]] = ..., request_id: _Optional[str] = ..., sla_events: _Optional[_Iterable[_Union[SlaEvent, _Mapping]]] = ..., cost_micros: _Optional[int] = ..., credit_micros: _Optional[int] = ..., checkpoint_sha256: _Optional[str] = ..., checkpoint_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("command", "env", "gpu_count", "gpu_model", "min_vram_mb", "max_price_micros_per_gpu_hour", "max_duration_seconds", "working_dir_sha256", "max_attempts", "display_name", "tier", "environment", "inputs", "min_pcie_gbps", "min_host_ram_gb_per_gpu", "min_cpu_cores_per_gpu", "min_score", "allow_unverified")
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
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    MIN_VRAM_MB_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_SHA256_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MIN_PCIE_GBPS_FIELD_NUMBER: _ClassVar[int]
    MIN_HOST_RAM_GB_PER_GPU_FIELD_NUMBER: _ClassVar[int]
    MIN_CPU_CORES_PER_GPU_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UNVERIFIED_FIELD_NUMBER: _ClassVar[int]
    command: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    gpu_count: int
    gpu_model: str
    min_vram_mb: int
    max_price_micros_per_gpu_hour: int
    max_duration_seconds: int
    working_dir_sha256: str
    max_attempts: int
    display_name: str
    tier: Tier
    environment: Environment
    inputs: _containers.ScalarMap[str, str]
    min_pcie_gbps: float
    min_host_ram_gb_per_gpu: int
    min_cpu_cores_per_gpu: float
    min_score: int
    allow_unverified: bool
    def __init__(self, command: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., gpu_count: _Optional[int] = ..., gpu_model: _Optional[str] = ..., min_vram_mb: _Optional[int] = ..., max_price_micros_per_gpu_hour: _Optional[int] = ..., max_duration_seconds: _Optional[int] = ..., working_dir_sha256: _Optional[str] = ..., max_attempts: _Optional[int] = ..., display_name: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., environment: _Optional[_Union[Environment, _Mapping]] = ..., inputs: _Optional[_Mapping[str, str]] = ..., min_pcie_gbps: _Optional[float] = ..., min_host_ram_gb_per_gpu: _Optional[int] = ..., min_cpu_cores_per_gpu: _Optional[float] = ..., min_score: _Optional[int] = ..., allow_unverified: _Optional[bool] = ...) -> None: ...

class Environment(_message.Message):
    __slots__ = ("python_requirements", "requirements_sha256", "image")
    PYTHON_REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    python_requirements: str
    requirements_sha256: str
    image: str
    def __init__(self, python_requirements: _Optional[str] = ..., requirements_sha256: _Optional[str] = ..., image: _Optional[str] = ...) -> None: ...

class JobOutput(_message.Message):
    __slots__ = ("attempt", "sha256", "size_bytes", "create_time", "over_limit", "message")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    OVER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    sha256: str
    size_bytes: int
    create_time: _timestamp_pb2.Timestamp
    over_limit: bool
    message: str
    def __init__(self, attempt: _Optional[int] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., over_limit: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("number", "worker", "gpu_indices", "state", "start_time", "end_time", "exit_code", "energy_joules", "gpu_milliseconds", "price_micros_per_gpu_hour", "schedule_time", "charge_micros", "setup_milliseconds", "message")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Attempt.State]
        SCHEDULED: _ClassVar[Attempt.State]
        RUNNING: _ClassVar[Attempt.State]
        SUCCEEDED: _ClassVar[Attempt.State]
        FAILED: _ClassVar[Attempt.State]
        CANCELLED: _ClassVar[Attempt.State]
        LOST: _ClassVar[Attempt.State]
        PREEMPTED: _ClassVar[Attempt.State]
        PREPARING: _ClassVar[Attempt.State]
    STATE_UNSPECIFIED: Attempt.State
    SCHEDULED: Attempt.State
    RUNNING: Attempt.State
    SUCCEEDED: Attempt.State
    FAILED: Attempt.State
    CANCELLED: Attempt.State
    LOST: Attempt.State
    PREEMPTED: Attempt.State
    PREPARING: Attempt.State
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    GPU_MILLISECONDS_FIELD_NUMBER: _ClassVar[int]
    PRICE_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_TIME_FIELD_NUMBER: _ClassVar[int]
    CHARGE_MICROS_FIELD_NUMBER: _ClassVar[int]
    SETUP_MILLISECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    number: int
    worker: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    state: Attempt.State
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    exit_code: int
    energy_joules: int
    gpu_milliseconds: int
    price_micros_per_gpu_hour: int
    schedule_time: _timestamp_pb2.Timestamp
    charge_micros: int
    setup_milliseconds: int
    message: str
    def __init__(self, number: _Optional[int] = ..., worker: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., state: _Optional[_Union[Attempt.State, str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exit_code: _Optional[int] = ..., energy_joules: _Optional[int] = ..., gpu_milliseconds: _Optional[int] = ..., price_micros_per_gpu_hour: _Optional[int] = ..., schedule_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., charge_micros: _Optional[int] = ..., setup_milliseconds: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SlaEvent(_message.Message):
    __slots__ = ("kind", "time", "attempt", "seconds", "credit_micros", "detail")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[SlaEvent.Kind]
        START_DEADLINE_MISSED: _ClassVar[SlaEvent.Kind]
        INTERRUPTION: _ClassVar[SlaEvent.Kind]
        LOST_WORK: _ClassVar[SlaEvent.Kind]
        HEARTBEAT_GAP: _ClassVar[SlaEvent.Kind]
        CURTAILED: _ClassVar[SlaEvent.Kind]
    KIND_UNSPECIFIED: SlaEvent.Kind
    START_DEADLINE_MISSED: SlaEvent.Kind
    INTERRUPTION: SlaEvent.Kind
    LOST_WORK: SlaEvent.Kind
    HEARTBEAT_GAP: SlaEvent.Kind
    CURTAILED: SlaEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: SlaEvent.Kind
    time: _timestamp_pb2.Timestamp
    attempt: int
    seconds: int
    credit_micros: int
    detail: str
    def __init__(self, kind: _Optional[_Union[SlaEvent.Kind, str]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ..., seconds: _Optional[int] = ..., credit_micros: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class SchedulingReason(_message.Message):
    __slots__ = ("resource", "requested", "available", "resolvable", "message")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    RESOLVABLE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    resource: str
    requested: str
    available: str
    resolvable: bool
    message: str
    def __init__(self, resource: _Optional[str] = ..., requested: _Optional[str] = ..., available: _Optional[str] = ..., resolvable: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class StateTransition(_message.Message):
    __slots__ = ("from_state", "to_state", "time", "reason")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    from_state: Job.State
    to_state: Job.State
    time: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, from_state: _Optional[_Union[Job.State, str]] = ..., to_state: _Optional[_Union[Job.State, str]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...
