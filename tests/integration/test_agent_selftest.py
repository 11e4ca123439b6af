"""The self-test at registration (against the scripted broker) and its torch subprocess.

The broker's side (judging the registered figures) is tested with the broker; here the
agent's: what RegisterWorker carries, and that the real-GPU path gives every GPU a
figure or an error within its budget, whatever the interpreter does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scripted_broker import FakeBroker, config, run_session, until

from rigshift.scoring import Measurement, Verification, judge
from worker_agent.agent import Agent
from worker_agent.executor import LocalExecutor
from worker_agent.gpu import GpuInfo, GpuTelemetry, SimulatedBackend
from worker_agent.selftest import measure_gpus

ROOT = Path(__file__).resolve().parents[2]
CPU_ARGS = ["--device", "cpu", "--json", "--budget-s", "2", "--gpu", "0"]


def _measurement(info) -> Measurement:  # type: ignore[no-untyped-def]
    """What the broker reads back from a registered GpuInfo (as rigshift.scoring has it)."""
    m = info.measurement
    return Measurement(
        m.fp16_gflops, m.fp32_gflops, m.usable_vram_mb, m.h2d_mbps, m.d2h_mbps, m.method, m.error
    )


def test_register_worker_carries_each_gpus_figures_and_the_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rigshift.agent.selftest")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        pass

    fake = run_session(tmp_path, body, spec="RTX3090x2,A5000")
    request = fake.registrations[0]
    assert request.HasField("host")
    assert request.host.cpu_cores == os.cpu_count() and request.host.ram_mb > 0
    assert request.host.disk_write_mbps > 0
    riser, slot = request.gpus[0], request.gpus[2]
    for info in request.gpus:
        assert info.HasField("measurement") and info.measurement.method == "simulated"
        assert info.measurement.HasField("measure_time") and info.measurement.error == ""
        verdict = judge(info.model, info.vram_mb, _measurement(info))
        assert verdict.verification == Verification.VERIFIED
    assert (riser.pcie_generation, slot.pcie_generation) == (1, 4)
    assert riser.measurement.h2d_mbps < 1000 and slot.measurement.h2d_mbps > 24_000
    assert "self-test GPU 0 (RTX 3090): score" in caplog.text
    assert "self-test GPU 2 (A5000): score 12" in caplog.text and "-> VERIFIED" in caplog.text
    assert not list((tmp_path / "agent").glob(".selftest-disk"))


class Impostor(SimulatedBackend):
    """GPU 1 claims an RTX 3090 but measures a third of one (H1's ``impostor`` fault)."""

    def selftest_factor(self, index: int) -> float:
        return 1 / 3 if index == 1 else 1.0


def _register_once(tmp_path: Path, backend: SimulatedBackend, **cfg: object) -> FakeBroker:
    async def main() -> FakeBroker:
        fake = FakeBroker()
        await fake.serve()
        try:
            agent = Agent(
                config(tmp_path, f"127.0.0.1:{fake.port}", **cfg),
                backend=backend,
                executor=LocalExecutor(flush_s=0.05, kill_grace_s=1.0),
            )
            async with agent:
                await until(lambda: fake.registrations, what="RegisterWorker")
        finally:
            await fake.stop()
        return fake

    return asyncio.run(main())


def test_a_lying_agents_figures_give_it_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rigshift.agent.selftest")
    fake = _register_once(tmp_path, Impostor("RTX3090x2", seed="t"))
    honest, lying = fake.registrations[0].gpus
    assert lying.model == honest.model == "RTX 3090"  # the claim is the same
    assert lying.measurement.fp16_gflops < 0.4 * honest.measurement.fp16_gflops
    verdict = judge(lying.model, lying.vram_mb, _measurement(lying))
    assert verdict.verification == Verification.UNVERIFIED
    assert "measures short of its claimed model" in verdict.reason
    assert "self-test GPU 1 (RTX 3090)" in caplog.text and "-> UNVERIFIED" in caplog.text


def test_without_the_start_test_the_gpus_register_unmeasured(tmp_path: Path) -> None:
    fake = _register_once(tmp_path, SimulatedBackend("RTX3090", seed="t"), selftest_at_start=False)
    request = fake.registrations[0]
    assert not request.HasField("host") and not request.gpus[0].HasField("measurement")
    assert judge("RTX 3090", 24_576, None).verification == Verification.PENDING


class FakeNvml:
    """An NVML-like backend (name ``nvml``): the self-test runs the torch subprocess."""

    name = "nvml"

    def gpus(self) -> list[GpuInfo]:
        return [GpuInfo(i, f"GPU-{i}", "RTX 3090", 24_576, 350, 16) for i in range(2)]

    def telemetry(self, index: int) -> GpuTelemetry:
        return GpuTelemetry(index, 30.0, None, 40.0, 0.0, 4, 16)


def test_no_cuda_here_every_gpu_gets_the_reason() -> None:
    figures = asyncio.run(measure_gpus(FakeNvml(), [0, 1], budget_s=60, python=sys.executable))  # type: ignore[arg-type]
    assert set(figures) == {0, 1}
    for m in figures.values():
        assert m.error.startswith("torch with CUDA not available: "), m.error
        assert judge("RTX 3090", 24_576, m).verification == Verification.UNVERIFIED


def test_a_test_that_hangs_is_killed_at_its_budget(tmp_path: Path) -> None:
    hang = tmp_path / "python"
    hang.write_text("#!/bin/sh\nexec sleep 600\n")
    hang.chmod(0o755)
    figures = asyncio.run(measure_gpus(FakeNvml(), [0, 1], budget_s=0.5, python=str(hang)))  # type: ignore[arg-type]
    assert {m.error for m in figures.values()} == {"the self-test did not finish within 0.5 s"}


def test_an_interpreter_that_fails_or_is_missing_is_each_gpus_error(tmp_path: Path) -> None:
    crash = tmp_path / "python"
    crash.write_text("#!/bin/sh\necho 'boom: no such thing' >&2\nexit 7\n")
    crash.chmod(0o755)
    figures = asyncio.run(measure_gpus(FakeNvml(), [0], budget_s=30, python=str(crash)))  # type: ignore[arg-type]
    assert figures[0].error == "the self-test exited 7: boom: no such thing"
    missing = asyncio.run(measure_gpus(FakeNvml(), [1], python=str(tmp_path / "nope")))  # type: ignore[arg-type]
    assert missing[1].error.startswith("self-test could not run: ")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs the torch extra")
def test_the_torch_benchmark_on_the_cpu() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "worker_agent.selftest_torch", *CPU_ARGS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    ).stdout
    row = json.loads(out)
    assert row["gpu"] == 0 and row["error"] == "" and row["method"] == "torch-cpu"
    assert row["fp32_gflops"] > 0 and row["fp16_gflops"] >= 0
    assert row["usable_vram_mb"] == 64  # the CPU mode's cap, every chunk verified
    assert row["h2d_mbps"] > 0 and row["d2h_mbps"] > 0 and row["duration_ms"] > 0
