"""The farm methods of :class:`client.sdk.Client`: farms, their workers and earnings, and
API keys (admin)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from google.protobuf import timestamp_pb2

from client.connection import Connection
from client.messages import (
    build_update_farm_request,
    group_by_value,
    resource_name,
    tariff_window_messages,
)
from rigshift.v1 import admin_service_pb2, farm_pb2, farm_service_pb2

__all__ = ["FarmMethods"]


class FarmMethods(Connection):
    """Farms, workers, earnings and API keys."""

    def create_farm(
        self,
        display_name: str,
        *,
        region: str = "",
        tariff_micros_per_kwh: int = 0,
        pue_permille: int = 0,
        mining_micros_per_kwh: Mapping[str, int] | None = None,
        ask_micros_per_gpu_hour: Mapping[str, int] | None = None,
        broker_fee_permille: int = 0,
        margin_micros_per_gpu_hour: int = 0,
        tariff_windows: Sequence[tuple[int, int, int]] = (),
    ) -> farm_pb2.Farm:
        """Create a farm; the returned Farm is the only one that carries the enrollment token.

        Money is integer micro-dollars: the flat tariff per kWh, what mining
        earns per kWh and the ask per GPU-hour by GPU model, the margin on top
        of the floor price. ``tariff_windows`` are ``(start_hour, end_hour,
        micros_per_kwh)`` time-of-use windows in UTC (see
        :func:`client.units.parse_tariff_file`). The broker refuses an ask
        under the model's floor price with the reason.
        """
        farm = farm_pb2.Farm(
            display_name=display_name,
            region=region,
            tariff_micros_per_kwh=tariff_micros_per_kwh,
            pue_permille=pue_permille,
            mining_micros_per_kwh=dict(mining_micros_per_kwh or {}),
            ask_micros_per_gpu_hour=dict(ask_micros_per_gpu_hour or {}),
            broker_fee_permille=broker_fee_permille,
            margin_micros_per_gpu_hour=margin_micros_per_gpu_hour,
            tariff_windows=tariff_window_messages(tariff_windows),
        )
        return self._unary(self._farms.CreateFarm, farm_service_pb2.CreateFarmRequest(farm=farm))

    def update_farm(
        self,
        farm: str,
        *,
        region: str | None = None,
        tariff_micros_per_kwh: int | None = None,
        pue_permille: int | None = None,
        mining_micros_per_kwh: Mapping[str, int] | None = None,
        ask_micros_per_gpu_hour: Mapping[str, int] | None = None,
        broker_fee_permille: int | None = None,
        margin_micros_per_gpu_hour: int | None = None,
        tariff_windows: Sequence[tuple[int, int, int]] | None = None,
        power_policy: int | None = None,
        max_slowdown_percent: int | None = None,
        demand_response_micros_per_mwh: int | None = None,
    ) -> farm_pb2.Farm:
        """Change only the fields passed (not None) and return the farm with its new floors.

        ``power_policy`` is a ``rigshift.v1.PowerPolicy`` value (``POWER_POLICY_MAX`` or
        ``POWER_POLICY_EFFICIENT``); ``max_slowdown_percent`` 0-50.

        Maps and ``tariff_windows`` are replaced whole: pass the full map. See
        :func:`build_update_farm_request`.
        """
        request = build_update_farm_request(
            farm,
            region=region,
            tariff_micros_per_kwh=tariff_micros_per_kwh,
            pue_permille=pue_permille,
            mining_micros_per_kwh=mining_micros_per_kwh,
            ask_micros_per_gpu_hour=ask_micros_per_gpu_hour,
            broker_fee_permille=broker_fee_permille,
            margin_micros_per_gpu_hour=margin_micros_per_gpu_hour,
            tariff_windows=tariff_windows,
            power_policy=power_policy,
            max_slowdown_percent=max_slowdown_percent,
            demand_response_micros_per_mwh=demand_response_micros_per_mwh,
        )
        return self._unary(self._farms.UpdateFarm, request)

    def get_earnings(
        self,
        farm: str = "",
        *,
        since: datetime | None = None,
        group_by: str = "farm",
    ) -> farm_service_pb2.GetEarningsResponse:
        """Earnings of ``farm`` (or of every farm) by ``"farm"``, ``"worker"`` or ``"gpu"``.

        Only attempts that ended at or after ``since`` count (a naive datetime
        is UTC); None means all time.
        """
        parent = resource_name("farms", farm, "farm") if farm else ""
        request = farm_service_pb2.GetEarningsRequest(
            parent=parent, group_by=cast(Any, group_by_value(group_by))
        )
        if since is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(since if since.tzinfo else since.replace(tzinfo=UTC))
            request.since.CopyFrom(stamp)
        return self._unary(self._farms.GetEarnings, request)

    def get_farm(self, farm: str) -> farm_pb2.Farm:
        """Return one farm (without its enrollment token)."""
        name = resource_name("farms", farm, "farm")
        return self._unary(self._farms.GetFarm, farm_service_pb2.GetFarmRequest(name=name))

    def list_workers(
        self, farm: str = "", page_size: int = 0, page_token: str = ""
    ) -> farm_service_pb2.ListWorkersResponse:
        """Return one page of the workers of ``farm``, or of every farm when empty."""
        parent = resource_name("farms", farm, "farm") if farm else ""
        request = farm_service_pb2.ListWorkersRequest(
            parent=parent, page_size=page_size, page_token=page_token
        )
        return self._unary(self._farms.ListWorkers, request)

    def iter_workers(self, farm: str = "", *, page_size: int = 0) -> Iterator[farm_pb2.Worker]:
        """Yield every worker of ``farm`` (or of every farm), following ``next_page_token``."""
        token = ""
        while True:
            page = self.list_workers(farm, page_size=page_size, page_token=token)
            yield from page.workers
            token = page.next_page_token
            if not token:
                return

    def drain_worker(self, worker: str) -> farm_pb2.Worker:
        """Stop placing new work on a worker; its running attempts finish."""
        name = resource_name("workers", worker, "worker")
        request = farm_service_pb2.DrainWorkerRequest(name=name)
        return self._unary(self._farms.DrainWorker, request)

    def reinstate_gpu(self, worker: str, gpu_index: int) -> farm_pb2.Worker:
        """Return a GPU held out after three quarantines in 24 h to probation: its agent
        forgets the strikes and re-tests it. The farm's operator or an admin only;
        FailedPrecondition when the GPU is not held out or the worker is offline."""
        name = resource_name("workers", worker, "worker")
        request = farm_service_pb2.ReinstateGpuRequest(worker=name, gpu_index=gpu_index)
        return self._unary(self._farms.ReinstateGpu, request)

    # -- curtailment windows -------------------------------------------------

    def create_curtailment(
        self,
        farm: str,
        duration_seconds: int,
        *,
        start: datetime | None = None,
        reason: str = "",
        include_guaranteed: bool = False,
    ) -> farm_pb2.Curtailment:
        """Schedule a curtailment window on ``farm`` from ``start`` (None: now) for
        ``duration_seconds``: no placements and no mining there, spot attempts (and
        guaranteed ones with ``include_guaranteed``) checkpointed and moved. The farm's
        operator or an admin only."""
        request = farm_service_pb2.CreateCurtailmentRequest(
            farm=resource_name("farms", farm, "farm"),
            duration_seconds=duration_seconds,
            reason=reason,
            include_guaranteed=include_guaranteed,
        )
        if start is not None:
            request.start_time.FromDatetime(start if start.tzinfo else start.replace(tzinfo=UTC))
        return self._unary(self._farms.CreateCurtailment, request)

    def list_curtailments(
        self, farm: str, *, include_past: bool = False
    ) -> list[farm_pb2.Curtailment]:
        """The farm's curtailment windows, newest first (ended and cancelled ones with
        ``include_past``)."""
        request = farm_service_pb2.ListCurtailmentsRequest(
            farm=resource_name("farms", farm, "farm"), include_past=include_past
        )
        return list(self._unary(self._farms.ListCurtailments, request).curtailments)

    def cancel_curtailment(self, name: str) -> farm_pb2.Curtailment:
        """Cancel a window that has not ended (``farms/F/curtailments/ID``);
        FailedPrecondition once it ended."""
        request = farm_service_pb2.CancelCurtailmentRequest(name=name)
        return self._unary(self._farms.CancelCurtailment, request)

    # -- API keys (admin) ---------------------------------------------------

    def create_api_key(
        self, role: str, principal: str, *, farm: str = ""
    ) -> admin_service_pb2.ApiKey:
        """Issue an API key (admin only); ``role`` is client, operator or admin.

        The returned message carries the secret in ``key``; it is shown only once.
        """
        request = admin_service_pb2.CreateApiKeyRequest(
            role=role.upper(),
            principal=principal,
            farm=resource_name("farms", farm, "farm") if farm else "",
        )
        return self._unary(self._admin.CreateApiKey, request)

    def list_api_keys(self) -> admin_service_pb2.ListApiKeysResponse:
        """Every API key, without secrets (admin only)."""
        return self._unary(self._admin.ListApiKeys, admin_service_pb2.ListApiKeysRequest())

    def revoke_api_key(self, name: str) -> admin_service_pb2.ApiKey:
        """Revoke a key by its name, ``apiKeys/ID`` or ``ID`` (admin only)."""
        return self._unary(
            self._admin.RevokeApiKey,
            admin_service_pb2.RevokeApiKeyRequest(name=resource_name("apiKeys", name, "api key")),
        )
