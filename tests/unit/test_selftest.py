"""The self-test (``worker_agent/selftest.py``) on simulated rigs, the host's figures, the
torch benchmark's output parsed, and the figures as RegisterWorker carries them.
The torch subprocess itself is tested in tests/integration/test_agent_selftest.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from rigshift.scoring import Measurement, Verification, judge, reference
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.broker_calls import gpu_infos
from worker_agent.config_file import read_config_file
from worker_agent.gpu import SimulatedBackend
from worker_agent.selftest import (
    NOISE,
    HostFigures,
    RigFigures,
    fill_gpu_infos,
    host_proto,
    measure_gpus,
    measure_host,
    measure_rig,
    measurement_proto,
    parse_torch_line,
    pcie_mbps,
)


class FaultyBackend(SimulatedBackend):
    """A simulated rig whose GPUs measure ``factors[i]`` of their model (as H1's injected
    ``impostor`` (1/3) and ``lost`` (0) faults make them)."""

    def __init__(self, spec: str, factors: dict[int, float]) -> None:
        super().__init__(spec, seed="t")
        self.factors = factors

    def selftest_factor(self, index: int) -> float:
        return self.factors.get(index, 1.0)


def measure(backend: SimulatedBackend, indices: list[int]) -> dict[int, Measurement]:
    return asyncio.run(measure_gpus(backend, indices))


@pytest.mark.parametrize(
    ("generation", "width", "mbps"),
    [
        (1, 1, 200),  # a mining riser: 0.25 GB/s x 1 x 0.8
        (3, 1, 788),  # a gen3 riser: still under 1 GB/s
        (1, 4, 800),  # a CMP card (gen1 x4)
        (3, 16, 12_608),  # 0.985 x 16 x 0.8
        (4, 16, 25_216),  # 1.97 x 16 x 0.8
        (5, 16, 50_432),
        (0, 16, 0),  # generation unknown
        (4, 0, 0),  # width unknown
    ],
)
def test_pcie_bandwidth_from_the_link(generation: int, width: int, mbps: int) -> None:
    assert pcie_mbps(generation, width) == mbps


def test_a_healthy_simulated_gpu_measures_its_model_and_is_verified() -> None:
    backend = SimulatedBackend("RTX3090x4", seed="t")
    figures = measure(backend, [0, 1, 2, 3])
    ref = reference("RTX 3090")
    assert ref is not None
    for i, m in figures.items():
        assert m.method == "simulated" and m.error == "" and m.measured_at > 0
        assert abs(m.fp16_gflops / ref.fp16_gflops - 1) <= NOISE
        assert abs(m.fp32_gflops / ref.fp32_gflops - 1) <= NOISE
        assert 0.9 * 24_576 < m.usable_vram_mb <= 24_576
        verdict = judge("RTX 3090", 24_576, m)
        assert verdict.verification == Verification.VERIFIED, (i, verdict)
        assert 95 <= verdict.score <= 103
    # the noise differs between GPUs (seeded by each UUID)
    assert len({m.fp16_gflops for m in figures.values()}) == 4


def _fields(m: Measurement) -> dict[str, object]:
    return {f: getattr(m, f) for f in Measurement.__slots__ if f != "measured_at"}


def test_the_same_gpu_measures_the_same_figures_each_time() -> None:
    first = measure(SimulatedBackend("RTX3080x2", seed="t"), [0, 1])
    again = measure(SimulatedBackend("RTX3080x2", seed="t"), [0, 1])
    for i in (0, 1):
        assert _fields(first[i]) == _fields(again[i])


@pytest.mark.parametrize("spec", ["RTX3060", "RTX3090", "A4000", "A5000", "CMP90HX", "RX6800XT"])
def test_the_noise_stays_within_three_percent_for_every_model(spec: str) -> None:
    backend = SimulatedBackend(f"{spec}x16", seed=spec)
    info = backend.gpus()[0]
    ref = reference(info.model)
    assert ref is not None
    for m in measure(backend, list(range(16))).values():
        assert abs(m.fp16_gflops / ref.fp16_gflops - 1) <= NOISE
        assert abs(m.fp32_gflops / ref.fp32_gflops - 1) <= NOISE
        assert judge(info.model, info.vram_mb, m).verification == Verification.VERIFIED


def test_an_impostor_measures_a_third_and_the_broker_marks_it_unverified() -> None:
    backend = FaultyBackend("RTX3090x2", {1: 1 / 3})
    figures = measure(backend, [0, 1])
    honest, impostor = figures[0], figures[1]
    assert 0.3 < impostor.fp16_gflops / honest.fp16_gflops < 0.37
    assert impostor.error == ""  # it ran: the figures, not a failure, give it away
    verdict = judge("RTX 3090", 24_576, impostor)
    assert verdict.verification == Verification.UNVERIFIED
    assert "measures short of its claimed model (under 70%)" in verdict.reason
    assert "of a RTX 3090's 49.7" in verdict.reason
    assert 30 <= verdict.score <= 35
    assert judge("RTX 3090", 24_576, honest).verification == Verification.VERIFIED


def test_a_lost_gpu_is_not_responding_and_its_neighbour_is_measured() -> None:
    figures = measure(FaultyBackend("RTX3090x2", {0: 0.0}), [0, 1])
    assert figures[0].error == "GPU not responding" and figures[0].fp16_gflops == 0
    verdict = judge("RTX 3090", 24_576, figures[0])
    assert verdict.verification == Verification.UNVERIFIED
    assert verdict.reason == "self-test failed: GPU not responding"
    assert figures[1].error == "" and figures[1].fp16_gflops > 0


def test_a_riser_rig_measures_under_1_gbps_and_an_x16_rig_about_25() -> None:
    riser = measure(SimulatedBackend("RTX3090", seed="t"), [0])[0]  # x1 riser, gen1
    slot = measure(SimulatedBackend("A5000", seed="t"), [0])[0]  # x16, gen4
    assert riser.h2d_mbps < 1000 and riser.d2h_mbps < 1000
    assert 24_000 < slot.h2d_mbps < 26_000 and 24_000 < slot.d2h_mbps < 26_000


def test_only_the_asked_gpus_and_an_unknown_index_is_an_error() -> None:
    figures = measure(SimulatedBackend("RTX3090x4", seed="t"), [2, 9])
    assert set(figures) == {2, 9}
    assert figures[2].error == "" and figures[9].error == "no GPU 9 on this rig"
    assert measure(SimulatedBackend("RTX3090", seed="t"), []) == {}


def test_host_figures(tmp_path: Path) -> None:
    host = measure_host(tmp_path / "state", disk_bytes=8 << 20)
    assert host.cpu_cores == os.cpu_count()
    meminfo = Path("/proc/meminfo").read_text().split("\n")[0].split()
    assert host.ram_mb == int(meminfo[1]) // 1024
    assert host.disk_write_mbps > 0
    assert list((tmp_path / "state").iterdir()) == []  # the test file is gone


def test_a_disk_too_full_to_measure_reads_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100 << 20, 90 << 20, 10 << 20))
    host = measure_host(tmp_path, disk_bytes=8 << 20)
    assert host.disk_write_mbps == 0 and host.cpu_cores > 0
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_state_dir_reads_zero(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert measure_host(blocked / "state", disk_bytes=1 << 20).disk_write_mbps == 0


def test_measure_rig_skips_busy_gpus_and_reads_each_link(tmp_path: Path) -> None:
    backend = SimulatedBackend("RTX3090x2,A5000", seed="t")
    rig = asyncio.run(measure_rig(backend, tmp_path, skipped={1: "holds a job's attempt"}))
    assert set(rig.gpus) == {0, 2} and rig.skipped == {1: "holds a job's attempt"}
    assert rig.pcie_generation == {0: 1, 2: 4}
    assert rig.host.cpu_cores == os.cpu_count()


U0 = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
U1 = "GPU-9f8e7d6c-0000-1111-2222-333344445555"
UUIDS = {0: U0, 1: U1, 2: "GPU-short"}
FULL_LINE = {
    "gpu": 0,
    "uuid": U0.upper().removeprefix("GPU-"),
    "fp16_gflops": 70_000,
    "fp32_gflops": 24_000,
    "usable_vram_mb": 23_000,
    "h2d_mbps": 700,
    "d2h_mbps": 650,
    "method": "torch-cuda",
    "error": "",
    "duration_ms": 9_000,
}


@pytest.mark.parametrize(
    ("line", "index", "error_has", "fp16"),
    [
        (FULL_LINE, 0, "", 70_000),  # the UUID matches, whatever its case and prefix
        ({"gpu": 1, "error": "torch with CUDA not available: no torch"}, 1, "torch with CUDA", 0),
        ({"gpu": 1, "uuid": U0, "fp16_gflops": 5}, 1, "device order", 5),
        ({"gpu": 2, "uuid": U0, "fp16_gflops": 5}, 2, "", 5),  # NVML's not canonical: no check
        ({"gpu": 1, "uuid": "weird", "fp16_gflops": 5}, 1, "", 5),  # nor torch's
        ({"gpu": 0, "fp16_gflops": "lots"}, 0, "unreadable self-test figures", 0),
    ],
)
def test_parse_the_torch_benchmarks_lines(
    line: dict[str, object], index: int, error_has: str, fp16: int
) -> None:
    parsed = parse_torch_line(json.dumps(line), now=1.0, expected_uuid=UUIDS)
    assert parsed is not None
    got_index, m = parsed
    assert got_index == index and m.fp16_gflops == fp16
    assert (error_has in m.error) if error_has else m.error == ""


@pytest.mark.parametrize("line", [b"", b"Warning: something\n", b"[1, 2]", b'{"no": "gpu"}'])
def test_lines_that_are_not_figures_are_ignored(line: bytes) -> None:
    assert parse_torch_line(line, now=1.0, expected_uuid=UUIDS) is None


def test_the_figures_as_register_worker_carries_them() -> None:
    backend = SimulatedBackend("RTX3090x2", seed="t")
    m = Measurement(49_000, 24_000, 23_500, 200, 190, "simulated", "", 1_700_000_000.5, 12)
    rig = RigFigures({0: m}, {0: 1, 1: 1}, HostFigures(64_000, 16, 900))
    infos = fill_gpu_infos(gpu_infos(backend, None), rig)
    assert infos[0].HasField("measurement") and not infos[1].HasField("measurement")
    got = infos[0].measurement
    assert (got.fp16_gflops, got.fp32_gflops, got.usable_vram_mb) == (49_000, 24_000, 23_500)
    assert (got.h2d_mbps, got.d2h_mbps, got.method, got.duration_ms) == (200, 190, "simulated", 12)
    assert got.measure_time.ToNanoseconds() == 1_700_000_000_500_000_000
    assert [i.pcie_generation for i in infos] == [1, 1]
    assert measurement_proto(Measurement(error="GPU not responding")).error == "GPU not responding"
    assert not measurement_proto(Measurement()).HasField("measure_time")
    h = host_proto(rig.host)
    assert (h.ram_mb, h.cpu_cores, h.disk_write_mbps) == (64_000, 16, 900)
    request = ws.RegisterWorkerRequest(gpus=infos, host=h)
    assert ws.RegisterWorkerRequest.FromString(request.SerializeToString()) == request
    assert fill_gpu_infos(gpu_infos(backend, None), None)[0].HasField("measurement") is False


def test_selftest_settings_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'broker_address = "b:1"\nenrollment_token = "t"\n'
        'selftest_python = "/opt/torch/bin/python"\nselftest_budget_s = 30\n'
        "selftest_at_start = false\n"
    )
    values = read_config_file(path)
    assert values["selftest_python"] == "/opt/torch/bin/python"
    assert values["selftest_budget_s"] == 30 and values["selftest_at_start"] is False


def test_a_gpu_whose_simulation_raises_gets_the_error_not_the_exception() -> None:
    class Broken(SimulatedBackend):
        def selftest_factor(self, index: int) -> float:
            if index == 0:
                raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
            return 1.0

    figures = measure(Broken("RTX3090x2", seed="t"), [0, 1])
    assert figures[0].error == "NVML_ERROR_GPU_IS_LOST" and figures[1].error == ""
