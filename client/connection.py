"""One gRPC channel to the broker, its stubs, and how calls on it fail and are retried.

:class:`Connection` is the base of :class:`client.sdk.Client`: the jobs, farms and
transfer methods (:mod:`client.jobs`, :mod:`client.farms`, :mod:`client.transfers`)
call the broker through its ``_unary``, ``_stream`` and ``_retrying``, which turn
every failed RPC into a :class:`client.errors.RigshiftError`.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc

from client.errors import Unavailable, from_rpc_error
from rigshift.credentials import lookup_api_key
from rigshift.defaults import BROKER_ADDRESS
from rigshift.v1 import (
    admin_service_pb2_grpc,
    artifact_service_pb2_grpc,
    farm_service_pb2_grpc,
    job_service_pb2_grpc,
)

__all__ = ["DEFAULT_BROKER", "RETRY_BASE_DELAY_S", "Connection"]

#: Where the broker listens when neither ``--broker`` nor ``RIGSHIFT_BROKER`` says otherwise.
DEFAULT_BROKER = BROKER_ADDRESS
CREATE_ATTEMPTS = 4  # at least this many tries, however small the budget
#: First delay of an exponential backoff (doubling up to ``RETRY_MAX_DELAY_S``).
RETRY_BASE_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 5.0

T = TypeVar("T")


class Connection:
    """The channel and the service stubs behind :class:`client.sdk.Client` (its arguments)."""

    def __init__(
        self,
        address: str = DEFAULT_BROKER,
        *,
        timeout_s: float = 30.0,
        metadata: Sequence[tuple[str, str]] = (),
        api_key: str | None = None,
        tls_ca: str | None = None,
        retry_budget_s: float = 60.0,
        on_retry: Callable[[Unavailable, float], None] | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        #: How long idempotent calls (CreateJob with its request id) keep retrying UNAVAILABLE.
        self.retry_budget_s = retry_budget_s
        #: Called once per call that starts retrying, with the error and the budget (seconds):
        #: the CLI says it is retrying instead of waiting silently.
        self.on_retry = on_retry
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
    def from_env(cls, **kwargs: Any) -> Self:
        """A client for ``$RIGSHIFT_BROKER`` (default ``127.0.0.1:50051``)."""
        return cls(os.environ.get("RIGSHIFT_BROKER") or DEFAULT_BROKER, **kwargs)

    def close(self) -> None:
        """Close the channel; safe to call twice."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"

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
                    delay = min(err.retry_after_s, RETRY_MAX_DELAY_S) * random.uniform(1.0, 1.2)
                else:
                    delay = min(RETRY_BASE_DELAY_S * 2**attempt, RETRY_MAX_DELAY_S)
                if attempt + 1 >= CREATE_ATTEMPTS and time.monotonic() + delay > deadline:
                    raise
                if attempt == 0 and self.on_retry is not None:
                    self.on_retry(err, self.retry_budget_s)
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
