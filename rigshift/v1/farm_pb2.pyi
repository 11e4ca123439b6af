import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PowerPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POWER_POLICY_UNSPECIFIED: _ClassVar[PowerPolicy]
    POWER_POLICY_MAX: _ClassVar[PowerPolicy]
    POWER_POLICY_EFFICIENT: _ClassVar[PowerPolicy]
POWER_POLICY_UNSPECIFIED: PowerPolicy
POWER_POLICY_MAX: PowerPolicy
POWER_POLICY_EFFICIENT: PowerPolicy

class Farm(_message.Message):
    __slots__ = ("name", "display_name", "region", "tariff_micros_per_kwh", "pue_permille", "enrollment_token", "create_time", "mining_micros_per_kwh", "ask_micros_per_gpu_hour", "broker_fee_permille", "margin_micros_per_gpu_hour", "tariff_windows", "floors", "power_policy", "max_slowdown_percent", "demand_response_micros_per_mwh")
    class MiningMicrosPerKwhEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class AskMicrosPerGpuHourEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    TARIFF_MICROS_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    PUE_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MINING_MICROS_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    ASK_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    BROKER_FEE_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    TARIFF_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    FLOORS_FIELD_NUMBER: _ClassVar[int]
    POWER_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_SLOWDOWN_PERCENT_FIELD_NUMBER: _ClassVar[int]
    DEMAND_RESPONSE_MICROS_PER_MWH_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    region: str
    tariff_micros_per_kwh: int
    pue_permille: int
    enrollment_token: str
    create_time: _timestamp_pb2.Timestamp
    mining_micros_per_kwh: _containers.ScalarMap[str, int]
    ask_micros_per_gpu_hour: _containers.ScalarMap[str, int]
    broker_fee_permille: int
    margin_micros_per_gpu_hour: int
    tariff_windows: _containers.RepeatedCompositeFieldContainer[TariffWindow]
    floors: _containers.RepeatedCompositeFieldContainer[PriceFloor]
    power_policy: PowerPolicy
    max_slowdown_percent: int
    demand_response_micros_per_mwh: int
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., region: _Optional[str] = ..., tariff_micros_per_kwh: _Optional[int] = ..., pue_permille: _Optional[int] = ..., enrollment_token: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mining_micros_per_kwh: _Optional[_Mapping[str, int]] = ..., ask_micros_per_gpu_hour: _Optional[_Mapping[str, int]] = ..., broker_fee_permille: _Optional[int] = ..., margin_micros_per_gpu_hour: _Optional[int] = ..., tariff_windows: _Optional[_Iterable[_Union[TariffWindow, _Mapping]]] = ..., floors: _Optional[_Iterable[_Union[PriceFloor, _Mapping]]] = ..., power_policy: _Optional[_Union[PowerPolicy, str]] = ..., max_slowdown_percent: _Optional[int] = ..., demand_response_micros_per_mwh: _Optional[int] = ...) -> None: ...

class PowerPoint(_message.Message):
    __slots__ = ("limit_watts", "fp16_gflops", "draw_watts")
    LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    FP16_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    DRAW_WATTS_FIELD_NUMBER: _ClassVar[int]
    limit_watts: int
    fp16_gflops: int
    draw_watts: int
    def __init__(self, limit_watts: _Optional[int] = ..., fp16_gflops: _Optional[int] = ..., draw_watts: _Optional[int] = ...) -> None: ...

class Curtailment(_message.Message):
    __slots__ = ("name", "start_time", "end_time", "reason", "include_guaranteed", "state", "create_time", "created_by")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Curtailment.State]
        SCHEDULED: _ClassVar[Curtailment.State]
        ACTIVE: _ClassVar[Curtailment.State]
        ENDED: _ClassVar[Curtailment.State]
        CANCELLED: _ClassVar[Curtailment.State]
    STATE_UNSPECIFIED: Curtailment.State
    SCHEDULED: Curtailment.State
    ACTIVE: Curtailment.State
    ENDED: Curtailment.State
    CANCELLED: Curtailment.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GUARANTEED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    name: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    reason: str
    include_guaranteed: bool
    state: Curtailment.State
    create_time: _timestamp_pb2.Timestamp
    created_by: str
    def __init__(self, name: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., include_guaranteed: _Optional[bool] = ..., state: _Optional[_Union[Curtailment.State, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ...) -> None: ...

class TariffWindow(_message.Message):
    __slots__ = ("start_hour", "end_hour", "micros_per_kwh")
    START_HOUR_FIELD_NUMBER: _ClassVar[int]
    END_HOUR_FIELD_NUMBER: _ClassVar[int]
    MICROS_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    start_hour: int
    end_hour: int
    micros_per_kwh: int
    def __init__(self, start_hour: _Optional[int] = ..., end_hour: _Optional[int] = ..., micros_per_kwh: _Optional[int] = ...) -> None: ...

class PriceFloor(_message.Message):
    __slots__ = ("gpu_model", "watts", "energy_cost_micros_per_gpu_hour", "mining_micros_per_gpu_hour", "floor_micros_per_gpu_hour")
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    WATTS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_COST_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    MINING_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    FLOOR_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    gpu_model: str
    watts: int
    energy_cost_micros_per_gpu_hour: int
    mining_micros_per_gpu_hour: int
    floor_micros_per_gpu_hour: int
    def __init__(self, gpu_model: _Optional[str] = ..., watts: _Optional[int] = ..., energy_cost_micros_per_gpu_hour: _Optional[int] = ..., mining_micros_per_gpu_hour: _Optional[int] = ..., floor_micros_per_gpu_hour: _Optional[int] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("name", "farm", "hostname", "agent_version", "state", "last_heartbeat_time", "gpus", "metrics_address", "reliability_permille", "container_runtime", "host")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Worker.State]
        ONLINE: _ClassVar[Worker.State]
        DRAINING: _ClassVar[Worker.State]
        OFFLINE: _ClassVar[Worker.State]
    STATE_UNSPECIFIED: Worker.State
    ONLINE: Worker.State
    DRAINING: Worker.State
    OFFLINE: Worker.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    FARM_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RELIABILITY_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_RUNTIME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    name: str
    farm: str
    hostname: str
    agent_version: str
    state: Worker.State
    last_heartbeat_time: _timestamp_pb2.Timestamp
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    metrics_address: str
    reliability_permille: int
    container_runtime: ContainerRuntime
    host: HostInfo
    def __init__(self, name: _Optional[str] = ..., farm: _Optional[str] = ..., hostname: _Optional[str] = ..., agent_version: _Optional[str] = ..., state: _Optional[_Union[Worker.State, str]] = ..., last_heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., metrics_address: _Optional[str] = ..., reliability_permille: _Optional[int] = ..., container_runtime: _Optional[_Union[ContainerRuntime, _Mapping]] = ..., host: _Optional[_Union[HostInfo, _Mapping]] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("ram_mb", "cpu_cores", "disk_write_mbps")
    RAM_MB_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    DISK_WRITE_MBPS_FIELD_NUMBER: _ClassVar[int]
    ram_mb: int
    cpu_cores: int
    disk_write_mbps: int
    def __init__(self, ram_mb: _Optional[int] = ..., cpu_cores: _Optional[int] = ..., disk_write_mbps: _Optional[int] = ...) -> None: ...

class GpuMeasurement(_message.Message):
    __slots__ = ("fp16_gflops", "fp32_gflops", "usable_vram_mb", "h2d_mbps", "d2h_mbps", "method", "error", "measure_time", "duration_ms")
    FP16_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    FP32_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    USABLE_VRAM_MB_FIELD_NUMBER: _ClassVar[int]
    H2D_MBPS_FIELD_NUMBER: _ClassVar[int]
    D2H_MBPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MEASURE_TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    fp16_gflops: int
    fp32_gflops: int
    usable_vram_mb: int
    h2d_mbps: int
    d2h_mbps: int
    method: str
    error: str
    measure_time: _timestamp_pb2.Timestamp
    duration_ms: int
    def __init__(self, fp16_gflops: _Optional[int] = ..., fp32_gflops: _Optional[int] = ..., usable_vram_mb: _Optional[int] = ..., h2d_mbps: _Optional[int] = ..., d2h_mbps: _Optional[int] = ..., method: _Optional[str] = ..., error: _Optional[str] = ..., measure_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_ms: _Optional[int] = ...) -> None: ...

class ContainerRuntime(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "uuid", "model", "vram_mb", "power_limit_watts", "state", "price_micros_per_gpu_hour", "job", "pcie_link_width", "quarantine_reason", "quarantine_time", "reinstate_required", "verification", "verification_reason", "score", "pcie_generation", "measurement", "power_curve", "ai_power_limit_watts")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Gpu.State]
        IDLE: _ClassVar[Gpu.State]
        LEASED: _ClassVar[Gpu.State]
        MINING: _ClassVar[Gpu.State]
        QUARANTINED: _ClassVar[Gpu.State]
    STATE_UNSPECIFIED: Gpu.State
    IDLE: Gpu.State
    LEASED: Gpu.State
    MINING: Gpu.State
    QUARANTINED: Gpu.State
    class Verification(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VERIFICATION_UNSPECIFIED: _ClassVar[Gpu.Verification]
        PENDING: _ClassVar[Gpu.Verification]
        VERIFIED: _ClassVar[Gpu.Verification]
        UNVERIFIED: _ClassVar[Gpu.Verification]
    VERIFICATION_UNSPECIFIED: Gpu.Verification
    PENDING: Gpu.Verification
    VERIFIED: Gpu.Verification
    UNVERIFIED: Gpu.Verification
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VRAM_MB_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRICE_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PCIE_LINK_WIDTH_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_REASON_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_TIME_FIELD_NUMBER: _ClassVar[int]
    REINSTATE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_REASON_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PCIE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENT_FIELD_NUMBER: _ClassVar[int]
    POWER_CURVE_FIELD_NUMBER: _ClassVar[int]
    AI_POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    model: str
    vram_mb: int
    power_limit_watts: int
    state: Gpu.State
    price_micros_per_gpu_hour: int
    job: str
    pcie_link_width: int
    quarantine_reason: str
    quarantine_time: _timestamp_pb2.Timestamp
    reinstate_required: bool
    verification: Gpu.Verification
    verification_reason: str
    score: int
    pcie_generation: int
    measurement: GpuMeasurement
    power_curve: _containers.RepeatedCompositeFieldContainer[PowerPoint]
    ai_power_limit_watts: int
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., model: _Optional[str] = ..., vram_mb: _Optional[int] = ..., power_limit_watts: _Optional[int] = ..., state: _Optional[_Union[Gpu.State, str]] = ..., price_micros_per_gpu_hour: _Optional[int] = ..., job: _Optional[str] = ..., pcie_link_width: _Optional[int] = ..., quarantine_reason: _Optional[str] = ..., quarantine_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reinstate_required: _Optional[bool] = ..., verification: _Optional[_Union[Gpu.Verification, str]] = ..., verification_reason: _Optional[str] = ..., score: _Optional[int] = ..., pcie_generation: _Optional[int] = ..., measurement: _Optional[_Union[GpuMeasurement, _Mapping]] = ..., power_curve: _Optional[_Iterable[_Union[PowerPoint, _Mapping]]] = ..., ai_power_limit_watts: _Optional[int] = ...) -> None: ...
