"""The agent's GPU-health shell: polls the backend, reports to the broker, runs re-tests.

The decisions are the state machine's (``state_machine.py``, ``quarantine.py``); this
module does the I/O around them, for the agent (``agent.py``)::

    poll_loop     every ``[health] interval_s``: ``backend.health(i)`` for every GPU (in a
                  thread for NVML), each observation through a HealthWatch; a critical
                  verdict -> GpuFaulted; then ProbationDue (time passed)
    report_loop   ReportGpuHealth with the rig's whole health whenever the state says so,
                  retried with backoff until the broker takes it (the report is whole and
                  idempotent, so requests that pile up are sent once)
    selftest      RunSelfTest(i): the self-test of that one GPU
                  (``worker_agent.selftest.measure_gpus``), judged by
                  ``rigshift.scoring.judge`` -> SelfTestDone (VERIFIED passes)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from rigshift.scoring import Measurement, Verification, judge
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.backoff import Backoff
from worker_agent.events import Event, GpuFaulted, ProbationDue, SelfTestDone
from worker_agent.gpu import GpuBackend
from worker_agent.health import HealthConfig, HealthObservation, HealthWatch
from worker_agent.quarantine import GpuHealthView
from worker_agent.selftest import measure_gpus, measurement_proto

__all__ = ["HealthShell", "Measure", "health_protos"]

log = logging.getLogger("rigshift.agent.health")

Measure = Callable[..., Awaitable[dict[int, Measurement]]]
"""``await measure(backend, [index], budget_s=...) -> {index: Measurement}``."""


def _timestamp(unix_s: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix_s * 1e9))
    return ts


def health_protos(views: Sequence[GpuHealthView]) -> list[ws.GpuHealth]:
    """The quarantine book's report as ``rigshift.v1.GpuHealth`` messages."""
    out = []
    for v in views:
        h = ws.GpuHealth(
            index=v.index,
            quarantined=v.quarantined,
            reason=v.reason,
            strikes=v.strikes,
            reinstate_required=v.reinstate_required,
        )
        if v.quarantined and v.since_wall:
            h.since.CopyFrom(_timestamp(v.since_wall))
        if v.measurement is not None:
            h.measurement.CopyFrom(measurement_proto(v.measurement))
        out.append(h)
    return out


class HealthShell:
    """The I/O of GPU health for one agent (see the module docstring).

    ``handle`` feeds the state machine; ``report`` gives the rig's whole health now;
    ``send`` delivers it to the broker (True: taken); ``measure`` is the self-test.
    """

    def __init__(
        self,
        backend: GpuBackend,
        config: HealthConfig,
        *,
        handle: Callable[[Event], None],
        report: Callable[[], list[ws.GpuHealth]],
        send: Callable[[list[ws.GpuHealth]], Awaitable[bool]],
        retry_min_s: float = 0.2,
        retry_max_s: float = 10.0,
        measure: Measure | None = None,
        python: str = "",
    ) -> None:
        self.backend = backend
        self.config = config
        self.watch = HealthWatch(config)
        self._handle = handle
        self._report = report
        self._send = send
        self._retry = (retry_min_s, retry_max_s)
        # The probation re-test runs the self-test's torch script with the configured interpreter.
        self.measure = measure or functools.partial(measure_gpus, python=python)
        self._dirty = asyncio.Event()
        self.reports_taken = 0
        """Reports the broker took (for tests and logs)."""
        self._tests: set[asyncio.Task[None]] = set()

    # --- polling --------------------------------------------------------------------

    def _read_all(self) -> list[HealthObservation]:
        out: list[HealthObservation] = []
        for gpu in self.backend.gpus():
            try:
                out.extend(self.backend.health(gpu.index))
            except Exception as err:  # one GPU's failing read must not stop the others
                log.warning("health read of GPU %d failed: %s", gpu.index, err)
        return out

    async def poll_once(self) -> None:
        """Read every GPU's health once and feed the verdicts to the state machine."""
        if self.backend.name == "nvml":
            observations = await asyncio.to_thread(self._read_all)  # NVML calls may block
        else:
            observations = self._read_all()
        wall = time.time()
        for obs in observations:
            verdict = self.watch.observe(obs)
            if verdict.critical:
                self._handle(GpuFaulted(obs.index, verdict.reason, time.monotonic(), wall))
        self._handle(ProbationDue(time.monotonic()))

    async def poll_loop(self) -> None:
        """:meth:`poll_once` every ``interval_s``."""
        while True:
            await self.poll_once()
            await asyncio.sleep(self.config.interval_s)

    # --- reporting ------------------------------------------------------------------

    def request_report(self) -> None:
        """The state said ReportGpuHealth: send the whole health soon (until taken)."""
        self._dirty.set()

    async def report_loop(self) -> None:
        """Send the health whenever it is asked for, retrying until the broker takes it."""
        backoff = Backoff(*self._retry)
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if await self._send(self._report()):
                backoff.reset()
                self.reports_taken += 1
                continue
            self._dirty.set()  # not taken: again after a pause (a newer report if any)
            await asyncio.sleep(backoff.next_delay())

    # --- probation self-tests --------------------------------------------------------

    def run_selftest(self, index: int) -> asyncio.Task[None]:
        """Start the self-test of GPU ``index`` (the state said RunSelfTest); its task."""
        task = asyncio.create_task(self._selftest(index), name=f"selftest-gpu{index}")
        self._tests.add(task)
        task.add_done_callback(self._tests.discard)
        return task

    async def _selftest(self, index: int) -> None:
        gpu = next(g for g in self.backend.gpus() if g.index == index)
        budget = self.config.selftest_budget_s
        m: Measurement | None
        try:
            results = await asyncio.wait_for(
                self.measure(self.backend, [index], budget_s=budget), timeout=budget + 5.0
            )
            m = results.get(index)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a crashing test is a failed test
            log.warning("self-test of GPU %d failed to run: %s", index, err)
            m = Measurement(error=f"self-test did not run: {err}"[:200])
        verdict = judge(gpu.model, gpu.vram_mb, m)
        passed = verdict.verification is Verification.VERIFIED
        if passed:
            self.watch.forget(index)
        self._handle(SelfTestDone(index, passed, verdict.reason, m, time.monotonic()))

    async def close(self) -> None:
        """Cancel the self-tests still running."""
        for task in list(self._tests):
            task.cancel()
        for task in list(self._tests):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
