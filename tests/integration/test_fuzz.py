"""Hypothesis fuzzing of every RPC with arbitrary field values (and raw garbage bytes).

The broker must answer every request with a status other than INTERNAL/UNKNOWN,
never crash, and keep serving a well-behaved caller in between.
"""

from __future__ import annotations

import grpc
import pytest
from broker_harness import start_broker
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_agent import ProtocolAgent, create_farm, gpus

from rigshift.credentials import lookup_api_key
from rigshift.v1 import (
    admin_service_pb2,
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    farm_service_pb2,
    job_service_pb2,
    worker_service_pb2,
)

SERVICES = [
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"],
    farm_service_pb2.DESCRIPTOR.services_by_name["FarmService"],
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"],
    artifact_service_pb2.DESCRIPTOR.services_by_name["ArtifactService"],
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
]
METHODS = [(s, m) for s in SERVICES for m in s.methods]
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
EXAMPLES = 25

_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "jobs/", "jobs/x", "farms/-", "workers/../x", "\x00", "a" * 5000]),
)
_ints = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 1, 2**31 - 1]))
_int64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 1, 2**63 - 1]))


def _scalar(field):
    t = field.type
    if t == F.TYPE_STRING:
        return _text
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return _int64
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32)
    if t == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), _ints)
    return _ints


def message(descriptor, depth: int = 0):
    """A strategy of arbitrary messages of this type (nested up to 3 levels)."""
    fields = {}
    for field in descriptor.fields:
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                key = _scalar(field.message_type.fields_by_name["key"])
                value_field = field.message_type.fields_by_name["value"]
                fields[field.name] = st.dictionaries(key, _scalar(value_field), max_size=3)
                continue
            if depth >= 3 or field.message_type.full_name.startswith("google.protobuf"):
                continue
            sub = message(field.message_type, depth + 1)
            repeated = field.is_repeated
            fields[field.name] = st.lists(sub, max_size=3) if repeated else st.none() | sub
            continue
        strategy = _scalar(field)
        if field.is_repeated:
            strategy = st.lists(strategy, max_size=4)
        fields[field.name] = strategy
    cls = _class(descriptor)

    def build(values):
        msg = cls()
        for name, value in values.items():
            if value is None:
                continue
            target = getattr(msg, name)
            try:
                if isinstance(value, dict):
                    target.update(value)
                elif isinstance(value, list):
                    target.extend(value)
                elif hasattr(target, "CopyFrom"):
                    target.CopyFrom(value)
                else:
                    setattr(msg, name, value)
            except (ValueError, TypeError):
                pass  # a value the Python runtime itself refuses to put on the wire
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


def _class(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    rb = start_broker(tmp_path_factory.mktemp("fuzz"))
    farm = create_farm(rb.address)
    agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(2))
    agent.register()
    yield rb, agent
    agent.close()
    rb.stop()


def _invoke(channel, service, method, request, metadata):
    path = f"/{service.full_name}/{method.name}"
    out = _class(method.output_type)
    kwargs = dict(
        request_serializer=lambda m: m.SerializeToString(), response_deserializer=out.FromString
    )
    if method.client_streaming:
        call = channel.stream_unary(path, **kwargs)
        return call(iter([request, request]), metadata=metadata, timeout=10)
    if method.server_streaming:
        call = channel.unary_stream(path, **kwargs)
        stream = call(request, metadata=metadata, timeout=2)
        for i, _ in enumerate(stream):
            if i > 3:
                stream.cancel()
                break
        return None
    return channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=10)


@pytest.mark.parametrize(
    ("service", "method"), METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS]
)
def test_rpc_never_answers_internal_or_unknown(broker, service, method):
    rb, agent = broker
    admin = (("authorization", f"Bearer {lookup_api_key(rb.address)}"),)
    worker = agent.metadata
    channel = grpc.insecure_channel(rb.address)
    seen = set()

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=message(method.input_type), who=st.sampled_from(["admin", "worker", "none"]))
    def fuzz(request, who):
        metadata = {"admin": admin, "worker": worker, "none": ()}[who]
        try:
            _invoke(channel, service, method, request, metadata)
            seen.add(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            seen.add(err.code())
            # A streaming call we stopped early, or one that outlived the fuzz timeout, is ours.
            if err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                return
            assert err.code() not in BAD, f"{method.full_name}: {err.code()} {err.details()}"

    fuzz()
    # Garbage bytes that are not a message at all.
    raw = channel.unary_unary(f"/{service.full_name}/{method.name}")
    if not method.client_streaming and not method.server_streaming:
        with pytest.raises(grpc.RpcError) as exc:
            who = worker if service.name == "WorkerService" else admin
            raw(b"\xff\xff\xff\xff\x0f", metadata=who, timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Still serving.
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    assert seen, "no request was sent"


@pytest.mark.parametrize("sha", ["", "\x00", "../../etc/passwd", "a" * 5000, "AB" * 32])
def test_download_of_a_malformed_artifact_name_is_invalid_argument(broker, sha):
    """Found by the fuzzer: odd names used to reach the filesystem and answer INTERNAL."""
    rb, _ = broker
    admin = (("authorization", f"Bearer {lookup_api_key(rb.address)}"),)
    with grpc.insecure_channel(rb.address) as ch:
        stub = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            list(
                stub.DownloadArtifact(
                    artifact_service_pb2.DownloadArtifactRequest(sha256=sha), metadata=admin
                )
            )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
