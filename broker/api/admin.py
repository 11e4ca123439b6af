"""rigshift.v1.AdminService: API keys (create, list, revoke)."""

from __future__ import annotations

import grpc

from broker import validation as v
from broker.api.common import unary
from broker.auth import Role
from broker.convert import timestamp
from broker.errors import (
    FieldViolation,
    InvalidArgument,
)
from broker.service import BrokerService
from broker.store import ApiKeyRow
from rigshift.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
)


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """rigshift.v1.AdminService: API keys."""

    SERVICE = "AdminService"

    def __init__(self, svc: BrokerService) -> None:
        self.svc = svc

    @staticmethod
    def _key_pb(row: ApiKeyRow, secret: str = "") -> admin_service_pb2.ApiKey:
        return admin_service_pb2.ApiKey(
            name=f"apiKeys/{row.id}",
            role=row.role,
            principal=row.principal,
            farm=f"farms/{row.farm_id}" if row.farm_id else "",
            key=secret,
            create_time=timestamp(row.create_time),
            revoked=row.revoked,
        )

    @unary
    async def CreateApiKey(
        self, request: admin_service_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_service_pb2.ApiKey:
        bad = []
        roles = {
            admin_service_pb2.ApiKey.CLIENT: Role.CLIENT,
            admin_service_pb2.ApiKey.OPERATOR: Role.OPERATOR,
            admin_service_pb2.ApiKey.ADMIN: Role.ADMIN,
        }
        role = roles.get(request.role)
        if role is None:
            bad.append(FieldViolation("role", "must be CLIENT, OPERATOR or ADMIN"))
        if not v.ID_RE.match(request.principal):
            bad.append(FieldViolation("principal", "1-64 letters, digits, '_', '.', '-'"))
        farm_id = ""
        if role == Role.OPERATOR:
            if not request.farm:
                bad.append(FieldViolation("farm", "is required for an OPERATOR key"))
            else:
                farm_id = v.parse_name(request.farm, "farms", "farm")
        elif request.farm:
            bad.append(FieldViolation("farm", "only OPERATOR keys belong to a farm"))
        if bad:
            raise InvalidArgument.of(bad)
        if farm_id:
            self.svc.store.get_farm(farm_id)
        assert role is not None
        key_id, secret = self.svc.create_api_key(role, request.principal, farm_id)
        row = next(r for r in self.svc.store.api_keys() if r.id == key_id)
        return self._key_pb(row, secret)

    @unary
    async def ListApiKeys(
        self, request: admin_service_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_service_pb2.ListApiKeysResponse:
        return admin_service_pb2.ListApiKeysResponse(
            api_keys=[self._key_pb(r) for r in self.svc.store.api_keys()]
        )

    @unary
    async def RevokeApiKey(
        self, request: admin_service_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_service_pb2.ApiKey:
        row = self.svc.store.revoke_api_key(v.parse_name(request.name, "apiKeys"))
        self.svc.reload_api_keys()
        return self._key_pb(row)
