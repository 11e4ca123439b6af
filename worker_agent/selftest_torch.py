"""The self-test's GPU benchmark, with torch: run as a subprocess by ``selftest.py``.

Standalone on purpose: it imports nothing of Rigshift, so the agent can run it with any
interpreter that has torch (``selftest_python`` in the agent's config), by path or as
``python -m worker_agent.selftest_torch``. It prints one JSON object per GPU on stdout
as soon as that GPU is done, so a parent that kills it at its time budget keeps the
GPUs already measured::

    python selftest_torch.py --gpu 0 --gpu 1 --budget-s 40 --json
    {"gpu": 0, "uuid": "GPU-…", "fp16_gflops": 71200, "fp32_gflops": 24900, …}

What it measures on each GPU, in order, each step bounded by a share of the GPU's time:

1. **Matrix multiply**, fp16 then fp32: square ``n x n`` matrices (4096 on CUDA), two
   warm-up products, then as many as fit in the step's time, timed between two
   ``torch.cuda.synchronize()``; 2·n³ floating-point operations per product. TF32 and
   reduced-precision fp16 reductions are switched off, so fp32 is real fp32 and fp16
   accumulates in fp32, which is what the reference figures (``rigshift.scoring``) are.
2. **Host↔device bandwidth**: a pinned host buffer copied to the device and back, up
   to five times each, MB/s (10**6 bytes) of the best copy; the buffer is 256 MiB, or
   what an 8 MiB probe copy says a tenth of the step's time moves (a x1 riser: ~20 MiB).
3. **Usable VRAM**: after the benchmark's tensors are freed, chunks of 256 MiB then
   16 MiB are allocated until the allocator refuses (or the time is up); each chunk is
   filled with its own 32-bit pattern and read back (min and max equal the pattern),
   the verified MiB reported.

4. **Power sweep** (``--limits GPU:W,W,…``, given by the agent for GPUs whose limit it
   may set): at each limit, lowest first, ``nvmlDeviceSetPowerManagementLimit`` (mW),
   then fp16 products for the step's time; the first quarter lets the limit settle,
   the rest is timed, its draw the difference of the total-energy counter over that
   time (or the mean of power readings where there is no counter). The operator's
   limit is put back in a ``finally`` (the agent puts it back too, should this process
   be killed). Each GPU's line gains ``power_curve``: ``[[limit_w, fp16_gflops,
   draw_w], …]``, or ``power_error`` when a limit could not be set.

``--device cpu`` runs the same steps on the CPU with small sizes (a test of this script
where no GPU is present; its figures mean nothing). Without torch, or without CUDA in
``cuda`` mode, every GPU's line carries ``error`` ("torch with CUDA not available: …").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

MIB = 1 << 20


def _gflops(torch: Any, dev: Any, dtype: Any, n: int, seconds: float, sync: Any) -> int:
    """Matrix-multiply throughput in GFLOP/s: warm up twice, then multiply for ``seconds``."""
    a = torch.randn(n, n, device=dev, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=dev, dtype=torch.float32).to(dtype)
    for _ in range(2):
        torch.matmul(a, b)
    sync()
    products, t0 = 0, time.perf_counter()
    while True:
        for _ in range(4):
            torch.matmul(a, b)
        products += 4
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    del a, b
    return int(2 * n**3 * products / elapsed / 1e9)


def _bandwidth(torch: Any, dev: Any, max_bytes: int, seconds: float, sync: Any) -> tuple[int, int]:
    """Best host→device and device→host copy rates, MB/s, with a pinned host buffer.

    An 8 MiB probe copy first (it also warms the path up) sizes the buffer so that one
    copy takes about a tenth of ``seconds``: a x1 riser (~0.2 GB/s) copies ~20 MiB at a
    time, a x16 slot the full ``max_bytes``.
    """
    pin = dev.type == "cuda"

    def copy_rate(dst: Any, src: Any) -> float:
        sync()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=pin)
        sync()
        return dst.numel() / (time.perf_counter() - t0)

    probe = min(8 * MIB, max_bytes)
    rate = copy_rate(
        torch.empty(probe, dtype=torch.uint8, device=dev),
        torch.ones(probe, dtype=torch.uint8, pin_memory=pin),
    )
    nbytes = int(min(max_bytes, max(probe, rate * seconds / 10)))
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    host.fill_(0xA5)
    device = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    best = [0.0, 0.0]
    deadline = time.perf_counter() + seconds
    for _ in range(5):
        best[0] = max(best[0], copy_rate(device, host))
        best[1] = max(best[1], copy_rate(host, device))
        if time.perf_counter() > deadline:
            break
    del host, device
    return int(best[0] / 1e6), int(best[1] / 1e6)


def _usable_vram_mb(torch: Any, dev: Any, limit_mb: int, seconds: float, sync: Any) -> int:
    """MiB the allocator hands out whose pattern reads back intact (see the docstring)."""
    chunks: list[Any] = []
    verified = 0
    deadline = time.perf_counter() + seconds
    try:
        for chunk_mb in (256, 16):
            while verified + chunk_mb <= limit_mb and time.perf_counter() < deadline:
                try:
                    chunk = torch.empty(chunk_mb * MIB // 4, dtype=torch.int32, device=dev)
                except (RuntimeError, MemoryError):  # torch.OutOfMemoryError is a RuntimeError
                    break
                pattern = (0x5A5A5A5A ^ (len(chunks) * 2654435761)) & 0x7FFFFFFF
                chunk.fill_(pattern)
                sync()
                if int(chunk.min()) != pattern or int(chunk.max()) != pattern:
                    raise RuntimeError(f"VRAM pattern mismatch after {verified} MiB")
                chunks.append(chunk)
                verified += chunk_mb
    finally:
        del chunks
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return verified


def parse_limits(values: list[str]) -> dict[int, list[int]]:
    """``["0:175,210", "1:85"]`` → ``{0: [175, 210], 1: [85]}`` (watts, lowest first)."""
    out: dict[int, list[int]] = {}
    for value in values:
        gpu, sep, watts = value.partition(":")
        if not sep:
            raise ValueError(f"--limits wants GPU:W,W,... not {value!r}")
        out[int(gpu)] = sorted({int(w) for w in watts.split(",") if w.strip()})
    return out


class _Nvml:
    """Sets and reads one GPU's power through pynvml (``cuda`` mode); a no-op in ``cpu``."""

    def __init__(self, index: int, device: str) -> None:
        self.nvml: Any = None
        self.handle: Any = None
        self.operator_mw = 0
        if device == "cuda":
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.operator_mw = int(pynvml.nvmlDeviceGetPowerManagementLimit(self.handle))

    def set(self, watts: int) -> None:
        if self.nvml is not None:
            self.nvml.nvmlDeviceSetPowerManagementLimit(self.handle, int(watts) * 1000)

    def energy_mj(self) -> int | None:
        if self.nvml is None:
            return None
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except self.nvml.NVMLError:
            return None

    def power_w(self) -> float:
        return 0.0 if self.nvml is None else self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3

    def restore(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlDeviceSetPowerManagementLimit(self.handle, self.operator_mw)
            finally:
                self.nvml.nvmlShutdown()


def _sweep(
    torch: Any, dev: Any, n: int, limits: list[int], seconds: float, sync: Any, power: _Nvml
) -> list[list[int]]:
    """[limit, fp16 GFLOP/s, draw W] at each limit (see the module docstring)."""
    a = torch.randn(n, n, device=dev, dtype=torch.float32).to(torch.float16)
    b = torch.randn(n, n, device=dev, dtype=torch.float32).to(torch.float16)
    step = seconds / max(1, len(limits))
    out: list[list[int]] = []
    for watts in limits:
        power.set(watts)
        settle = time.perf_counter() + step / 4
        while time.perf_counter() < settle:
            torch.matmul(a, b)
            sync()
        e0, samples = power.energy_mj(), []
        products, t0 = 0, time.perf_counter()
        while True:
            for _ in range(4):
                torch.matmul(a, b)
            products += 4
            sync()
            samples.append(power.power_w())
            elapsed = time.perf_counter() - t0
            if elapsed >= step * 3 / 4:
                break
        e1 = power.energy_mj()
        if e0 is not None and e1 is not None:
            draw = (e1 - e0) / 1000 / elapsed
        else:
            draw = sum(samples) / len(samples)
        out.append([watts, int(2 * n**3 * products / elapsed / 1e9), int(draw)])
    del a, b
    return out


def measure_one(
    torch: Any, index: int, device: str, budget_s: float, limits: list[int] | None = None
) -> dict[str, Any]:
    """The figures of GPU ``index`` (or the CPU in ``cpu`` mode) within ``budget_s``;
    with ``limits``, its power curve too."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"gpu": index, "uuid": "", "name": ""}
    if device == "cuda":
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
        props = torch.cuda.get_device_properties(dev)
        uuid = getattr(props, "uuid", None)
        text = "" if uuid is None else str(uuid)
        row["uuid"] = text if not text or text.upper().startswith("GPU-") else f"GPU-{text}"
        row["name"] = props.name
        free, _total = torch.cuda.mem_get_info(dev)
        limit_mb = free // MIB

        def sync() -> None:
            torch.cuda.synchronize(dev)

        n, copy_bytes, method = 4096, 256 * MIB, "torch-cuda"
    else:
        dev = torch.device("cpu")
        row["name"] = "cpu"
        limit_mb = 64

        def sync() -> None:
            return None

        n, copy_bytes, method = 256, 16 * MIB, "torch-cpu"
    # fp16, fp32, copies, VRAM, (the power sweep,) and a share to spare
    share = budget_s / (6 if limits else 5)
    row["fp16_gflops"] = _gflops(torch, dev, torch.float16, n, share * 0.8, sync)
    row["fp32_gflops"] = _gflops(torch, dev, torch.float32, n, share * 0.8, sync)
    row["h2d_mbps"], row["d2h_mbps"] = _bandwidth(torch, dev, copy_bytes, share, sync)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    row["usable_vram_mb"] = _usable_vram_mb(torch, dev, limit_mb, share, sync)
    if limits:
        try:
            power = _Nvml(index, device)
        except Exception as err:  # no pynvml, or NVML cannot start
            row["power_error"] = f"{type(err).__name__}: {err}"[:300]
        else:
            try:
                row["power_curve"] = _sweep(torch, dev, n, limits, share, sync, power)
            except Exception as err:  # NO_PERMISSION, NOT_SUPPORTED: no curve
                row["power_error"] = f"{type(err).__name__}: {err}"[:300]
            finally:
                power.restore()
    row["method"] = method
    row["error"] = ""
    row["duration_ms"] = int((time.perf_counter() - t0) * 1000)
    return row


def main(argv: list[str] | None = None) -> int:
    """Measure the GPUs named by ``--gpu`` and print one JSON line each; 0 unless torch
    (with CUDA in ``cuda`` mode) is missing, then 3 with the error on every line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, action="append", default=[], help="GPU index")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--budget-s", type=float, default=40.0, help="for all GPUs together")
    parser.add_argument("--json", action="store_true", help="JSON lines (the only output)")
    parser.add_argument(
        "--limits", action="append", default=[], help="GPU:W,W,... power limits to sweep"
    )
    args = parser.parse_args(argv)
    gpus = args.gpu or [0]
    limits = parse_limits(args.limits)

    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)

    try:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
    except Exception as err:  # ImportError, or a broken CUDA install
        for i in gpus:
            emit({"gpu": i, "error": f"torch with CUDA not available: {err}"})
        return 3
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    per_gpu = args.budget_s / len(gpus)
    for i in gpus:
        try:
            emit(measure_one(torch, i, args.device, per_gpu, limits.get(i)))
        except Exception as err:  # one GPU failing is that GPU's result, not the run's
            emit({"gpu": i, "error": f"{type(err).__name__}: {err}"[:500]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
