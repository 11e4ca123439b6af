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

from client.connection import DEFAULT_BROKER
from client.farms import FarmMethods
from client.jobs import JobMethods
from client.messages import (
    UPDATABLE_FARM_FIELDS,
    build_update_farm_request,
    check_input_name,
    group_by_value,
    requirements_text,
    tier_value,
)
from client.transfers import (
    MAX_INPUT_BYTES,
    MAX_UPLOAD_BYTES,
    Progress,
    build_input_archive,
    build_working_dir_archive,
)

__all__ = [
    "DEFAULT_BROKER",
    "MAX_INPUT_BYTES",
    "MAX_UPLOAD_BYTES",
    "UPDATABLE_FARM_FIELDS",
    "Client",
    "Progress",
    "build_input_archive",
    "build_update_farm_request",
    "build_working_dir_archive",
    "check_input_name",
    "group_by_value",
    "requirements_text",
    "tier_value",
]


class Client(JobMethods, FarmMethods):
    """A synchronous connection to the broker's JobService, FarmService and ArtifactService.

    One gRPC channel, opened lazily by gRPC on the first call. Use as a
    context manager or call :meth:`close`. ``timeout_s`` bounds every unary
    call; streams (:meth:`watch_job`, :meth:`stream_logs`) run until the
    broker ends them. ``metadata`` is sent with every call.

    The methods live by subject: jobs in :mod:`client.jobs`, uploads and
    downloads in :mod:`client.transfers`, farms, workers, earnings and API keys
    in :mod:`client.farms`, the channel and retries in :mod:`client.connection`.
    """
