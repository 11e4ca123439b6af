"""rigshift.v1.FarmService: operators create and update farms (their economic terms), list
and drain workers, reinstate GPUs held out after three quarantines, and read earnings."""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import replace
from typing import TypedDict

import grpc

from broker import validation as v
from broker.api import curtailments
from broker.api.common import farm_scope, page, unary
from broker.auth import Role, current
from broker.convert import earnings_pb, farm_pb, worker_pb
from broker.economics import FarmTerms
from broker.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
)
from broker.events import (
    DrainRequested,
    FarmConfigured,
    ReinstateRequested,
)
from broker.model import WorkerState
from broker.service import BrokerService, sha256_hex
from broker.store import FarmRow
from rigshift.v1 import (
    farm_pb2,
    farm_service_pb2,
    farm_service_pb2_grpc,
)


class FarmServicer(farm_service_pb2_grpc.FarmServiceServicer):
    """rigshift.v1.FarmService."""

    SERVICE = "FarmService"

    def __init__(self, svc: BrokerService) -> None:
        self.svc = svc

    def _watts(self, farm_id: str) -> dict[str, int]:
        """Highest power limit per GPU model registered in the farm."""
        watts: dict[str, int] = {}
        for w in self.svc.core.workers.values():
            if w.farm_id == farm_id:
                for g in w.gpus.values():
                    m = g.info.model
                    watts[m] = max(watts.get(m, 0), g.info.power_limit_watts)
        return watts

    def _farm(self, row: FarmRow, token: str = "") -> farm_pb2.Farm:
        return farm_pb(row, token, self._watts(row.id))

    @unary
    async def CreateFarm(
        self, request: farm_service_pb2.CreateFarmRequest, context: grpc.aio.ServicerContext
    ) -> farm_pb2.Farm:
        if not request.HasField("farm"):
            raise InvalidArgument.of([FieldViolation("farm", "is required")])
        f = request.farm
        v.check_farm(f)
        farm_id = uuid.uuid4().hex[:12]
        terms = v.terms_from(farm_id, f)
        if not f.broker_fee_permille:
            terms = replace(terms, broker_fee_permille=self.svc.core.default_fee_permille)
        v.check_asks(terms, {})
        token = "rsft_" + secrets.token_urlsafe(24)
        self.svc.ensure_writable()  # the row and the core's terms must not part
        row = FarmRow(
            id=farm_id,
            display_name=f.display_name.strip(),
            region=f.region,
            enrollment_token_sha256=sha256_hex(token),
            create_time=self.svc.clock(),
            **_terms_columns(terms),
        )
        row = self.svc.store.create_farm(row)
        await self.svc.apply(FarmConfigured(self.svc.clock(), terms))
        return self._farm(row, token)

    @unary
    async def UpdateFarm(
        self, request: farm_service_pb2.UpdateFarmRequest, context: grpc.aio.ServicerContext
    ) -> farm_pb2.Farm:
        if not request.HasField("farm"):
            raise InvalidArgument.of([FieldViolation("farm", "is required")])
        farm_id = farm_scope(request.farm.name, "farm.name") or v.parse_name(
            request.farm.name, "farms", "farm.name"
        )
        paths = tuple(request.update_mask.paths)
        if current().role != Role.ADMIN and "broker_fee_permille" in paths:
            raise PermissionDenied("only an admin sets the broker fee", reason="ADMIN_ONLY_FIELD")
        unknown = [p for p in paths if p not in v.FARM_FIELDS]
        if unknown:
            raise InvalidArgument.of(
                [FieldViolation("update_mask", f"cannot update {p!r}") for p in unknown]
            )
        if not paths:  # AIP-134: no mask means every field that is set
            paths = tuple(fd.name for fd, _ in request.farm.ListFields() if fd.name != "name")
        v.check_farm(request.farm, paths)
        row = self.svc.store.get_farm(farm_id)
        stored = farm_pb(row)
        merged = farm_pb2.Farm()
        merged.CopyFrom(stored)
        for path in paths:
            merged.ClearField(path)
            value = getattr(request.farm, path)
            if path in ("mining_micros_per_kwh", "ask_micros_per_gpu_hour"):
                getattr(merged, path).update(value)
            elif path == "tariff_windows":
                merged.tariff_windows.extend(value)
            else:
                setattr(merged, path, value)
        terms = v.terms_from(farm_id, merged)
        if not merged.broker_fee_permille:
            terms = replace(terms, broker_fee_permille=self.svc.core.default_fee_permille)
        v.check_asks(terms, self._watts(farm_id))
        changes: dict[str, object] = dict(_terms_columns(terms))
        changes["display_name"] = merged.display_name.strip()
        changes["region"] = merged.region
        self.svc.ensure_writable()
        row = self.svc.store.update_farm(farm_id, changes)
        await self.svc.apply(FarmConfigured(self.svc.clock(), terms))
        return self._farm(row)

    @unary
    async def GetFarm(
        self, request: farm_service_pb2.GetFarmRequest, context: grpc.aio.ServicerContext
    ) -> farm_pb2.Farm:
        farm_id = farm_scope(request.name, "name") or v.parse_name(request.name, "farms")
        return self._farm(self.svc.store.get_farm(farm_id))

    @unary
    async def ListWorkers(
        self, request: farm_service_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> farm_service_pb2.ListWorkersResponse:
        limit, offset = v.check_page(request.page_size, request.page_token)
        farm_id = farm_scope(request.parent)
        if farm_id and farm_id not in self.svc.core.farms:
            self.svc.store.get_farm(farm_id)  # NotFound for an unknown farm
        workers = sorted(
            (w for w in self.svc.core.workers.values() if not farm_id or w.farm_id == farm_id),
            key=lambda w: (w.farm_id, w.hostname, w.worker_id),
        )
        shown, token = page(workers, limit, offset)
        now = self.svc.clock()
        return farm_service_pb2.ListWorkersResponse(
            workers=[worker_pb(w, self.svc.core, now) for w in shown], next_page_token=token
        )

    @unary
    async def DrainWorker(
        self, request: farm_service_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext
    ) -> farm_pb2.Worker:
        worker_id = v.parse_name(request.name, "workers")
        caller = current()
        if caller.role == Role.WORKER:
            if caller.name != worker_id:
                raise PermissionDenied(
                    f"a worker may drain only itself, not workers/{worker_id}",
                    reason="NOT_YOUR_WORKER",
                )
        elif not caller.owns_farm(self.svc.core.worker(worker_id).farm_id):
            raise PermissionDenied(
                f"workers/{worker_id} is not on your farm", reason="NOT_YOUR_FARM"
            )
        await self.svc.apply(DrainRequested(self.svc.clock(), worker_id))
        return worker_pb(self.svc.core.worker(worker_id), self.svc.core, self.svc.clock())

    @unary
    async def ReinstateGpu(
        self, request: farm_service_pb2.ReinstateGpuRequest, context: grpc.aio.ServicerContext
    ) -> farm_pb2.Worker:
        worker_id = v.parse_name(request.worker, "workers", "worker")
        caller = current()
        worker = self.svc.core.worker(worker_id)  # NotFound first: ids are not secrets here
        if not caller.owns_farm(worker.farm_id):
            raise PermissionDenied(
                f"workers/{worker_id} is not on your farm", reason="NOT_YOUR_FARM"
            )
        gpu = worker.gpus.get(request.gpu_index)
        held_out = gpu is not None and gpu.reinstate_required
        if held_out and worker.state != WorkerState.OFFLINE and not self.svc.connected(worker_id):
            # The instruction would be lost: only an open stream carries it. (The core
            # answers the other preconditions: unknown GPU, offline, not held out.)
            raise FailedPrecondition(
                f"the agent of workers/{worker_id} is not connected; retry once it is",
                reason="WORKER_NOT_CONNECTED",
                metadata={"worker": worker_id, "gpu_index": str(request.gpu_index)},
            )
        event = ReinstateRequested(self.svc.clock(), worker_id, request.gpu_index, caller.name)
        await self.svc.apply(event)
        return worker_pb(self.svc.core.worker(worker_id), self.svc.core, self.svc.clock())

    @unary
    async def GetEarnings(
        self, request: farm_service_pb2.GetEarningsRequest, context: grpc.aio.ServicerContext
    ) -> farm_service_pb2.GetEarningsResponse:
        farm_id = farm_scope(request.parent)
        if farm_id and farm_id not in self.svc.core.farms:
            self.svc.store.get_farm(farm_id)  # NotFound for an unknown farm
        groups = {0: "farm", 1: "farm", 2: "worker", 3: "gpu"}
        if request.group_by not in groups:
            raise InvalidArgument.of([FieldViolation("group_by", "unknown grouping")])
        since = request.since.ToNanoseconds() / 1e9 if request.HasField("since") else 0.0
        return earnings_pb(
            self.svc.core,
            farm_id=farm_id,
            since=since,
            group_by=groups[request.group_by],
            farm_name=self.svc.farm_names,
            now=self.svc.clock(),
            source=self.svc.store,  # settled attempts and payouts: SQL (broker.store.ledger_sql)
        )

    @unary
    async def CreateCurtailment(
        self,
        request: farm_service_pb2.CreateCurtailmentRequest,
        context: grpc.aio.ServicerContext,
    ) -> farm_pb2.Curtailment:
        return await curtailments.create(self.svc, request, current().name)

    @unary
    async def ListCurtailments(
        self,
        request: farm_service_pb2.ListCurtailmentsRequest,
        context: grpc.aio.ServicerContext,
    ) -> farm_service_pb2.ListCurtailmentsResponse:
        return curtailments.list_(self.svc, request)

    @unary
    async def CancelCurtailment(
        self,
        request: farm_service_pb2.CancelCurtailmentRequest,
        context: grpc.aio.ServicerContext,
    ) -> farm_pb2.Curtailment:
        return await curtailments.cancel(self.svc, request)


class TermsColumns(TypedDict):
    """The columns of a ``FarmRow`` that hold the farm's economic terms."""

    tariff_micros_per_kwh: int
    pue_permille: int
    broker_fee_permille: int
    margin_micros_per_gpu_hour: int
    mining_json: str
    asks_json: str
    tariff_windows_json: str
    power_policy: str
    max_slowdown_percent: int
    demand_response_micros_per_mwh: int


def _terms_columns(terms: FarmTerms) -> TermsColumns:
    return {
        "tariff_micros_per_kwh": terms.tariff_micros_per_kwh,
        "pue_permille": terms.pue_permille,
        "broker_fee_permille": terms.broker_fee_permille,
        "margin_micros_per_gpu_hour": terms.margin_micros_per_gpu_hour,
        "mining_json": json.dumps(dict(terms.mining_micros_per_kwh), sort_keys=True),
        "asks_json": json.dumps(dict(terms.ask_micros_per_gpu_hour), sort_keys=True),
        "tariff_windows_json": json.dumps(
            [[w.start_hour, w.end_hour, w.micros_per_kwh] for w in terms.tariff_windows]
        ),
        "power_policy": terms.power_policy.value,
        "max_slowdown_percent": terms.max_slowdown_percent,
        "demand_response_micros_per_mwh": terms.demand_response_micros_per_mwh,
    }
