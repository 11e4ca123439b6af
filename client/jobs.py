"""The job methods of :class:`client.sdk.Client`: quote, submit, read, follow, cancel."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

from client.errors import RigshiftError
from client.messages import job_spec, registry_auth_bytes, resource_name
from client.transfers import TransferMethods
from rigshift.v1 import job_pb2, job_service_pb2

__all__ = ["JobMethods"]


class JobMethods(TransferMethods):
    """Jobs: :meth:`create_job` uploads the inputs given as paths (:class:`TransferMethods`)."""

    def create_job(
        self,
        command: Sequence[str],
        *,
        gpu_count: int = 1,
        gpu_model: str = "",
        min_vram_mb: int = 0,
        max_price_micros_per_gpu_hour: int = 0,
        env: Mapping[str, str] | None = None,
        working_dir_sha256: str = "",
        max_duration_seconds: int = 0,
        max_attempts: int = 0,
        display_name: str = "",
        tier: str | int = "guaranteed",
        request_id: str = "",
        inputs: Mapping[str, str | os.PathLike[str]] | None = None,
        python_requirements: str = "",
        image: str = "",
        registry_auth: bytes | str | os.PathLike[str] = b"",
        min_pcie_gbps: float = 0.0,
        min_host_ram_gb_per_gpu: int = 0,
        min_cpu_cores_per_gpu: float = 0.0,
        min_score: int = 0,
        allow_unverified: bool = False,
    ) -> job_pb2.Job:
        """Submit a job and return it (normally PENDING).

        ``tier`` is ``"guaranteed"`` (starts within its SLA, never preempted)
        or ``"spot"`` (cheaper, preemptible, resumed from its last checkpoint).
        A fresh uuid4 ``request_id`` is used when none is given, and UNAVAILABLE
        is retried a few times with that same id, so a retry never creates a
        second job.

        ``inputs`` maps a name (1-64 of letters, digits, ``_.-``) to a ``Path`` (a
        file or directory, packed and uploaded with :meth:`upload_input`) or to the
        sha256 that :meth:`upload_input` returned; the job finds each at
        ``$RIGSHIFT_INPUT_DIR/<name>``.

        ``python_requirements`` is the text of a pip requirements file (see
        :func:`requirements_text` to build it from a file and extra specs): the rig
        builds a virtual environment with it before the process starts (cached there,
        so a second job with the same requirements installs nothing), and the
        process runs with that environment first on ``PATH``.

        ``image`` is an OCI image reference (``ghcr.io/org/train:1.4``,
        ``registry:5000/x@sha256:...``): the command runs inside it, on a rig that runs
        containers (podman); ``python_requirements`` then install on top of the image's
        Python. ``registry_auth`` pulls it from a private registry: a containers auth file
        (``{"auths": {...}}``, as ``podman login`` writes it), its content as ``bytes`` or a
        path to it. The broker keeps it in memory only and sends it with this job's
        assignments alone; it never appears in a response.

        The rig the job needs (``docs/client.md``): ``min_pcie_gbps`` (measured host-to-device
        bandwidth per GPU; a mining riser's x1 link gives under 1), ``min_host_ram_gb_per_gpu``
        and ``min_cpu_cores_per_gpu`` (the rig's RAM and cores divided by its GPUs),
        ``min_score`` (the GPU's measured score, an RTX 3090 = 100). Only GPUs the broker
        verified take the job unless ``allow_unverified``.
        """
        auth = registry_auth_bytes(registry_auth) if registry_auth else b""
        input_shas = self._resolve_inputs(inputs or {})
        spec = job_spec(
            command,
            gpu_count=gpu_count,
            gpu_model=gpu_model,
            min_vram_mb=min_vram_mb,
            max_price_micros_per_gpu_hour=max_price_micros_per_gpu_hour,
            env=env,
            working_dir_sha256=working_dir_sha256,
            max_duration_seconds=max_duration_seconds,
            max_attempts=max_attempts,
            display_name=display_name,
            tier=tier,
            inputs=input_shas,
            python_requirements=python_requirements,
            image=image,
            min_pcie_gbps=min_pcie_gbps,
            min_host_ram_gb_per_gpu=min_host_ram_gb_per_gpu,
            min_cpu_cores_per_gpu=min_cpu_cores_per_gpu,
            min_score=min_score,
            allow_unverified=allow_unverified,
        )
        request = job_service_pb2.CreateJobRequest(
            spec=spec, request_id=request_id or str(uuid.uuid4()), registry_auth=auth
        )
        try:
            return self._retrying(lambda: self._unary(self._jobs.CreateJob, request))
        except RigshiftError as err:
            err.request_id = request.request_id  # retry with it: never a second job
            raise

    def quote_job(
        self,
        command: Sequence[str] = ("true",),
        *,
        gpu_count: int = 1,
        gpu_model: str = "",
        min_vram_mb: int = 0,
        max_price_micros_per_gpu_hour: int = 0,
        env: Mapping[str, str] | None = None,
        working_dir_sha256: str = "",
        max_duration_seconds: int = 0,
        max_attempts: int = 0,
        display_name: str = "",
        tier: str | int = "guaranteed",
        image: str = "",
        min_pcie_gbps: float = 0.0,
        min_host_ram_gb_per_gpu: int = 0,
        min_cpu_cores_per_gpu: float = 0.0,
        min_score: int = 0,
        allow_unverified: bool = False,
    ) -> job_service_pb2.QuoteJobResponse:
        """What a job with this spec would find now: matching GPUs, free ones, price range.

        Takes the same arguments as :meth:`create_job` (the command matters
        only for validation) and submits nothing; ``reasons`` say why the job
        could not be placed right now (an ``image`` needs a rig that runs containers);
        ``groups`` show the matching GPUs' score, verification and links.
        """
        spec = job_spec(
            command,
            gpu_count=gpu_count,
            gpu_model=gpu_model,
            min_vram_mb=min_vram_mb,
            max_price_micros_per_gpu_hour=max_price_micros_per_gpu_hour,
            env=env,
            working_dir_sha256=working_dir_sha256,
            max_duration_seconds=max_duration_seconds,
            max_attempts=max_attempts,
            display_name=display_name,
            tier=tier,
            image=image,
            min_pcie_gbps=min_pcie_gbps,
            min_host_ram_gb_per_gpu=min_host_ram_gb_per_gpu,
            min_cpu_cores_per_gpu=min_cpu_cores_per_gpu,
            min_score=min_score,
            allow_unverified=allow_unverified,
        )
        request = job_service_pb2.QuoteJobRequest(spec=spec)
        return self._retrying(lambda: self._unary(self._jobs.QuoteJob, request))

    def get_job(self, job: str) -> job_pb2.Job:
        """Return one job, with its attempts, history and pending reasons."""
        name = resource_name("jobs", job, "job")
        return self._unary(self._jobs.GetJob, job_service_pb2.GetJobRequest(name=name))

    def list_jobs(
        self,
        states: Sequence[int | str] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> job_service_pb2.ListJobsResponse:
        """Return one page of jobs, newest first, optionally only in ``states``.

        ``states`` are ``Job.State`` values or their names, e.g. ``["PENDING"]``.
        """
        request = job_service_pb2.ListJobsRequest(
            states=cast(Any, list(states)), page_size=page_size, page_token=page_token
        )
        return self._unary(self._jobs.ListJobs, request)

    def iter_jobs(
        self, states: Sequence[int | str] = (), *, page_size: int = 0
    ) -> Iterator[job_pb2.Job]:
        """Yield every job, newest first, following ``next_page_token``."""
        token = ""
        while True:
            page = self.list_jobs(states, page_size=page_size, page_token=token)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def cancel_job(self, job: str) -> job_pb2.Job:
        """Cancel a job that has not finished; cancelling a cancelled job is a no-op."""
        name = resource_name("jobs", job, "job")
        return self._unary(self._jobs.CancelJob, job_service_pb2.CancelJobRequest(name=name))

    def watch_job(self, job: str) -> Iterator[job_pb2.Job]:
        """Yield the job now and after every change, until it reaches a final state."""
        name = resource_name("jobs", job, "job")
        return self._stream(self._jobs.WatchJob, job_service_pb2.WatchJobRequest(name=name))

    def stream_logs(self, job: str, follow: bool = False) -> Iterator[job_service_pb2.LogChunk]:
        """Yield the job's output so far; with ``follow``, keep going until it finishes."""
        name = resource_name("jobs", job, "job")
        request = job_service_pb2.StreamJobLogsRequest(name=name, follow=follow)
        return self._stream(self._jobs.StreamJobLogs, request)

    def list_outputs(self, job: str) -> list[job_pb2.JobOutput]:
        """What the job's attempts wrote to ``$RIGSHIFT_OUTPUT_DIR``, oldest attempt first."""
        name = resource_name("jobs", job, "job")
        request = job_service_pb2.ListJobOutputsRequest(name=name)
        return list(self._unary(self._jobs.ListJobOutputs, request).outputs)
