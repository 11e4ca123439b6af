"""The agent's calls to the broker that carry data, as plain functions over a channel.

The session (``agent.py``) owns the channel, the credential and when to call; here is
what each call sends: the GPUs it registers (with their ask price), artifacts streamed
down and up in chunks, and the request to drain the worker.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence

import grpc

from rigshift.v1 import artifact_service_pb2 as art
from rigshift.v1 import artifact_service_pb2_grpc as artg
from rigshift.v1 import farm_service_pb2, farm_service_pb2_grpc
from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg
from worker_agent.gpu import GpuBackend, GpuInfo

__all__ = [
    "CHUNK_BYTES",
    "Metadata",
    "ask_broker_to_drain",
    "ask_micros_per_gpu_hour",
    "download_artifact",
    "gpu_infos",
    "report_gpu_health",
    "upload_artifact",
]

log = logging.getLogger("rigshift.agent")

Metadata = Sequence[tuple[str, str]]
"""The call metadata: the worker's credential."""

#: Uploads go in chunks of this size.
CHUNK_BYTES = 1 << 20


def ask_micros_per_gpu_hour(configured: int | None, gpu: GpuInfo) -> int:
    """The GPU's ask price per GPU-hour: the operator's ``price_micros_per_gpu_hour``, or
    the model's default when none is configured. The one place the ask is decided: the
    registration, the mining policy and the metrics all use it."""
    return gpu.default_price_micros_per_gpu_hour if configured is None else configured


def gpu_infos(
    backend: GpuBackend,
    configured_price: int | None,
    health: Mapping[int, ws.GpuHealth] | None = None,
    settable: Callable[[int], bool] | None = None,
) -> list[ws.GpuInfo]:
    """The rig's GPUs as RegisterWorker sends them; ``health``: the GPUs whose health is
    not plain healthy (an agent restarted with a GPU in quarantine says so at once);
    ``settable``: whether the agent may set a GPU's power limit (``power.PowerLimits``)."""
    infos = [
        ws.GpuInfo(
            index=g.index,
            uuid=g.uuid,
            model=g.model,
            vram_mb=g.vram_mb,
            power_limit_watts=g.power_limit_watts,
            price_micros_per_gpu_hour=ask_micros_per_gpu_hour(configured_price, g),
            pcie_link_width=g.pcie_link_width,
            pcie_generation=g.pcie_generation,
            power_limit_settable=settable(g.index) if settable is not None else False,
        )
        for g in backend.gpus()
    ]
    for info in infos:
        if health and info.index in health:
            info.health.CopyFrom(health[info.index])
    return infos


async def download_artifact(
    channel: grpc.aio.Channel, metadata: Metadata, sha256: str
) -> AsyncIterator[bytes]:
    """Stream an artifact's bytes from the broker's artifact store."""
    call = artg.ArtifactServiceStub(channel).DownloadArtifact(
        art.DownloadArtifactRequest(sha256=sha256), metadata=metadata, timeout=600.0
    )
    async for chunk in call:
        yield chunk.data


async def upload_artifact(
    channel: grpc.aio.Channel, metadata: Metadata, sha256: str, data: bytes, purpose: int = 0
) -> None:
    """Store an archive (a checkpoint, an output) in the broker's artifact store, in
    chunks of :data:`CHUNK_BYTES`; ``purpose`` picks the broker's size limit."""

    def chunks() -> Iterator[art.UploadArtifactRequest]:
        for start in range(0, max(1, len(data)), CHUNK_BYTES):
            request = art.UploadArtifactRequest(data=data[start : start + CHUNK_BYTES])
            if start == 0:
                request.sha256, request.size_bytes = sha256, len(data)
                request.purpose = purpose  # type: ignore[assignment]
            yield request

    stub = artg.ArtifactServiceStub(channel)
    await stub.UploadArtifact(chunks(), metadata=metadata, timeout=300.0)


async def ask_broker_to_drain(channel: grpc.aio.Channel, metadata: Metadata, worker: str) -> bool:
    """FarmService.DrainWorker, best effort: whether the broker took it."""
    try:
        await farm_service_pb2_grpc.FarmServiceStub(channel).DrainWorker(
            farm_service_pb2.DrainWorkerRequest(name=worker), metadata=metadata, timeout=2.0
        )
    except grpc.aio.AioRpcError as err:
        log.info("broker did not take the drain request: %s", err.code().name)
        return False
    return True


async def report_gpu_health(
    channel: grpc.aio.Channel, metadata: Metadata, worker: str, gpus: Sequence[ws.GpuHealth]
) -> bool:
    """WorkerService.ReportGpuHealth (the rig's whole GPU health): whether the broker took it."""
    try:
        await wsg.WorkerServiceStub(channel).ReportGpuHealth(
            ws.ReportGpuHealthRequest(worker=worker, gpus=gpus), metadata=metadata, timeout=5.0
        )
    except grpc.aio.AioRpcError as err:
        log.info("broker did not take the GPU health report: %s", err.code().name)
        return False
    return True
