"""The onboarding self-test: what each GPU really does, and what the rig around it has.

The agent runs it once at start, before RegisterWorker (no GPU holds a job then), and
registers the figures (``GpuInfo.measurement``, ``GpuInfo.pcie_generation``,
``RegisterWorkerRequest.host``); the broker scores and judges them with
``rigshift.scoring`` and never takes the claimed model on trust. ``rigshift agent
selftest`` runs it by hand; a probation re-test (``health``) runs it on one GPU.

Per GPU (:func:`measure_gpus`), bounded by ``budget_s`` for the whole rig:

- **NVML rigs**: ``selftest_torch.py`` in a subprocess, with the interpreter that has
  torch (``selftest_python``), killed at the budget: fp16 and fp32 matrix-multiply
  GFLOP/s, usable VRAM (allocated and verified with a pattern), host↔device MB/s.
  Without torch or CUDA every GPU gets ``error`` and the broker marks it UNVERIFIED.
- **Simulated rigs**: the claimed model's reference figures (``rigshift.scoring``) with
  ±3 % noise seeded by the GPU's UUID, times ``backend.selftest_factor(index)`` (1 for a
  healthy GPU, 1/3 for an injected ``impostor``, 0 for a ``lost`` one: "GPU not
  responding"); VRAM 96 % of the catalogue's; bandwidth from the PCIe link
  (:func:`pcie_mbps`), so a x1 riser measures ~0.2 GB/s and a gen4 x16 slot ~25 GB/s.
  No sleeps: the simulated test is instant.

Power curves (issue 16, ``worker_agent.power``): first each GPU's limit is set to the
operator's own (a no-op that says whether the agent may set limits: not root or an
unsupported card → no curve, ``power_limit_settable`` false, said once in the log); then
at ``rigshift.power.SWEEP_SHARES_PERCENT`` of the board limit, throughput and draw.
NVML: ``selftest_torch.py --limits`` sets each limit and differences the energy counter,
and the agent puts the operator's limit back afterwards whatever happened. Simulated:
``worker_agent.power.simulated_curve`` from the measured fp16 figure, instantly.

Per rig (:func:`measure_host`): RAM (``/proc/meminfo``), logical CPU cores, and the
state disk's write speed (64 MiB written and fsynced, bounded in time, then removed).

No exception leaves :func:`measure_gpus` for a GPU that cannot be measured: it gets a
:class:`~rigshift.scoring.Measurement` with ``error`` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rigshift.catalogue import lookup
from rigshift.power import PowerPoint
from rigshift.scoring import Measurement, Verdict, judge, measurement_message, reference, score
from worker_agent.gpu import GpuBackend
from worker_agent.power import PowerLimits, curve_protos, simulated_curve, sweep_limits

if TYPE_CHECKING:
    from rigshift.v1 import farm_pb2
    from rigshift.v1 import worker_service_pb2 as ws

__all__ = [
    "GPU_BUDGET_S",
    "PCIE_EFFICIENCY",
    "PCIE_LANE_GBPS",
    "HostFigures",
    "RigFigures",
    "describe",
    "fill_gpu_infos",
    "host_proto",
    "log_figures",
    "measure_gpus",
    "measure_host",
    "measure_rig",
    "measurement_proto",
    "parse_torch_line",
    "pcie_mbps",
    "simulated_measurement",
]

log = logging.getLogger("rigshift.agent.selftest")

GPU_BUDGET_S = 50.0
"""Time the GPUs of one rig may take together (the host's figures take at most ~5 s more)."""

PCIE_LANE_GBPS: Mapping[int, float] = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.97, 5: 3.94, 6: 7.88}
"""Usable GB/s per lane and direction of each PCIe generation (after line encoding)."""

PCIE_EFFICIENCY = 0.8
"""Share of the link a large pinned copy reaches (protocol overhead: TLP headers, DLLPs)."""

NOISE = 0.03
"""The simulated figures' noise: each within ±3 % of its model's figure."""

SIM_VRAM_RATIO = 0.96
"""Share of its VRAM a simulated GPU's test fills (the CUDA context and driver take the rest)."""

DISK_TEST_BYTES = 64 << 20
DISK_BUDGET_S = 5.0
_TORCH_SCRIPT = Path(__file__).with_name("selftest_torch.py")
_STARTUP_S = 5.0  # of the budget, left to the child's interpreter and CUDA to start


@dataclass(frozen=True, slots=True)
class HostFigures:
    """The rig's host, as ``rigshift.v1.HostInfo``: RAM MiB, logical cores, disk MB/s."""

    ram_mb: int
    cpu_cores: int
    disk_write_mbps: int


@dataclass(frozen=True, slots=True)
class RigFigures:
    """A whole rig's self-test: each GPU's measurement and PCIe generation, the host's."""

    gpus: dict[int, Measurement]
    pcie_generation: dict[int, int]
    host: HostFigures
    skipped: dict[int, str] = field(default_factory=dict)
    """GPUs left untested, with why (``rigshift agent selftest`` next to a busy agent)."""
    power_curves: dict[int, list[PowerPoint]] = field(default_factory=dict)
    """Each swept GPU's power curve, lowest limit first."""
    power_settable: dict[int, bool] = field(default_factory=dict)
    """Whether the agent may set each tested GPU's power limit."""


def pcie_mbps(generation: int, width: int) -> int:
    """What a host↔device copy reaches over a ``generation`` x``width`` link, MB/s.

    ``lane GB/s x width x 0.8``: gen1 x1 (a riser) 200, gen3 x1 788, gen4 x16 25 216;
    0 when the generation or width is unknown.
    """
    per_lane = PCIE_LANE_GBPS.get(generation, 0.0)
    return int(per_lane * max(0, width) * PCIE_EFFICIENCY * 1000)


def _generation(backend: GpuBackend, index: int) -> int:
    """The link's PCIe generation now (0: unknown). Idle GPUs may train their link down to
    save power, so the agent reads it again after the test and keeps the higher."""
    try:
        return int(backend.telemetry(index).pcie_generation or 0)
    except Exception:  # a lost GPU answers nothing
        return 0


def simulated_measurement(backend: GpuBackend, index: int, *, now: float) -> Measurement:
    """The figures a simulated GPU measures (see the module docstring); deterministic."""
    info = next((g for g in backend.gpus() if g.index == index), None)
    if info is None:
        return Measurement(method="simulated", error=f"no GPU {index} on this rig", measured_at=now)
    factor_of: Callable[[int], float] = getattr(backend, "selftest_factor", lambda i: 1.0)
    factor = factor_of(index)
    if factor <= 0:
        return Measurement(method="simulated", error="GPU not responding", measured_at=now)
    seed = int.from_bytes(hashlib.sha256(info.uuid.encode()).digest()[:8], "big")
    rng = random.Random(seed)

    def noisy(value: float) -> int:
        return int(value * (1 + rng.uniform(-NOISE, NOISE)))

    ref = reference(info.model)
    link = pcie_mbps(_generation(backend, index), info.pcie_link_width)
    return Measurement(
        fp16_gflops=noisy(ref.fp16_gflops * factor) if ref else 0,
        fp32_gflops=noisy(ref.fp32_gflops * factor) if ref else 0,
        usable_vram_mb=min(info.vram_mb, noisy(info.vram_mb * SIM_VRAM_RATIO)),
        h2d_mbps=noisy(link),
        d2h_mbps=noisy(link),
        method="simulated",
        measured_at=now,
    )


async def measure_gpus(
    backend: GpuBackend,
    indices: Iterable[int],
    *,
    budget_s: float = GPU_BUDGET_S,
    python: str = "",
    limits: Mapping[int, list[int]] | None = None,
    curves: dict[int, list[PowerPoint]] | None = None,
) -> dict[int, Measurement]:
    """Measure the GPUs ``indices`` of ``backend`` within ``budget_s`` seconds in all.

    Never raises for a GPU: one that cannot be measured gets ``Measurement(error=...)``.
    ``python`` is the interpreter with torch for real GPUs (default: the agent's own).
    ``limits`` (NVML: the power limits to sweep per GPU) fill ``curves``.
    The caller makes sure no job runs on these GPUs.
    """
    wanted = list(dict.fromkeys(indices))
    if not wanted:
        return {}
    now = time.time()
    if backend.name == "simulated":
        out: dict[int, Measurement] = {}
        for i in wanted:
            try:
                out[i] = simulated_measurement(backend, i, now=now)
            except Exception as err:  # a fault the simulation raises is this GPU's result
                out[i] = Measurement(
                    method="simulated", error=str(err) or repr(err), measured_at=now
                )
        return out
    try:
        return await _measure_torch(
            backend, wanted, budget_s, python or sys.executable, now, limits or {}, curves
        )
    except Exception as err:  # the subprocess could not even start
        log.warning("self-test could not run: %s", err)
        return {
            i: Measurement(error=f"self-test could not run: {err}", measured_at=now) for i in wanted
        }


async def _measure_torch(
    backend: GpuBackend,
    indices: list[int],
    budget_s: float,
    python: str,
    now: float,
    limits: Mapping[int, list[int]],
    curves: dict[int, list[PowerPoint]] | None,
) -> dict[int, Measurement]:
    """Run ``selftest_torch.py`` for ``indices`` and read its JSON lines until the budget."""
    argv = [python, str(_TORCH_SCRIPT), "--json"]
    argv += [f"--gpu={i}" for i in indices]
    argv += [f"--limits={i}:{','.join(map(str, w))}" for i, w in limits.items() if w]
    argv.append(f"--budget-s={max(1.0, budget_s - _STARTUP_S):.1f}")
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)  # the agent's index is NVML's: all GPUs, bus order
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group: killed whole at the budget
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr_read = asyncio.ensure_future(proc.stderr.read())  # never let a full pipe block it
    rows: dict[int, Measurement] = {}
    uuids = {g.index: g.uuid for g in backend.gpus()}
    deadline = time.monotonic() + budget_s
    try:
        while len(rows) < len(indices):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), left)
            except TimeoutError:
                break
            if not line:
                break
            parsed = parse_torch_line(line, now=now, expected_uuid=uuids, curves=curves)
            if parsed is not None and parsed[0] in indices:
                rows[parsed[0]] = parsed[1]
        with contextlib.suppress(TimeoutError):  # all measured: let it exit by itself
            await asyncio.wait_for(proc.wait(), max(0.0, deadline - time.monotonic()))
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        stderr = await stderr_read
    why = f"the self-test did not finish within {budget_s:g} s"
    if proc.returncode not in (0, 3, -signal.SIGKILL):
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        why = f"the self-test exited {proc.returncode}: {tail[0][:300]}"
    for i in indices:
        rows.setdefault(i, Measurement(method="torch-cuda", error=why, measured_at=now))
    return rows


def parse_torch_line(
    line: bytes | str,
    *,
    now: float,
    expected_uuid: Mapping[int, str],
    curves: dict[int, list[PowerPoint]] | None = None,
) -> tuple[int, Measurement] | None:
    """One JSON line of ``selftest_torch.py`` as (index, Measurement); None when not one.

    A line whose UUID differs from the one NVML gave that index is an error: the test
    measured another card than the one it would be registered as. Its ``power_curve``
    goes into ``curves`` (a ``power_error`` is logged: the GPU then has no curve).
    """
    try:
        row: dict[str, Any] = json.loads(line)
        index = int(row["gpu"])
    except (ValueError, KeyError, TypeError):
        return None
    if curves is not None and row.get("power_curve"):
        try:
            curves[index] = [PowerPoint(int(w), int(g), int(d)) for w, g, d in row["power_curve"]]
        except (ValueError, TypeError):
            log.warning("GPU %d: unreadable power curve %r", index, row["power_curve"])
    if row.get("power_error"):
        log.warning("GPU %d: power limits not swept: %s", index, row["power_error"])
    error = str(row.get("error", ""))
    want, got = expected_uuid.get(index, ""), str(row.get("uuid", ""))
    if not error and _uuid_key(want) and _uuid_key(got) and _uuid_key(want) != _uuid_key(got):
        error = f"measured GPU {got} but NVML's GPU {index} is {want} (device order)"
    try:
        m = Measurement(
            fp16_gflops=int(row.get("fp16_gflops", 0)),
            fp32_gflops=int(row.get("fp32_gflops", 0)),
            usable_vram_mb=int(row.get("usable_vram_mb", 0)),
            h2d_mbps=int(row.get("h2d_mbps", 0)),
            d2h_mbps=int(row.get("d2h_mbps", 0)),
            method=str(row.get("method", "torch-cuda")),
            error=error,
            measured_at=now,
            duration_ms=int(row.get("duration_ms", 0)),
        )
    except (ValueError, TypeError):
        return index, Measurement(error=f"unreadable self-test figures: {row!r}"[:300])
    return index, m


def _uuid_key(uuid: str) -> str:
    """A GPU UUID without its ``GPU-`` prefix, lower case; "" unless it has the canonical
    36-character form (then it is not compared: a format torch may change is no mismatch)."""
    bare = uuid.lower().removeprefix("gpu-")
    return bare if len(bare) == 36 and bare.count("-") == 4 else ""


def measure_host(
    state_dir: Path, *, disk_bytes: int = DISK_TEST_BYTES, budget_s: float = DISK_BUDGET_S
) -> HostFigures:
    """The host's RAM (MiB), logical CPU cores and the write speed of ``state_dir``'s disk.

    The disk figure writes ``disk_bytes`` of random data in 4 MiB chunks and fsyncs it,
    stopping early at ``budget_s``, then removes the file; 0 when it cannot be measured
    (a full or read-only disk). Blocking: the agent calls it in a thread.
    """
    return HostFigures(
        _ram_mb(), os.cpu_count() or 0, _disk_write_mbps(state_dir, disk_bytes, budget_s)
    )


def _ram_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        return 0


def _disk_write_mbps(state_dir: Path, total: int, budget_s: float) -> int:
    chunk = os.urandom(min(total, 4 << 20)) if total > 0 else b""
    path = state_dir / ".selftest-disk"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        if not chunk or shutil.disk_usage(state_dir).free < 4 * total:
            return 0  # never fill a nearly full disk to measure it
        written, t0 = 0, time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while written < total and time.perf_counter() - t0 < budget_s:
                written += os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        elapsed = time.perf_counter() - t0
        return int(written / max(elapsed, 1e-6) / 1e6)
    except OSError as err:
        log.info("disk write speed not measured (%s)", err)
        return 0
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def measure_rig(
    backend: GpuBackend,
    state_dir: Path,
    *,
    indices: Iterable[int] | None = None,
    skipped: Mapping[int, str] | None = None,
    budget_s: float = GPU_BUDGET_S,
    python: str = "",
    power: PowerLimits | None = None,
) -> RigFigures:
    """The whole self-test: the host, then the GPUs ``indices`` (default all, less
    ``skipped``); each GPU's PCIe generation read before and after its test; the power
    sweep on the GPUs whose limit ``power`` (default: a new one) may set."""
    skipped = dict(skipped or {})
    wanted = [g.index for g in backend.gpus()] if indices is None else list(indices)
    wanted = [i for i in wanted if i not in skipped]
    host = await asyncio.to_thread(measure_host, state_dir)
    before = {i: _generation(backend, i) for i in wanted}
    power = power or PowerLimits(backend)
    probed = power.probe(wanted)
    settable = {i: probed.get(i, False) for i in wanted}
    limits = {i: _limits(backend, i) for i in wanted if settable[i]}
    curves: dict[int, list[PowerPoint]] = {}
    try:
        gpus = await measure_gpus(
            backend, wanted, budget_s=budget_s, python=python, limits=limits, curves=curves
        )
    finally:  # whatever the sweep did (or was killed doing), the operator's limits again
        for i in limits:
            power.current.pop(i, None)  # whatever the sweep left: set the operator's again
        power.restore(limits)
    if backend.name == "simulated":
        curves = {i: _simulated_curve(backend, i, gpus[i]) for i in limits}
    curves = {i: c for i, c in curves.items() if c and not gpus[i].error}
    gens = {i: max(before[i], _generation(backend, i)) for i in wanted}
    return RigFigures(gpus, gens, host, skipped, curves, settable)


def _limits(backend: GpuBackend, index: int) -> list[int]:
    """The limits to sweep on a GPU: shares of its board limit within its constraints."""
    info = next(g for g in backend.gpus() if g.index == index)
    span = getattr(backend, "power_limit_range", lambda i: None)(index)
    if span is None:
        return sweep_limits(info.power_limit_watts)
    lo, hi, board = span
    return sweep_limits(board or info.power_limit_watts, lo, hi)


def _simulated_curve(backend: GpuBackend, index: int, m: Measurement) -> list[PowerPoint]:
    info = next(g for g in backend.gpus() if g.index == index)
    model = lookup(info.model)
    idle = model.idle_w if model is not None else 0
    return simulated_curve(info.power_limit_watts, idle, m.fp16_gflops)


def describe(model: str, vram_mb: int, m: Measurement) -> tuple[Verdict, str]:
    """The broker's verdict on a GPU (``rigshift.scoring.judge``) and a line of figures."""
    verdict = judge(model, vram_mb, m)
    if m.error:
        return verdict, f"not measured: {m.error}"
    figures = (
        f"score {score(m)}: fp16 {m.fp16_gflops / 1000:.1f} TFLOPS, "
        f"fp32 {m.fp32_gflops / 1000:.1f} TFLOPS, {m.usable_vram_mb} MiB VRAM usable, "
        f"h2d {m.h2d_mbps / 1000:.2f} GB/s, d2h {m.d2h_mbps / 1000:.2f} GB/s"
    )
    return verdict, figures


def log_figures(backend: GpuBackend, figures: RigFigures) -> None:
    """One log line per GPU: its figures, its score and what the broker will make of it."""
    h = figures.host
    log.info(
        "self-test host: %d MiB RAM, %d CPU cores, disk %d MB/s",
        h.ram_mb,
        h.cpu_cores,
        h.disk_write_mbps,
    )
    for g in backend.gpus():
        m = figures.gpus.get(g.index)
        if m is None:
            continue
        verdict, line = describe(g.model, g.vram_mb, m)
        why = f" ({verdict.reason})" if verdict.reason else ""
        level = logging.INFO if verdict.verification == "VERIFIED" else logging.WARNING
        log.log(
            level,
            "self-test GPU %d (%s): %s -> %s%s",
            g.index,
            g.model,
            line,
            verdict.verification.value,
            why,
        )


def measurement_proto(m: Measurement) -> farm_pb2.GpuMeasurement:
    """``rigshift.v1.GpuMeasurement`` of a measurement (the agent's side of the wire)."""
    return measurement_message(m)


def host_proto(h: HostFigures) -> farm_pb2.HostInfo:
    """``rigshift.v1.HostInfo`` of the host's figures."""
    from rigshift.v1 import farm_pb2

    return farm_pb2.HostInfo(
        ram_mb=h.ram_mb, cpu_cores=h.cpu_cores, disk_write_mbps=min(h.disk_write_mbps, 2**31 - 1)
    )


def fill_gpu_infos(infos: list[ws.GpuInfo], figures: RigFigures | None) -> list[ws.GpuInfo]:
    """Put the self-test's figures on RegisterWorker's GPUs (in place; returned too)."""
    if figures is not None:
        for info in infos:
            m = figures.gpus.get(info.index)
            if m is not None:
                info.measurement.CopyFrom(measurement_proto(m))
            info.pcie_generation = figures.pcie_generation.get(info.index, 0)
            if info.index in figures.power_settable:
                info.power_limit_settable = figures.power_settable[info.index]
            del info.power_curve[:]
            info.power_curve.extend(curve_protos(figures.power_curves.get(info.index, ())))
    return infos
