from rigshift.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListJobOutputsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListJobOutputsResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[_job_pb2.JobOutput]
    def __init__(self, outputs: _Optional[_Iterable[_Union[_job_pb2.JobOutput, _Mapping]]] = ...) -> None: ...

class DownloadJobOutputRequest(_message.Message):
    __slots__ = ("name", "attempt", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    attempt: int
    offset: int
    def __init__(self, name: _Optional[str] = ..., attempt: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class DownloadJobOutputResponse(_message.Message):
    __slots__ = ("data", "sha256", "size_bytes", "attempt")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sha256: str
    size_bytes: int
    attempt: int
    def __init__(self, data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class QuoteJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _job_pb2.JobSpec
    def __init__(self, spec: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ...) -> None: ...

class QuoteJobResponse(_message.Message):
    __slots__ = ("matching_gpus", "free_matching_gpus", "min_price_micros_per_gpu_hour", "max_price_micros_per_gpu_hour", "placeable_now", "reasons", "groups")
    MATCHING_GPUS_FIELD_NUMBER: _ClassVar[int]
    FREE_MATCHING_GPUS_FIELD_NUMBER: _ClassVar[int]
    MIN_PRICE_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    PLACEABLE_NOW_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    matching_gpus: int
    free_matching_gpus: int
    min_price_micros_per_gpu_hour: int
    max_price_micros_per_gpu_hour: int
    placeable_now: bool
    reasons: _containers.RepeatedCompositeFieldContainer[_job_pb2.SchedulingReason]
    groups: _containers.RepeatedCompositeFieldContainer[QuoteGroup]
    def __init__(self, matching_gpus: _Optional[int] = ..., free_matching_gpus: _Optional[int] = ..., min_price_micros_per_gpu_hour: _Optional[int] = ..., max_price_micros_per_gpu_hour: _Optional[int] = ..., placeable_now: _Optional[bool] = ..., reasons: _Optional[_Iterable[_Union[_job_pb2.SchedulingReason, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[QuoteGroup, _Mapping]]] = ...) -> None: ...

class QuoteGroup(_message.Message):
    __slots__ = ("gpu_model", "vram_mb", "ask_micros_per_gpu_hour", "gpus", "free_gpus", "verified", "score", "pcie_gbps", "host_ram_gb_per_gpu", "cpu_cores_per_gpu")
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    VRAM_MB_FIELD_NUMBER: _ClassVar[int]
    ASK_MICROS_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    FREE_GPUS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PCIE_GBPS_FIELD_NUMBER: _ClassVar[int]
    HOST_RAM_GB_PER_GPU_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_PER_GPU_FIELD_NUMBER: _ClassVar[int]
    gpu_model: str
    vram_mb: int
    ask_micros_per_gpu_hour: int
    gpus: int
    free_gpus: int
    verified: bool
    score: int
    pcie_gbps: float
    host_ram_gb_per_gpu: int
    cpu_cores_per_gpu: float
    def __init__(self, gpu_model: _Optional[str] = ..., vram_mb: _Optional[int] = ..., ask_micros_per_gpu_hour: _Optional[int] = ..., gpus: _Optional[int] = ..., free_gpus: _Optional[int] = ..., verified: _Optional[bool] = ..., score: _Optional[int] = ..., pcie_gbps: _Optional[float] = ..., host_ram_gb_per_gpu: _Optional[int] = ..., cpu_cores_per_gpu: _Optional[float] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("spec", "request_id", "registry_auth")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_AUTH_FIELD_NUMBER: _ClassVar[int]
    spec: _job_pb2.JobSpec
    request_id: str
    registry_auth: bytes
    def __init__(self, spec: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., request_id: _Optional[str] = ..., registry_auth: _Optional[bytes] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_job_pb2.Job.State]
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[_job_pb2.Job.State, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_job_pb2.Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[_job_pb2.Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StreamJobLogsRequest(_message.Message):
    __slots__ = ("name", "follow")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    follow: bool
    def __init__(self, name: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("attempt", "data")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    data: str
    def __init__(self, attempt: _Optional[int] = ..., data: _Optional[str] = ...) -> None: ...
