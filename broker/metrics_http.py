"""The broker's metrics port: ``/metrics`` and ``/sd`` over HTTP (aiohttp).

Served on the broker's own event loop, so the fleet collector reads the core
from the only thread that changes it and a scrape sees one consistent state.
``/sd`` is Prometheus HTTP service discovery: one target group per agent
exporter (``broker.metrics.sd_targets``).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["MetricsServer"]


class MetricsServer:
    """``/metrics`` and ``/sd`` over HTTP, served on the broker's own event loop."""

    def __init__(self, registry: CollectorRegistry, sd: Callable[[], list[dict[str, Any]]]):
        self.registry = registry
        self.sd = sd
        self.address = ""
        self._runner: web.AppRunner | None = None

    async def start(self, listen: str) -> str:
        """Bind ``host:port`` (port 0 picks a free one) and return the bound host:port."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            sock.setblocking(False)
        except (OSError, ValueError) as err:
            sock.close()
            raise OSError(f"cannot serve metrics on {listen}: {err}") from err
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/sd", self._sd)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        bound = sock.getsockname()[1]
        self.address = f"[{host}]:{bound}" if family == socket.AF_INET6 else f"{host}:{bound}"
        return self.address

    async def stop(self) -> None:
        """Stop serving (safe to call twice)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _sd(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self.sd()), content_type="application/json")
