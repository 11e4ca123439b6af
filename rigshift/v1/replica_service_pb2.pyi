import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from rigshift.v1 import worker_service_pb2 as _worker_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RenewLeasesRequest(_message.Message):
    __slots__ = ("replica", "renewals")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    RENEWALS_FIELD_NUMBER: _ClassVar[int]
    replica: str
    renewals: _containers.RepeatedCompositeFieldContainer[LeaseRenewal]
    def __init__(self, replica: _Optional[str] = ..., renewals: _Optional[_Iterable[_Union[LeaseRenewal, _Mapping]]] = ...) -> None: ...

class LeaseRenewal(_message.Message):
    __slots__ = ("worker_id", "status")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    status: _worker_service_pb2.WorkerStatus
    def __init__(self, worker_id: _Optional[str] = ..., status: _Optional[_Union[_worker_service_pb2.WorkerStatus, _Mapping]] = ...) -> None: ...

class RenewLeasesResponse(_message.Message):
    __slots__ = ("leases", "lease_ttl_seconds")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseState]
    lease_ttl_seconds: int
    def __init__(self, leases: _Optional[_Iterable[_Union[LeaseState, _Mapping]]] = ..., lease_ttl_seconds: _Optional[int] = ...) -> None: ...

class LeaseState(_message.Message):
    __slots__ = ("worker_id", "lease_expire_time", "status_wanted", "unknown")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_WANTED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_expire_time: _timestamp_pb2.Timestamp
    status_wanted: bool
    unknown: bool
    def __init__(self, worker_id: _Optional[str] = ..., lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status_wanted: _Optional[bool] = ..., unknown: _Optional[bool] = ...) -> None: ...
