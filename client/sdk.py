"""The synchronous Python SDK: one gRPC channel to the broker, typed methods.

::

    from client import Client

    with Client("127.0.0.1:50051") as rs:
        sha = rs.upload_working_dir("./train")
        print(rs.quote_job(["python", "train.py"], gpu_count=2, tier="spot"))
        job = rs.create_job(
            ["python", "train.py"], gpu_count=2, working_dir_sha256=sha,
            inputs={"data": Path("./data")},
        )
        for update in rs.watch_job(job.name):
            print(update.state)
        rs.download_outputs(job.name, "./results")

Methods return the ``rigshift.v1`` proto messages. Every failed RPC raises a
:class:`client.errors.RigshiftError` subclass. Job, farm and worker arguments
take either the bare id (``"abc"``) or the resource name (``"jobs/abc"``).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    RigshiftError,
    Unavailable,
    from_rpc_error,
)
from rigshift.archive import ArchiveError, pack_directory, safe_extract
from rigshift.credentials import lookup_api_key
from rigshift.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    farm_pb2,
    farm_service_pb2,
    farm_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

__all__ = [
    "DEFAULT_BROKER",
    "MAX_INPUT_BYTES",
    "MAX_UPLOAD_BYTES",
    "UPDATABLE_FARM_FIELDS",
    "Client",
    "build_input_archive",
    "build_update_farm_request",
    "build_working_dir_archive",
    "group_by_value",
    "requirements_text",
    "tier_value",
]

#: Where the broker listens when neither ``--broker`` nor ``RIGSHIFT_BROKER`` says otherwise.
DEFAULT_BROKER = "127.0.0.1:50051"
#: Largest working-directory archive the client will upload.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
#: Largest input archive the client will upload (the broker's default limit).
MAX_INPUT_BYTES = 10 * 1024**3
_CHUNK_BYTES = 1024 * 1024
_CREATE_ATTEMPTS = 4  # at least this many tries, however small the budget
_RETRY_BASE_DELAY_S = 0.2
_RETRY_MAX_DELAY_S = 5.0
_TRANSFER_TRIES = 5
"""Tries of an upload or download in a row that move no byte forward before giving up."""
_MIN_UPLOAD_BYTES_PER_S = 512 * 1024
"""An upload's deadline assumes at least this rate; past it, the upload resumes."""
_INPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: ``progress(done_bytes, total_bytes)``, called as a transfer moves (e.g. a ProgressBar).
Progress = Callable[[int, int], None]

T = TypeVar("T")


def _resource_name(collection: str, value: str, what: str) -> str:
    """``"abc"`` or ``"jobs/abc"`` → ``"jobs/abc"``; anything else is an InvalidArgument."""
    value = value.strip()
    prefix = f"{collection}/"
    if value.startswith(prefix) and "/" not in value[len(prefix) :] and value != prefix:
        return value
    if value and "/" not in value:
        return prefix + value
    raise InvalidArgument(
        f"{what}: expected an id or '{collection}/{{id}}', got {value!r}",
        reason="INVALID_RESOURCE_NAME",
        field_violations=[(what, f"expected an id or '{collection}/{{id}}'")],
    )


def tier_value(tier: str | int) -> int:
    """``"guaranteed"``/``"spot"`` (any case) or a ``Tier`` value → the ``Tier`` value."""
    if isinstance(tier, int) and not isinstance(tier, bool):
        if tier in job_pb2.Tier.values():
            return tier
    elif isinstance(tier, str) and tier.strip().upper() in ("GUARANTEED", "SPOT"):
        return job_pb2.Tier.Value(tier.strip().upper())
    raise InvalidArgument(
        f"tier: expected 'guaranteed' or 'spot', got {tier!r}",
        reason="INVALID_TIER",
        field_violations=[("spec.tier", "expected 'guaranteed' or 'spot'")],
    )


_GROUP_BY = {
    "farm": farm_service_pb2.GetEarningsRequest.FARM,
    "worker": farm_service_pb2.GetEarningsRequest.WORKER,
    "gpu": farm_service_pb2.GetEarningsRequest.GPU,
}


def group_by_value(group_by: str) -> int:
    """``"farm"``, ``"worker"`` or ``"gpu"`` (any case) → ``GetEarningsRequest.GroupBy``."""
    value = _GROUP_BY.get(group_by.strip().lower()) if isinstance(group_by, str) else None
    if value is None:
        raise InvalidArgument(
            f"group_by: expected 'farm', 'worker' or 'gpu', got {group_by!r}",
            reason="INVALID_GROUP_BY",
            field_violations=[("group_by", "expected 'farm', 'worker' or 'gpu'")],
        )
    return value


def _job_spec(
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
    inputs: Mapping[str, str] | None = None,
    python_requirements: str = "",
) -> job_pb2.JobSpec:
    if isinstance(command, str):
        raise TypeError("command is an argv list, e.g. ['python', 'train.py'], not a str")
    return job_pb2.JobSpec(
        command=list(command),
        env=dict(env or {}),
        gpu_count=gpu_count,
        gpu_model=gpu_model,
        min_vram_mb=min_vram_mb,
        max_price_micros_per_gpu_hour=max_price_micros_per_gpu_hour,
        max_duration_seconds=max_duration_seconds,
        working_dir_sha256=working_dir_sha256,
        max_attempts=max_attempts,
        display_name=display_name,
        tier=cast(Any, tier_value(tier)),
        inputs=dict(inputs or {}),
        environment=job_pb2.Environment(python_requirements=python_requirements)
        if python_requirements
        else None,
    )


def requirements_text(
    requirements_file: str | os.PathLike[str] | None = None, pip: Sequence[str] = ()
) -> str:
    """A requirements file's text plus one line per extra spec (``--pip numpy==2.1``)."""
    text = ""
    if requirements_file is not None:
        try:
            text = Path(requirements_file).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidArgument(
                f"requirements: cannot read {str(requirements_file)!r}: {err}",
                reason="BAD_REQUIREMENTS_FILE",
                field_violations=[("spec.environment.python_requirements", str(err))],
            ) from None
        if text and not text.endswith("\n"):
            text += "\n"
    return text + "".join(f"{spec}\n" for spec in pip)


def _tariff_windows(windows: Sequence[tuple[int, int, int]]) -> list[farm_pb2.TariffWindow]:
    return [
        farm_pb2.TariffWindow(start_hour=start, end_hour=end, micros_per_kwh=price)
        for start, end, price in windows
    ]


#: The Farm fields :meth:`Client.update_farm` can change, in mask order.
UPDATABLE_FARM_FIELDS = (
    "region",
    "tariff_micros_per_kwh",
    "pue_permille",
    "mining_micros_per_kwh",
    "ask_micros_per_gpu_hour",
    "broker_fee_permille",
    "margin_micros_per_gpu_hour",
    "tariff_windows",
)


def build_update_farm_request(
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
) -> farm_service_pb2.UpdateFarmRequest:
    """The UpdateFarm request for ``farm``: its ``update_mask`` names exactly the fields not None.

    A field passed as ``0``, ``{}`` or ``()`` is in the mask, so the broker
    clears it; a map or the window list is replaced whole. Raises
    InvalidArgument when no field is given (an empty mask would mean "every
    set field" to the broker, which is never what a caller of this means).
    """
    values: dict[str, Any] = {
        "region": region,
        "tariff_micros_per_kwh": tariff_micros_per_kwh,
        "pue_permille": pue_permille,
        "mining_micros_per_kwh": mining_micros_per_kwh,
        "ask_micros_per_gpu_hour": ask_micros_per_gpu_hour,
        "broker_fee_permille": broker_fee_permille,
        "margin_micros_per_gpu_hour": margin_micros_per_gpu_hour,
        "tariff_windows": tariff_windows,
    }
    paths = [field for field in UPDATABLE_FARM_FIELDS if values[field] is not None]
    if not paths:
        raise InvalidArgument(
            "update_farm: nothing to update; pass at least one field",
            reason="EMPTY_UPDATE",
            field_violations=[("update_mask", "names no field")],
        )
    msg = farm_pb2.Farm(name=_resource_name("farms", farm, "farm"))
    for field in paths:
        value = values[field]
        if field in ("mining_micros_per_kwh", "ask_micros_per_gpu_hour"):
            getattr(msg, field).update(dict(value))
        elif field == "tariff_windows":
            msg.tariff_windows.extend(_tariff_windows(value))
        else:
            setattr(msg, field, value)
    return farm_service_pb2.UpdateFarmRequest(
        farm=msg, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )


def build_working_dir_archive(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """Pack a directory into a deterministic tar.gz, in memory.

    Entries are sorted and stripped of mtimes, owners and the gzip timestamp,
    so the same tree always gives the same bytes (and sha256). Raises
    InvalidArgument when ``path`` is not a directory or the archive grows past
    ``max_bytes``.
    """
    root = Path(path)
    if not root.is_dir():
        raise InvalidArgument(
            f"working_dir: not a directory: {str(root)!r}",
            reason="WORKING_DIR_NOT_A_DIRECTORY",
            field_violations=[("working_dir", "not a directory")],
        )
    try:
        return pack_directory(root, max_bytes=max_bytes)  # the same bytes the agent packs
    except ArchiveError as err:
        raise InvalidArgument(
            f"working_dir: archive of {str(root)!r} is over the {max_bytes} byte limit",
            reason="WORKING_DIR_TOO_LARGE",
            metadata={"max_bytes": str(max_bytes)},
            field_violations=[("working_dir", f"archive larger than {max_bytes} bytes")],
        ) from err


def check_input_name(name: str) -> str:
    """The name if it is 1-64 of letters, digits, ``_.-`` (starting with a letter or digit)."""
    if not isinstance(name, str) or not _INPUT_NAME.match(name):
        raise InvalidArgument(
            f"input name {name!r}: must be 1-64 of letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)",
            reason="INVALID_INPUT_NAME",
            field_violations=[("spec.inputs", "name must be 1-64 of letters, digits, `_.-`")],
        )
    return name


def build_input_archive(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """Pack an input into a deterministic tar.gz, in memory.

    A directory packs its contents (the job finds them under
    ``$RIGSHIFT_INPUT_DIR/NAME/``); a single file packs as that file under its own
    name (``$RIGSHIFT_INPUT_DIR/NAME/<filename>``). The archive is built in memory,
    so an input needs that much free RAM. InvalidArgument when ``path`` is neither,
    or the archive grows past ``max_bytes``.
    """
    src = Path(path)
    try:
        if src.is_dir():
            return pack_directory(src, max_bytes=max_bytes)
        if not src.is_file():
            raise InvalidArgument(
                f"input: not a file or directory: {str(src)!r}",
                reason="INPUT_NOT_FOUND",
                field_violations=[("inputs", "not a file or directory")],
            )
        with tempfile.TemporaryDirectory(prefix="rigshift-input-") as tmp:
            staged = Path(tmp) / src.name
            try:
                os.link(src, staged)  # no copy when the temp dir shares the file system
            except OSError:
                shutil.copyfile(src, staged)
                shutil.copymode(src, staged)
            return pack_directory(Path(tmp), max_bytes=max_bytes)
    except ArchiveError as err:
        raise InvalidArgument(
            f"input: archive of {str(src)!r} is over the {max_bytes} byte limit",
            reason="INPUT_TOO_LARGE",
            metadata={"max_bytes": str(max_bytes)},
            field_violations=[("inputs", f"archive larger than {max_bytes} bytes")],
        ) from err


def _check_download_dir(dest: Path) -> None:
    """Refuse a destination that exists and is not an empty directory."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidArgument(
            f"{str(dest)!r} exists and is not an empty directory; "
            "download into a new or empty directory",
            reason="DOWNLOAD_DIR_NOT_EMPTY",
            field_violations=[("dir", "exists and is not empty")],
        )


class Client:
    """A synchronous connection to the broker's JobService, FarmService and ArtifactService.

    One gRPC channel, opened lazily by gRPC on the first call. Use as a
    context manager or call :meth:`close`. ``timeout_s`` bounds every unary
    call; streams (:meth:`watch_job`, :meth:`stream_logs`) run until the
    broker ends them. ``metadata`` is sent with every call.
    """

    def __init__(
        self,
        address: str = DEFAULT_BROKER,
        *,
        timeout_s: float = 30.0,
        metadata: Sequence[tuple[str, str]] = (),
        api_key: str | None = None,
        tls_ca: str | None = None,
        retry_budget_s: float = 60.0,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        #: How long idempotent calls (CreateJob with its request id) keep retrying UNAVAILABLE.
        self.retry_budget_s = retry_budget_s
        # The key: explicit, else $RIGSHIFT_API_KEY, else $RIGSHIFT_HOME/credentials.
        key = api_key if api_key is not None else lookup_api_key(address)
        auth = (("authorization", f"Bearer {key}"),) if key else ()
        self._metadata = (*auth, *tuple(metadata))
        ca = tls_ca if tls_ca is not None else os.environ.get("RIGSHIFT_TLS_CA", "")
        if ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
            self._channel = grpc.secure_channel(address, creds)
        else:
            self._channel = grpc.insecure_channel(address)
        self._jobs = job_service_pb2_grpc.JobServiceStub(self._channel)
        self._farms = farm_service_pb2_grpc.FarmServiceStub(self._channel)
        self._artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(self._channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(self._channel)

    @classmethod
    def from_env(cls, **kwargs: Any) -> Client:
        """A client for ``$RIGSHIFT_BROKER`` (default ``127.0.0.1:50051``)."""
        return cls(os.environ.get("RIGSHIFT_BROKER") or DEFAULT_BROKER, **kwargs)

    def close(self) -> None:
        """Close the channel; safe to call twice."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r})"

    # -- plumbing -----------------------------------------------------------

    def _unary(self, method: Callable[..., T], request: object) -> T:
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _retrying(self, call: Callable[[], T]) -> T:
        """Run an idempotent call, retrying UNAVAILABLE for up to ``retry_budget_s``:
        the broker's ``RetryInfo`` delay when it sends one (e.g. 1 s with
        ``DATABASE_UNAVAILABLE`` during a database outage; 0-20 % jitter added), else
        exponential backoff (0.2 s doubling, at most 5 s)."""
        deadline = time.monotonic() + self.retry_budget_s
        for attempt in itertools.count():
            try:
                return call()
            except Unavailable as err:
                if err.retry_after_s is not None:  # the broker knows best; jitter spreads clients
                    delay = min(err.retry_after_s, _RETRY_MAX_DELAY_S) * random.uniform(1.0, 1.2)
                else:
                    delay = min(_RETRY_BASE_DELAY_S * 2**attempt, _RETRY_MAX_DELAY_S)
                if attempt + 1 >= _CREATE_ATTEMPTS and time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _stream(self, method: Callable[..., Any], request: object) -> Iterator[Any]:
        call = method(request, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()  # no-op when the stream already ended; frees it when abandoned

    # -- jobs ---------------------------------------------------------------

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
        """
        input_shas = self._resolve_inputs(inputs or {})
        spec = _job_spec(
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
        )
        request = job_service_pb2.CreateJobRequest(
            spec=spec, request_id=request_id or str(uuid.uuid4())
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
    ) -> job_service_pb2.QuoteJobResponse:
        """What a job with this spec would find now: matching GPUs, free ones, price range.

        Takes the same arguments as :meth:`create_job` (the command matters
        only for validation) and submits nothing; ``reasons`` say why the job
        could not be placed right now.
        """
        spec = _job_spec(
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
        )
        request = job_service_pb2.QuoteJobRequest(spec=spec)
        return self._retrying(lambda: self._unary(self._jobs.QuoteJob, request))

    def _resolve_inputs(self, inputs: Mapping[str, str | os.PathLike[str]]) -> dict[str, str]:
        """name -> sha256, uploading the inputs given as paths."""
        out = {}
        for name, value in inputs.items():
            check_input_name(name)
            if isinstance(value, os.PathLike):
                out[name] = self.upload_input(value)
            elif isinstance(value, str) and _SHA256.match(value):
                out[name] = value
            else:
                raise InvalidArgument(
                    f"input {name!r}: expected a Path or the sha256 upload_input() returned, "
                    f"got {value!r}",
                    reason="INVALID_INPUT",
                    field_violations=[(f"spec.inputs[{name!r}]", "a Path or a hex sha256")],
                )
        return out

    def get_job(self, job: str) -> job_pb2.Job:
        """Return one job, with its attempts, history and pending reasons."""
        name = _resource_name("jobs", job, "job")
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
        name = _resource_name("jobs", job, "job")
        return self._unary(self._jobs.CancelJob, job_service_pb2.CancelJobRequest(name=name))

    def watch_job(self, job: str) -> Iterator[job_pb2.Job]:
        """Yield the job now and after every change, until it reaches a final state."""
        name = _resource_name("jobs", job, "job")
        return self._stream(self._jobs.WatchJob, job_service_pb2.WatchJobRequest(name=name))

    def stream_logs(self, job: str, follow: bool = False) -> Iterator[job_service_pb2.LogChunk]:
        """Yield the job's output so far; with ``follow``, keep going until it finishes."""
        name = _resource_name("jobs", job, "job")
        request = job_service_pb2.StreamJobLogsRequest(name=name, follow=follow)
        return self._stream(self._jobs.StreamJobLogs, request)

    def list_outputs(self, job: str) -> list[job_pb2.JobOutput]:
        """What the job's attempts wrote to ``$RIGSHIFT_OUTPUT_DIR``, oldest attempt first."""
        name = _resource_name("jobs", job, "job")
        request = job_service_pb2.ListJobOutputsRequest(name=name)
        return list(self._unary(self._jobs.ListJobOutputs, request).outputs)

    def download_outputs(
        self,
        job: str,
        dir: str | os.PathLike[str],
        attempt: int = 0,
        *,
        progress: Progress | None = None,
    ) -> Path:
        """Download an attempt's output (0: the latest kept one) and unpack it into ``dir``.

        ``dir`` must not exist or be empty (else InvalidArgument,
        ``DOWNLOAD_DIR_NOT_EMPTY``). The archive is fetched next to it, resuming a
        broken stream where it stopped, checked against its sha256 and unpacked into
        a temporary directory that is then renamed to ``dir``: an interrupted
        download leaves no half-filled ``dir``. Returns ``dir``. The broker answers
        NotFound (``NO_OUTPUT``, ``OUTPUT_EXPIRED``) or FailedPrecondition
        (``OUTPUT_OVER_LIMIT``) when there is nothing to fetch.
        """
        name = _resource_name("jobs", job, "job")
        dest = Path(dir)
        _check_download_dir(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.download-", dir=dest.parent))
        try:
            archive = work / "output.tar.gz"
            self._fetch_output(name, attempt, archive, progress)
            tree = work / "tree"
            try:
                safe_extract(archive, tree)
            except (ArchiveError, tarfile.TarError) as err:
                raise InternalError(
                    f"the output archive of {name} cannot be unpacked: {err}",
                    code=grpc.StatusCode.DATA_LOSS,
                    reason="OUTPUT_ARCHIVE_INVALID",
                ) from err
            _check_download_dir(dest)  # again: something may have appeared meanwhile
            os.replace(tree, dest)  # atomic; replaces an empty directory
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return dest

    def _fetch_output(
        self, name: str, attempt: int, archive: Path, progress: Progress | None
    ) -> None:
        """Stream an output archive into ``archive``, resuming at the bytes already written."""
        digest = hashlib.sha256()
        sha256, size, got, failures = "", -1, 0, 0
        with archive.open("wb") as f:
            while True:
                request = job_service_pb2.DownloadJobOutputRequest(
                    name=name, attempt=attempt, offset=got
                )
                before = got
                try:
                    for chunk in self._stream(self._jobs.DownloadJobOutput, request):
                        if chunk.sha256:
                            if sha256 and chunk.sha256 != sha256:
                                raise InternalError(
                                    f"the output of {name} changed while it was downloaded",
                                    code=grpc.StatusCode.DATA_LOSS,
                                    reason="OUTPUT_CHANGED",
                                )
                            sha256, size = chunk.sha256, chunk.size_bytes
                            attempt = chunk.attempt  # a resume asks for this very attempt
                            if progress is not None:
                                progress(got, size)
                        f.write(chunk.data)
                        digest.update(chunk.data)
                        got += len(chunk.data)
                        if progress is not None:
                            progress(got, size)
                    break
                except (Unavailable, DeadlineExceeded):
                    failures = 0 if got > before else failures + 1
                    if failures >= _TRANSFER_TRIES:
                        raise
                    time.sleep(_RETRY_BASE_DELAY_S * 2 ** min(failures, 5))
        if got != size or digest.hexdigest() != sha256:
            raise InternalError(
                f"the output of {name} arrived as {got} bytes hashing to "
                f"{digest.hexdigest()}, expected {size} bytes with sha256 {sha256}",
                code=grpc.StatusCode.DATA_LOSS,
                reason="OUTPUT_DIGEST_MISMATCH",
            )

    # -- farms and workers --------------------------------------------------

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
            tariff_windows=_tariff_windows(tariff_windows),
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
    ) -> farm_pb2.Farm:
        """Change only the fields passed (not None) and return the farm with its new floors.

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
        parent = _resource_name("farms", farm, "farm") if farm else ""
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
        name = _resource_name("farms", farm, "farm")
        return self._unary(self._farms.GetFarm, farm_service_pb2.GetFarmRequest(name=name))

    def list_workers(
        self, farm: str = "", page_size: int = 0, page_token: str = ""
    ) -> farm_service_pb2.ListWorkersResponse:
        """Return one page of the workers of ``farm``, or of every farm when empty."""
        parent = _resource_name("farms", farm, "farm") if farm else ""
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
        name = _resource_name("workers", worker, "worker")
        request = farm_service_pb2.DrainWorkerRequest(name=name)
        return self._unary(self._farms.DrainWorker, request)

    # -- artifacts ----------------------------------------------------------

    # --- admin ------------------------------------------------------------------

    def create_api_key(
        self, role: str, principal: str, *, farm: str = ""
    ) -> admin_service_pb2.ApiKey:
        """Issue an API key (admin only); ``role`` is client, operator or admin.

        The returned message carries the secret in ``key``; it is shown only once.
        """
        request = admin_service_pb2.CreateApiKeyRequest(
            role=role.upper(),
            principal=principal,
            farm=_resource_name("farms", farm, "farm") if farm else "",
        )
        return self._unary(self._admin.CreateApiKey, request)

    def list_api_keys(self) -> admin_service_pb2.ListApiKeysResponse:
        """Every API key, without secrets (admin only)."""
        return self._unary(self._admin.ListApiKeys, admin_service_pb2.ListApiKeysRequest())

    def revoke_api_key(self, name: str) -> admin_service_pb2.ApiKey:
        """Revoke a key by its name, ``apiKeys/ID`` or ``ID`` (admin only)."""
        return self._unary(
            self._admin.RevokeApiKey,
            admin_service_pb2.RevokeApiKeyRequest(name=_resource_name("apiKeys", name, "api key")),
        )

    def upload_working_dir(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = MAX_UPLOAD_BYTES,
        progress: Progress | None = None,
    ) -> str:
        """Pack ``path`` as a deterministic tar.gz, upload it and return its hex sha256.

        Pass the result as ``working_dir_sha256`` to :meth:`create_job`. The
        archive is refused locally (InvalidArgument) when over ``max_bytes``;
        an archive the broker already has is not sent again (see :meth:`upload_archive`).
        """
        data = build_working_dir_archive(path, max_bytes=max_bytes)
        return self.upload_archive(data, progress=progress)

    def upload_input(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = MAX_INPUT_BYTES,
        progress: Progress | None = None,
    ) -> str:
        """Pack a file or directory as job input (:func:`build_input_archive`), upload it
        with purpose INPUT and return its hex sha256, for ``create_job(inputs={name: sha})``.
        """
        data = build_input_archive(path, max_bytes=max_bytes)
        return self.upload_archive(data, purpose=artifact_service_pb2.INPUT, progress=progress)

    def upload_archive(
        self,
        data: bytes,
        *,
        purpose: int = artifact_service_pb2.ARTIFACT_PURPOSE_UNSPECIFIED,
        progress: Progress | None = None,
    ) -> str:
        """Upload an archive unless the broker has it already; return its hex sha256.

        Asks GetUploadStatus first: a stored archive is not sent again, and an
        interrupted upload resumes from the bytes the broker kept. A broken connection
        (UNAVAILABLE, a deadline) is retried with backoff, each time from the broker's
        count, until five tries in a row move nothing forward. ``purpose`` is an
        ``ArtifactPurpose`` (its limit applies); ``progress(done, total)`` follows it.
        """
        digest = hashlib.sha256(data).hexdigest()
        total = len(data)
        failures, restarted, best = 0, False, -1
        while True:
            offset = 0
            try:
                status = self._upload_status(digest)
                if status is not None and status.complete:
                    if progress is not None:
                        progress(total, total)
                    return digest
                if status is not None and status.received_bytes <= total and not restarted:
                    offset = status.received_bytes
                if offset > best:
                    best, failures = offset, 0  # the broker kept more than before
                self._send_archive(data, digest, offset, purpose, progress)
                return digest
            except (Unavailable, DeadlineExceeded):
                pass
            except FailedPrecondition as err:  # raced with another upload of the same bytes
                if err.reason not in ("UPLOAD_OFFSET_MISMATCH", "UPLOAD_IN_PROGRESS"):
                    raise
            except InvalidArgument:
                if offset == 0 or restarted:
                    raise
                restarted = True  # what the broker kept did not fit our bytes: start over
                continue
            restarted = False
            failures += 1
            if failures >= _TRANSFER_TRIES:
                raise Unavailable(
                    f"upload of {digest} made no progress in {_TRANSFER_TRIES} tries",
                    reason="UPLOAD_STALLED",
                    metadata={"sha256": digest},
                )
            time.sleep(_RETRY_BASE_DELAY_S * 2 ** min(failures, 5))

    def _upload_status(self, digest: str) -> artifact_service_pb2.UploadStatus | None:
        """The broker's UploadStatus; None from a broker that cannot resume uploads."""
        request = artifact_service_pb2.GetUploadStatusRequest(sha256=digest)
        try:
            return self._unary(self._artifacts.GetUploadStatus, request)
        except InternalError as err:
            if err.code == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise

    def _send_archive(
        self, data: bytes, digest: str, offset: int, purpose: int, progress: Progress | None
    ) -> None:
        """One UploadArtifact stream of ``data[offset:]``."""
        total = len(data)

        def chunks() -> Iterator[artifact_service_pb2.UploadArtifactRequest]:
            pos = offset
            if progress is not None:
                progress(pos, total)
            while True:
                piece = data[pos : pos + _CHUNK_BYTES]
                if pos == offset:
                    yield artifact_service_pb2.UploadArtifactRequest(
                        sha256=digest,
                        size_bytes=total,
                        offset=offset,
                        purpose=cast(Any, purpose),
                        data=piece,
                    )
                else:
                    yield artifact_service_pb2.UploadArtifactRequest(data=piece)
                pos += len(piece)
                if progress is not None:
                    progress(pos, total)
                if pos >= total:
                    return

        timeout = self.timeout_s + (total - offset) / _MIN_UPLOAD_BYTES_PER_S
        try:
            artifact = self._artifacts.UploadArtifact(
                chunks(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        if artifact.sha256 and artifact.sha256 != digest:
            raise InternalError(
                f"broker stored sha256 {artifact.sha256}, expected {digest}",
                code=grpc.StatusCode.DATA_LOSS,
                reason="ARTIFACT_DIGEST_MISMATCH",
            )
