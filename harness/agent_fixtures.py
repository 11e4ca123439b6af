"""Builders and fakes for the agent's tests (in the spirit of Kubernetes' ``st.MakeNode()``).

Only name what a test is about; everything else gets a default::

    clock = FakeClock()
    backend = SimulatedBackend("RTX3090x4", clock=clock)
    a = make_assignment("jobs/j1", gpus=[0, 1], command=["python", "-c", "print(1)"])
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.gpu import GpuInfo, GpuTelemetry, SimulatedBackend

T = TypeVar("T")

__all__ = [
    "CounterlessBackend",
    "FakeClock",
    "TcpProxy",
    "make_assignment",
    "numeric_integral_j",
]


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.t += seconds


def numeric_integral_j(
    backend: SimulatedBackend, index: int, load: str, t0: float, t1: float, steps: int = 20_000
) -> float:
    """Trapezoid integral of the simulated power model over [t0, t1], joules (test oracle)."""
    h = (t1 - t0) / steps
    total = 0.5 * (
        backend.model_power_watts(index, load, t0) + backend.model_power_watts(index, load, t1)
    )
    total += sum(backend.model_power_watts(index, load, t0 + k * h) for k in range(1, steps))
    return total * h


class CounterlessBackend:
    """A simulated rig whose GPUs lack the energy counter, like old boards on NVML."""

    name = "counterless"

    def __init__(self, sim: SimulatedBackend) -> None:
        self.sim = sim

    def gpus(self) -> list[GpuInfo]:
        """The simulated GPUs."""
        return self.sim.gpus()

    def energy_millijoules(self, index: int) -> int | None:
        """No counter."""
        return None

    def power_watts(self, index: int) -> float:
        """The simulated draw."""
        return self.sim.power_watts(index)

    def telemetry(self, index: int) -> GpuTelemetry:
        """The simulated sensors."""
        return self.sim.telemetry(index)

    def set_load(self, indices: list[int], load: str) -> None:
        """Drive the simulated power model."""
        self.sim.set_load(indices, load)

    def close(self) -> None:
        """Nothing to release."""


def make_assignment(
    job: str = "jobs/j1",
    attempt: int = 1,
    *,
    gpus: Sequence[int] = (0,),
    command: Sequence[str] = ("true",),
    env: dict[str, str] | None = None,
    working_dir_sha256: str = "",
    max_duration_seconds: int = 0,
    inputs: dict[str, str] | None = None,
    max_output_bytes: int = 0,
    python_requirements: str = "",
    requirements_sha256: str = "",
) -> ws.Assignment:
    """An Assignment as the broker would send it."""
    return ws.Assignment(
        job=job,
        attempt=attempt,
        gpu_indices=list(gpus),
        spec=ws.AssignedSpec(
            command=list(command),
            env=env or {},
            working_dir_sha256=working_dir_sha256,
            max_duration_seconds=max_duration_seconds,
            inputs=inputs or {},
            max_output_bytes=max_output_bytes,
            python_requirements=python_requirements,
            requirements_sha256=requirements_sha256,
        ),
    )


class TcpProxy:
    """A loopback TCP proxy whose link can be cut and restored: "the broker went away".

    Runs its own event loop in a thread, so sync tests and subprocess agents can
    use it alike::

        proxy = TcpProxy("127.0.0.1:50051").start()   # agents dial proxy.address
        proxy.cut()      # close every connection and refuse new ones
        proxy.restore()  # listen again on the same port
        proxy.close()
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` to dial instead of the target."""
        return f"127.0.0.1:{self.port}"

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> TcpProxy:
        """Listen on a free port (the same port again after :meth:`cut`)."""
        if not self._thread.is_alive():
            self._thread.start()
        self._call(self._listen())
        return self

    restore = start

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        """Stop listening and reset every open connection."""
        self._call(self._cut())

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            transport = w.transport
            if transport is not None:
                transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    def close(self) -> None:
        """Cut and stop the proxy's loop."""
        if self._thread.is_alive():
            self.cut()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
