import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Farm(_message.Message):
    __slots__ = ("name", "display_name", "region", "tariff_micros_per_kwh", "pue_permille", "enrollment_token", "create_time", "mining_micros_per_kwh", "ask_micros_per_gpu_hour", "broker_fee_permille", "margin_micros_per_gpu_hour", "tariff_windows", "floors")
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
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., region: _Optional[str] = ..., tariff_micros_per_kwh: _Optional[int] = ..., pue_permille: _Optional[int] = ..., enrollment_token: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mining_micros_per_kwh: _Optional[_Mapping[str, int]] = ..., ask_micros_per_gpu_hour: _Optional[_Mapping[str, int]] = ..., broker_fee_permille: _Optional[int] = ..., margin_micros_per_gpu_hour: _Optional[int] = ..., tariff_windows: _Optional[_Iterable[_Union[TariffWindow, _Mapping]]] = ..., floors: _Optional[_Iterable[_Union[PriceFloor, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("name", "farm", "hostname", "agent_version", "state", "last_heartbeat_time", "gpus", "metrics_address", "reliability_permille", "container_runtime")
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
    def __init__(self, name: _Optional[str] = ..., farm: _Optional[str] = ..., hostname: _Optional[str] = ..., agent_version: _Optional[str] = ..., state: _Optional[_Union[Worker.State, str]] = ..., last_heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., metrics_address: _Optional[str] = ..., reliability_permille: _Optional[int] = ..., container_runtime: _Optional[_Union[ContainerRuntime, _Mapping]] = ...) -> None: ...

class ContainerRuntime(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "uuid", "model", "vram_mb", "power_limit_watts", "state", "price_micros_per_gpu_hour", "job", "pcie_link_width")
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
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VRAM_MB_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRICE_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PCIE_LINK_WIDTH_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    model: str
    vram_mb: int
    power_limit_watts: int
    state: Gpu.State
    price_micros_per_gpu_hour: int
    job: str
    pcie_link_width: int
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., model: _Optional[str] = ..., vram_mb: _Optional[int] = ..., power_limit_watts: _Optional[int] = ..., state: _Optional[_Union[Gpu.State, str]] = ..., price_micros_per_gpu_hour: _Optional[int] = ..., job: _Optional[str] = ..., pcie_link_width: _Optional[int] = ...) -> None: ...
