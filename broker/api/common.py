"""What every servicer shares: admitting a call, mapping its errors, who may see what, paging.

A handler is wrapped in :func:`unary` (unary and client-streaming methods) or
:func:`streaming` (server-streaming methods): the wrapper authenticates, authorises and
rate-limits the caller (:func:`admit`), refuses a malformed request, and sends every
error through the boundary (``broker.api.boundary``).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import grpc

from broker import validation as v
from broker.api.boundary import abort_internal, abort_with, well_formed
from broker.auth import Role, authorize, current, set_current
from broker.core import Job
from broker.errors import BrokerError, PermissionDenied
from broker.service import BrokerService

__all__ = [
    "Servicer",
    "admit",
    "call_metadata",
    "farm_scope",
    "own_job",
    "page",
    "streaming",
    "unary",
]


class Servicer(Protocol):
    """What the wrappers need of a servicer: its service's name and the broker's shell."""

    SERVICE: str
    svc: BrokerService


S = TypeVar("S", bound=Servicer)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")


def call_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """The call's invocation metadata as (key, value) pairs."""
    return tuple((k, v) for k, v in (context.invocation_metadata() or ()))


def admit(servicer: Servicer, method: str, context: grpc.aio.ServicerContext) -> None:
    """Authenticate, authorise and rate-limit one call; binds the caller for ``auth.current``."""
    svc = servicer.svc
    principal = svc.authenticate(call_metadata(context))
    authorize(f"{servicer.SERVICE}/{method}", principal)
    if principal is not None and principal.role in (Role.CLIENT, Role.OPERATOR):
        svc.rate_limiter.check(f"{principal.role.value}:{principal.name}", svc.clock())
    set_current(principal)


def unary(
    fn: Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Admit the caller and map errors of a unary (or client-streaming) method."""

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            admit(self, fn.__name__, context)
            return await fn(self, well_formed(request), context)
        except grpc.aio.AbortError:
            raise
        except BrokerError as err:
            await abort_with(context, err)
        except Exception:
            await abort_internal(context, fn.__name__)

    return wrapper


def streaming(
    fn: Callable[[S, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[S, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    """Admit the caller and map errors of a server-streaming method."""

    @functools.wraps(fn)
    async def wrapper(
        self: S, request: Req, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Resp]:
        try:
            admit(self, fn.__name__, context)
            async for item in fn(self, well_formed(request), context):
                yield item
        except grpc.aio.AbortError:
            raise
        except BrokerError as err:
            await abort_with(context, err)
        except Exception:
            await abort_internal(context, fn.__name__)

    return wrapper


def own_job(svc: BrokerService, name: str) -> Job:
    """The job, if the caller may see it: clients only their own, admins every job (a
    finished one the core has let go of is read from the store)."""
    job = svc.read_job(v.parse_name(name, "jobs"))
    who = current()
    if who.role != Role.ADMIN and job.owner != who.name:
        raise PermissionDenied(
            f"jobs/{job.job_id} belongs to another client", reason="NOT_YOUR_JOB"
        )
    return job


def farm_scope(parent: str, field: str = "parent") -> str:
    """The farm a farm-scoped call may look at: operators only their own."""
    who = current()
    farm_id = ""
    if parent not in ("", "farms/-"):
        farm_id = v.parse_name(parent, "farms", field)
    if who.role == Role.OPERATOR:
        if farm_id and farm_id != who.farm_id:
            raise PermissionDenied(
                f"operator {who.name!r} manages farms/{who.farm_id}, not farms/{farm_id}",
                reason="NOT_YOUR_FARM",
            )
        return who.farm_id
    return farm_id


def page(items: Sequence[T], limit: int, offset: int) -> tuple[Sequence[T], str]:
    """One AIP-158 page of ``items`` (``limit``, ``offset`` from ``validation.check_page``)
    and the token of the next page ("" after the last)."""
    more = offset + limit < len(items)
    return items[offset : offset + limit], f"o{offset + limit}" if more else ""
