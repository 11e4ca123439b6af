"""rigshift.v1.ArtifactService: content-addressed uploads (resumable) and downloads of
working directories, checkpoints, inputs and outputs, and who may read which."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from broker.api.boundary import MalformedRequest, well_formed
from broker.api.common import streaming, unary
from broker.artifacts import CHUNK_BYTES, ArtifactStore, Purpose
from broker.auth import Principal, Role, current
from broker.core import Job
from broker.errors import (
    BrokerError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from broker.service import BrokerService
from rigshift.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
)


class ArtifactServicer(artifact_service_pb2_grpc.ArtifactServiceServicer):
    """rigshift.v1.ArtifactService: working directories, checkpoints, inputs and outputs."""

    SERVICE = "ArtifactService"

    def __init__(self, svc: BrokerService, artifacts: ArtifactStore) -> None:
        self.svc = svc
        self.artifacts = artifacts

    @unary
    async def UploadArtifact(
        self,
        request_iterator: AsyncIterator[
            artifact_service_pb2.UploadArtifactRequest | MalformedRequest
        ],
        context: grpc.aio.ServicerContext,
    ) -> artifact_service_pb2.Artifact:
        writer = None
        sha256 = ""
        size = 0
        try:
            async for chunk in request_iterator:
                chunk = well_formed(chunk)
                if len(chunk.data) > CHUNK_BYTES:
                    raise InvalidArgument.of([FieldViolation("data", "at most 1 MiB per chunk")])
                if writer is None:
                    sha256, size = self.artifacts.check(chunk.sha256), chunk.size_bytes
                    purpose = self._purpose(chunk.purpose)
                    if self.artifacts.exists(sha256):  # the same data is not stored twice
                        self.artifacts.touch(sha256)
                        size = self.artifacts.size(sha256)
                        return artifact_service_pb2.Artifact(sha256=sha256, size_bytes=size)
                    writer = self.artifacts.writer(
                        sha256, size, purpose=purpose, offset=chunk.offset
                    )
                    if chunk.offset:
                        await asyncio.to_thread(writer.rehash)
                writer.write(chunk.data)
            if writer is None:
                raise InvalidArgument.of([FieldViolation("sha256", "no chunks were sent")])
            done, writer = writer, None
            done.commit()  # keeps a short upload for a resume, drops a wrong one
        except BrokerError:
            if writer is not None:
                writer.discard()
            raise
        finally:
            if writer is not None:
                writer.keep()  # the stream broke: what arrived stays for a resume
        return artifact_service_pb2.Artifact(sha256=sha256, size_bytes=size)

    @staticmethod
    def _purpose(value: int) -> Purpose:
        """The upload's purpose; only workers upload attempt outputs."""
        try:
            purpose = Purpose(value)
        except ValueError:
            violation = FieldViolation("purpose", f"unknown purpose {value}")
            raise InvalidArgument.of([violation]) from None
        if purpose == Purpose.OUTPUT and current().role != Role.WORKER:
            raise PermissionDenied(
                "only agents upload attempt outputs", reason="OUTPUT_UPLOAD_NOT_ALLOWED"
            )
        return purpose

    @unary
    async def GetUploadStatus(
        self,
        request: artifact_service_pb2.GetUploadStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> artifact_service_pb2.UploadStatus:
        sha256 = self.artifacts.check(request.sha256)
        complete, received = self.artifacts.status(sha256)
        return artifact_service_pb2.UploadStatus(
            sha256=sha256, complete=complete, received_bytes=received
        )

    def _may_read(self, who: Principal, sha256: str) -> bool:
        """Workers read what their live attempts need, clients what their jobs refer to:
        working directory, checkpoint and inputs.

        An attempt's output is read by its job's owner through JobService.DownloadJobOutput;
        naming another client's output in a job of one's own does not make it readable.
        Finished jobs count from the store (the core holds only live work).
        """
        core = self.svc.core
        if who.role == Role.WORKER:
            jobs = [job for job, _ in core.live_attempts(who.name)]
        else:
            jobs = [j for j in core.jobs.values() if j.owner == who.name]
        readers = {j.owner for j in jobs if sha256 in _artifacts_needed(j)}
        store = self.svc.store  # the finished jobs the core let go of: one query each
        if not readers and who.role != Role.WORKER and store.refers_to(sha256, who.name):
            readers.add(who.name)
        if not readers:
            return False
        producers = store.output_owners(sha256) | {
            j.owner
            for j in core.jobs.values()
            if any(a.output is not None and a.output.sha256 == sha256 for a in j.attempts)
        }
        return not producers or bool(readers & producers)

    @streaming
    async def DownloadArtifact(
        self,
        request: artifact_service_pb2.DownloadArtifactRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[artifact_service_pb2.ArtifactChunk]:
        self.artifacts.check(request.sha256)
        who = current()
        if who.role != Role.ADMIN and not self._may_read(who, request.sha256):
            raise PermissionDenied(
                "no job of yours refers to this artifact", reason="NOT_YOUR_ARTIFACT"
            )
        if not self.artifacts.exists(request.sha256):
            raise NotFound(f"artifact {request.sha256[:80]} not found")
        for chunk in self.artifacts.read(request.sha256):
            yield artifact_service_pb2.ArtifactChunk(data=chunk)


def _artifacts_needed(job: Job) -> tuple[str, ...]:
    """What a job's attempts download: its working directory, checkpoint and inputs."""
    return (
        job.spec.working_dir_sha256,
        job.checkpoint_sha256,
        *(sha for _, sha in job.spec.inputs),
    )
