"""The processes a fleet benchmark run starts and watches, besides its load generators.

:class:`BrokerProcess` is ``rigshift broker serve`` (or, with ``bare``, the empty
gRPC server of :func:`serve_bare_grpc`); :class:`Sampler` samples its CPU time and
RSS; :func:`busy_seconds` is what the whole machine spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil

from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg

__all__ = ["BrokerProcess", "Sampler", "busy_seconds", "serve_bare_grpc"]

ROOT = Path(__file__).resolve().parents[2]
#: The benchmark's script: ``--serve-bare-grpc`` runs :func:`serve_bare_grpc`.
BENCH_SCRIPT = ROOT / "benchmarks" / "fleet_bench.py"


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class BrokerProcess:
    """``rigshift broker serve`` on 127.0.0.1:0 with its own home and credentials file."""

    def __init__(self, workdir: Path, extra_args: list[str], bare: bool = False) -> None:
        self.bare = bare
        self.home = workdir / "broker-home"
        self.cred_home = workdir / "credentials-home"
        self.log_path = workdir / "broker.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self, timeout_s: float = 60.0) -> str:
        exe = Path(sys.executable).with_name("rigshift")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rigshift_cli"]
        cmd += ["broker", "serve", "--listen", "127.0.0.1:0", "--home", str(self.home)]
        cmd += ["--rate-limit-per-s", "0", "--log-level", "WARNING", *self.extra_args]
        if self.bare:
            cmd = [sys.executable, str(BENCH_SCRIPT), "--serve-bare-grpc"]
        env = {**os.environ, "RIGSHIFT_HOME": str(self.cred_home)}
        env.pop("RIGSHIFT_API_KEY", None)
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=open(self.log_path, "w"),  # noqa: SIM115 - closed with the process
            text=True,
            cwd=str(ROOT),
        )
        found: list[str] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                if "listening on" in line:
                    found.append(line.rsplit(" ", 1)[-1].strip())
                    break
            # keep draining so the broker never blocks on a full pipe
            for _ in self.proc.stdout:
                pass

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker did not start; log:\n{self.log_tail()}")
            time.sleep(0.05)
        self.address = found[0]
        return self.address

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def serve_bare_grpc() -> None:
    """WorkerService with empty handlers on grpc.aio: no auth, core, store or interceptors.

    ``--bare-grpc`` drives it instead of the broker, to measure what gRPC alone costs per
    heartbeat on this machine. Stops when its parent's stdin closes or on SIGTERM.
    """

    class Bare(wsg.WorkerServiceServicer):
        def __init__(self) -> None:
            self.workers = 0

        async def RegisterWorker(self, request, context):  # type: ignore[no-untyped-def]
            self.workers += 1
            return ws.RegisterWorkerResponse(
                worker=f"workers/{self.workers}",
                credential="bare",
                lease_ttl_seconds=15,
                heartbeat_interval_seconds=3,
            )

        async def Heartbeat(self, request, context):  # type: ignore[no-untyped-def]
            response = ws.HeartbeatResponse()
            response.lease_expire_time.FromSeconds(int(time.time()) + 15)
            return response

        async def StreamInstructions(self, request, context):  # type: ignore[no-untyped-def]
            yield ws.Instruction(reconcile=ws.Reconcile())
            await asyncio.Event().wait()

        async def ReportJobEvents(self, request, context):  # type: ignore[no-untyped-def]
            return ws.ReportJobEventsResponse(applied=len(request.events))

    async def main() -> None:
        server = grpc.aio.server()
        wsg.add_WorkerServiceServicer_to_server(Bare(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"bare grpc listening on 127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())


class Sampler(threading.Thread):
    """Samples the broker's CPU time and RSS every 0.5 s until stopped."""

    def __init__(self, proc: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.samples: list[tuple[float, float, int]] = []  # (wall, cpu seconds, rss bytes)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                cpu = self.proc.cpu_times()
                self.samples.append(
                    (time.time(), cpu.user + cpu.system, self.proc.memory_info().rss)
                )
            if self._stop_event.wait(0.5):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def cpu_by_second(self) -> dict[int, float]:
        """Broker CPU % per whole second (100 = one core)."""
        out: dict[int, float] = {}
        for (t0, c0, _), (t1, c1, _) in zip(self.samples, self.samples[1:], strict=False):
            if t1 > t0:
                out[int(t1)] = round((c1 - c0) / (t1 - t0) * 100, 1)
        return out
