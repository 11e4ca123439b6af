"""FarmService's curtailment calls (issue 16): Create/List/CancelCurtailment.

The farm's operator or an admin (``broker.auth``; an operator only on its own farm). The
window is written to the store first, then applied to the core
(``CurtailmentScheduled`` / ``CurtailmentCancelled``), as farms are.
"""

from __future__ import annotations

import uuid

from google.protobuf.timestamp_pb2 import Timestamp

from broker.api.common import farm_scope
from broker.errors import FieldViolation, InvalidArgument
from broker.events import CurtailmentCancelled, CurtailmentScheduled
from broker.service import BrokerService
from broker.store import CurtailmentRow
from broker.windows import MAX_DURATION_S, Window
from rigshift.v1 import farm_pb2, farm_service_pb2

__all__ = ["cancel", "create", "curtailment_pb", "list_"]

PAST_TOLERANCE_S = 60.0
"""A start this far in the past is taken as now (clocks differ); further back is refused."""

_STATES = {
    "SCHEDULED": farm_pb2.Curtailment.SCHEDULED,
    "ACTIVE": farm_pb2.Curtailment.ACTIVE,
    "ENDED": farm_pb2.Curtailment.ENDED,
    "CANCELLED": farm_pb2.Curtailment.CANCELLED,
}


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def curtailment_pb(w: Window, now: float) -> farm_pb2.Curtailment:
    """The window as a ``rigshift.v1.Curtailment``, its state at ``now``."""
    return farm_pb2.Curtailment(
        name=w.name,
        start_time=_ts(w.start_time),
        end_time=_ts(w.end_time),
        reason=w.reason,
        include_guaranteed=w.include_guaranteed,
        state=_STATES[w.state(now)],
        create_time=_ts(w.create_time),
        created_by=w.created_by,
    )


def _farm(svc: BrokerService, name: str, field: str) -> str:
    farm_id = farm_scope(name, field)
    if not farm_id:
        raise InvalidArgument.of([FieldViolation(field, "is required: farms/{farm_id}")])
    if farm_id not in svc.core.farms:
        svc.store.get_farm(farm_id)  # NotFound for an unknown farm
    return farm_id


async def create(
    svc: BrokerService, request: farm_service_pb2.CreateCurtailmentRequest, caller: str
) -> farm_pb2.Curtailment:
    """CreateCurtailment: INVALID_ARGUMENT per field for a duration outside 1 s..7 days or a
    start more than a minute in the past; NOT_FOUND for an unknown farm."""
    farm_id = _farm(svc, request.farm, "farm")
    now = svc.clock()
    start = request.start_time.ToNanoseconds() / 1e9 if request.HasField("start_time") else now
    violations = []
    if not 1 <= request.duration_seconds <= MAX_DURATION_S:
        violations.append(
            FieldViolation(
                "duration_seconds",
                f"must be 1 s to 7 days ({MAX_DURATION_S} s), got {request.duration_seconds}",
            )
        )
    if start < now - PAST_TOLERANCE_S:
        violations.append(
            FieldViolation("start_time", f"is {int(now - start)} s in the past; use now or later")
        )
    if len(request.reason) > 500:
        violations.append(FieldViolation("reason", "must be at most 500 characters"))
    if violations:
        raise InvalidArgument.of(violations)
    start = max(start, now)
    svc.ensure_writable()
    row = CurtailmentRow(
        id=uuid.uuid4().hex[:12],
        farm_id=farm_id,
        start_time=start,
        end_time=start + request.duration_seconds,
        reason=request.reason,
        include_guaranteed=request.include_guaranteed,
        create_time=now,
        created_by=caller,
    )
    window = svc.store.add_curtailment(row).window()
    await svc.apply(CurtailmentScheduled(now, window))
    return curtailment_pb(svc.core.curtailment(window.curtailment_id), svc.clock())


def list_(
    svc: BrokerService, request: farm_service_pb2.ListCurtailmentsRequest
) -> farm_service_pb2.ListCurtailmentsResponse:
    """ListCurtailments: newest first; past ones with ``include_past``."""
    farm_id = _farm(svc, request.farm, "farm")
    now = svc.clock()
    windows = svc.core.curtailments(farm_id, now, request.include_past)
    return farm_service_pb2.ListCurtailmentsResponse(
        curtailments=[curtailment_pb(w, now) for w in windows]
    )


async def cancel(
    svc: BrokerService, request: farm_service_pb2.CancelCurtailmentRequest
) -> farm_pb2.Curtailment:
    """CancelCurtailment: NOT_FOUND for an unknown window, FAILED_PRECONDITION for one that
    ended or was cancelled already."""
    parts = request.name.split("/")
    if len(parts) != 4 or parts[0] != "farms" or parts[2] != "curtailments" or not parts[3]:
        raise InvalidArgument.of(
            [FieldViolation("name", "must be farms/{farm_id}/curtailments/{curtailment_id}")]
        )
    farm_id = _farm(svc, f"farms/{parts[1]}", "name")
    window = svc.core.curtailment(parts[3])
    if window.farm_id != farm_id:
        window = svc.core.curtailment("")  # NotFound: not this farm's
    now = svc.clock()
    if window.open(now):
        svc.ensure_writable()
        svc.store.cancel_curtailment(window.curtailment_id, now)
    await svc.apply(CurtailmentCancelled(now, window.curtailment_id))
    return curtailment_pb(svc.core.curtailment(window.curtailment_id), svc.clock())
