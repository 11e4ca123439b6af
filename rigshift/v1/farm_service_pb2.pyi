import datetime

from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from rigshift.v1 import farm_pb2 as _farm_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateCurtailmentRequest(_message.Message):
    __slots__ = ("farm", "start_time", "duration_seconds", "reason", "include_guaranteed")
    FARM_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GUARANTEED_FIELD_NUMBER: _ClassVar[int]
    farm: str
    start_time: _timestamp_pb2.Timestamp
    duration_seconds: int
    reason: str
    include_guaranteed: bool
    def __init__(self, farm: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_seconds: _Optional[int] = ..., reason: _Optional[str] = ..., include_guaranteed: _Optional[bool] = ...) -> None: ...

class ListCurtailmentsRequest(_message.Message):
    __slots__ = ("farm", "include_past")
    FARM_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PAST_FIELD_NUMBER: _ClassVar[int]
    farm: str
    include_past: bool
    def __init__(self, farm: _Optional[str] = ..., include_past: _Optional[bool] = ...) -> None: ...

class ListCurtailmentsResponse(_message.Message):
    __slots__ = ("curtailments",)
    CURTAILMENTS_FIELD_NUMBER: _ClassVar[int]
    curtailments: _containers.RepeatedCompositeFieldContainer[_farm_pb2.Curtailment]
    def __init__(self, curtailments: _Optional[_Iterable[_Union[_farm_pb2.Curtailment, _Mapping]]] = ...) -> None: ...

class CancelCurtailmentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReinstateGpuRequest(_message.Message):
    __slots__ = ("worker", "gpu_index")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    worker: str
    gpu_index: int
    def __init__(self, worker: _Optional[str] = ..., gpu_index: _Optional[int] = ...) -> None: ...

class UpdateFarmRequest(_message.Message):
    __slots__ = ("farm", "update_mask")
    FARM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    farm: _farm_pb2.Farm
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, farm: _Optional[_Union[_farm_pb2.Farm, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class GetEarningsRequest(_message.Message):
    __slots__ = ("parent", "since", "group_by")
    class GroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        GROUP_BY_UNSPECIFIED: _ClassVar[GetEarningsRequest.GroupBy]
        FARM: _ClassVar[GetEarningsRequest.GroupBy]
        WORKER: _ClassVar[GetEarningsRequest.GroupBy]
        GPU: _ClassVar[GetEarningsRequest.GroupBy]
    GROUP_BY_UNSPECIFIED: GetEarningsRequest.GroupBy
    FARM: GetEarningsRequest.GroupBy
    WORKER: GetEarningsRequest.GroupBy
    GPU: GetEarningsRequest.GroupBy
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    parent: str
    since: _timestamp_pb2.Timestamp
    group_by: GetEarningsRequest.GroupBy
    def __init__(self, parent: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Union[GetEarningsRequest.GroupBy, str]] = ...) -> None: ...

class EarningsRow(_message.Message):
    __slots__ = ("key", "farm", "gpu_model", "gpu_milliseconds", "energy_joules", "kwh", "revenue_micros", "energy_cost_micros", "margin_micros", "revenue_usd_per_kwh", "mining_usd_per_kwh", "attempts", "farm_display_name", "energy_saved_joules", "energy_cost_saved_micros", "curtailed_gpu_milliseconds", "curtailed_energy_joules", "demand_response_micros")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FARM_FIELD_NUMBER: _ClassVar[int]
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_MILLISECONDS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    KWH_FIELD_NUMBER: _ClassVar[int]
    REVENUE_MICROS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_MICROS_FIELD_NUMBER: _ClassVar[int]
    REVENUE_USD_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    MINING_USD_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FARM_DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SAVED_JOULES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_COST_SAVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    CURTAILED_GPU_MILLISECONDS_FIELD_NUMBER: _ClassVar[int]
    CURTAILED_ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    DEMAND_RESPONSE_MICROS_FIELD_NUMBER: _ClassVar[int]
    key: str
    farm: str
    gpu_model: str
    gpu_milliseconds: int
    energy_joules: int
    kwh: float
    revenue_micros: int
    energy_cost_micros: int
    margin_micros: int
    revenue_usd_per_kwh: float
    mining_usd_per_kwh: float
    attempts: int
    farm_display_name: str
    energy_saved_joules: int
    energy_cost_saved_micros: int
    curtailed_gpu_milliseconds: int
    curtailed_energy_joules: int
    demand_response_micros: int
    def __init__(self, key: _Optional[str] = ..., farm: _Optional[str] = ..., gpu_model: _Optional[str] = ..., gpu_milliseconds: _Optional[int] = ..., energy_joules: _Optional[int] = ..., kwh: _Optional[float] = ..., revenue_micros: _Optional[int] = ..., energy_cost_micros: _Optional[int] = ..., margin_micros: _Optional[int] = ..., revenue_usd_per_kwh: _Optional[float] = ..., mining_usd_per_kwh: _Optional[float] = ..., attempts: _Optional[int] = ..., farm_display_name: _Optional[str] = ..., energy_saved_joules: _Optional[int] = ..., energy_cost_saved_micros: _Optional[int] = ..., curtailed_gpu_milliseconds: _Optional[int] = ..., curtailed_energy_joules: _Optional[int] = ..., demand_response_micros: _Optional[int] = ...) -> None: ...

class GetEarningsResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[EarningsRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[EarningsRow, _Mapping]]] = ...) -> None: ...

class CreateFarmRequest(_message.Message):
    __slots__ = ("farm",)
    FARM_FIELD_NUMBER: _ClassVar[int]
    farm: _farm_pb2.Farm
    def __init__(self, farm: _Optional[_Union[_farm_pb2.Farm, _Mapping]] = ...) -> None: ...

class GetFarmRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "next_page_token")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[_farm_pb2.Worker]
    next_page_token: str
    def __init__(self, workers: _Optional[_Iterable[_Union[_farm_pb2.Worker, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
