"""The unit tier's rule, enforced: a unit test starts no process, no server, no Ray and
opens no network connection (tests/README.md). Each of those raises ``TierViolation``
here, naming what the test tried, so a test that needs one moves to tests/integration
(or tests/ray) instead of slowing the fast tier down.

Unix sockets stay allowed (an asyncio event loop makes a socket pair for itself).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest


class TierViolation(AssertionError):
    """A unit test did what only integration, Ray or end-to-end tests may do."""


_tried: list[str] = []  # what the running test tried, even where the code caught the error


def _violation(what: str) -> TierViolation:
    _tried.append(what)
    return TierViolation(f"a unit test may not {what}: move the test to tests/integration")


def _refuse(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _violation(what)

    return refuse


_INET = (socket.AF_INET, socket.AF_INET6)


def _guard_socket(method: str) -> Any:
    real = getattr(socket.socket, method)

    def guarded(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
        if self.family in _INET:
            raise _violation(f"{method} a network socket")
        return real(self, *args, **kwargs)

    return guarded


@pytest.fixture(autouse=True)
def _unit_tier(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
    for name in ("fork", "system", "posix_spawn", "posix_spawnp"):
        monkeypatch.setattr(os, name, _refuse("start a process"))
    for method in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, method, _guard_socket(method))
    import grpc
    import grpc.aio

    monkeypatch.setattr(grpc, "server", _refuse("start a gRPC server"))
    monkeypatch.setattr(grpc.aio, "server", _refuse("start a gRPC server"))
    ray = sys.modules.get("ray")
    if ray is not None:
        monkeypatch.setattr(ray, "init", _refuse("start Ray"))
    _tried.clear()
    yield
    tried, ray_imported = list(_tried), ray is None and "ray" in sys.modules
    _tried.clear()
    if tried:
        pytest.fail(f"a unit test may not {', '.join(tried)}: move it to tests/integration")
    if ray_imported:
        pytest.fail("a unit test imported Ray: move it to tests/ray")
