"""A test-side agent that speaks the real WorkerService protocol over real gRPC.

It does not run anything: the test decides when attempts start and finish.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict

import grpc

from harness.broker_fixtures import healthy
from rigshift.credentials import lookup_api_key
from rigshift.v1 import farm_pb2, farm_service_pb2, farm_service_pb2_grpc
from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call of a channel."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _with_key(self, details):
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self.key}")]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_key(details), request_iterator)


def authed_channel(address: str, key: str | None = None) -> grpc.Channel:
    """A channel whose calls carry an API key (default: the broker's admin key from
    $RIGSHIFT_HOME/credentials, which the broker wrote on first start)."""
    key = key if key is not None else lookup_api_key(address)
    return grpc.intercept_channel(grpc.insecure_channel(address), _Bearer(key))


def create_farm(address: str, name: str = "farm-a") -> farm_pb2.Farm:
    """Create a farm over the public API and return it (with its enrollment token)."""
    with authed_channel(address) as ch:
        stub = farm_service_pb2_grpc.FarmServiceStub(ch)
        return stub.CreateFarm(
            farm_service_pb2.CreateFarmRequest(farm=farm_pb2.Farm(display_name=name))
        )


def gpus(
    n: int,
    model: str = "RTX 3090",
    vram_mb: int = 24576,
    price: int = 300_000,
    *,
    selftest: bool = True,
):
    """n identical GpuInfo messages, with healthy self-test figures (``selftest=False``:
    without, so the broker keeps them PENDING)."""
    return [
        ws.GpuInfo(
            index=i,
            uuid=f"SIM-{model}-{i}",
            model=model,
            vram_mb=vram_mb,
            power_limit_watts=350,
            price_micros_per_gpu_hour=price,
            measurement=_figures(model, vram_mb) if selftest else None,
        )
        for i in range(n)
    ]


def _figures(model: str, vram_mb: int) -> farm_pb2.GpuMeasurement:
    """A healthy GPU's self-test figures: the broker verifies it (jobs that do not allow
    unverified GPUs run on it)."""
    m = healthy(model, vram_mb)
    return farm_pb2.GpuMeasurement(
        fp16_gflops=m.fp16_gflops, fp32_gflops=m.fp32_gflops, usable_vram_mb=m.usable_vram_mb
    )


class ProtocolAgent:
    """Registers, heartbeats (unary, or on a Session), collects instructions on a background
    thread, reports events."""

    def __init__(self, address: str, token: str, gpu_infos, hostname: str = "rig-1") -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = wsg.WorkerServiceStub(self.channel)
        self.token = token
        self.gpu_infos = list(gpu_infos)
        self.hostname = hostname
        self.metrics_address = ""
        self.worker = ""
        self.credential = ""
        self.instructions: queue.Queue[ws.Instruction] = queue.Queue()
        self.seq: dict[tuple[str, int], int] = defaultdict(int)
        self._stream = None
        self._thread: threading.Thread | None = None

    @property
    def metadata(self):
        return (("authorization", f"Bearer {self.credential}"),)

    def register(self, worker: str = "") -> ws.RegisterWorkerResponse:
        resp = self.stub.RegisterWorker(
            ws.RegisterWorkerRequest(
                enrollment_token=self.token,
                hostname=self.hostname,
                agent_version="test",
                gpus=self.gpu_infos,
                worker=worker,
                metrics_address=self.metrics_address,
            )
        )
        self.worker, self.credential = resp.worker, resp.credential
        return resp

    def heartbeat(self) -> ws.HeartbeatResponse:
        return self.stub.Heartbeat(ws.HeartbeatRequest(worker=self.worker), metadata=self.metadata)

    def connect(self, timeout: float = 10.0) -> None:
        """Open StreamInstructions; instructions land in self.instructions.

        Returns once the stream is open at the broker (its first message, the
        Reconcile, has arrived and is queued): an assignment made after this
        arrives as an Assignment, never folded into that Reconcile.
        """
        self._stream = self.stub.StreamInstructions(
            ws.StreamInstructionsRequest(worker=self.worker), metadata=self.metadata
        )
        opened = threading.Event()

        def pump() -> None:
            try:
                for instruction in self._stream:
                    self.instructions.put(instruction)
                    opened.set()
            except grpc.RpcError:
                pass
            finally:
                opened.set()

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()
        opened.wait(timeout)

    def open_session(self, first: ws.SessionRequest | None = None) -> None:
        """Open WorkerService.Session with ``first`` (default: this worker, no status); every
        message the broker sends (instructions and ``lease_renewed``) lands in
        self.instructions, a stream error in self.session_error."""
        self._requests: queue.Queue[ws.SessionRequest | None] = queue.Queue()
        self._requests.put(first if first is not None else ws.SessionRequest(worker=self.worker))
        self.session_error: grpc.RpcError | None = None
        self.session_ended = threading.Event()

        def requests():  # type: ignore[no-untyped-def]
            while (request := self._requests.get()) is not None:
                yield request

        self._stream = self.stub.Session(requests(), metadata=self.metadata)

        def pump() -> None:
            try:
                for instruction in self._stream:
                    self.instructions.put(instruction)
            except grpc.RpcError as err:
                self.session_error = err
            finally:
                self.session_ended.set()

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()

    def renew(self, request: ws.SessionRequest | None = None) -> None:
        """Send one renewal on the open session."""
        self._requests.put(request if request is not None else ws.SessionRequest())

    def close_session(self) -> None:
        """Half-close the session (the agent sends nothing more)."""
        self._requests.put(None)

    def next_instruction(self, timeout: float = 10.0) -> ws.Instruction:
        return self.instructions.get(timeout=timeout)

    def next_of(self, kind: str, timeout: float = 10.0):
        """Skip to the next instruction of this kind (reconcile/assignment/cancellation)."""
        while True:
            instruction = self.next_instruction(timeout)
            if instruction.WhichOneof("kind") == kind:
                return getattr(instruction, kind)

    def event(self, job: str, attempt: int, sequence: int | None = None, **kind) -> ws.JobEvent:
        """Build the next event of an attempt (sequence numbers count per attempt)."""
        if sequence is None:
            self.seq[(job, attempt)] += 1
            sequence = self.seq[(job, attempt)]
        return ws.JobEvent(job=job, attempt=attempt, sequence=sequence, **kind)

    def report(self, *events: ws.JobEvent) -> ws.ReportJobEventsResponse:
        return self.stub.ReportJobEvents(
            ws.ReportJobEventsRequest(worker=self.worker, events=list(events)),
            metadata=self.metadata,
        )

    def start(self, job: str, attempt: int) -> ws.ReportJobEventsResponse:
        return self.report(self.event(job, attempt, started=ws.Started()))

    def finish(self, job: str, attempt: int, exit_code: int = 0, energy: int = 0):
        return self.report(
            self.event(
                job, attempt, finished=ws.Finished(exit_code=exit_code, energy_joules=energy)
            )
        )

    def close(self) -> None:
        if getattr(self, "_requests", None) is not None:
            self._requests.put(None)
        if self._stream is not None:
            self._stream.cancel()
        self.channel.close()
