"""What a GPU really does: the self-test's figures, the score, and the verification rule.

Pure and shared: the agent prints the score of its own self-test
(``rigshift agent selftest``), and the broker computes the same score and verdict from
the figures the agent registers, never from the model the agent claims
(``docs/gpu.md``).

**Reference figures.** :data:`REFERENCE` holds, per catalogue model, what the
self-test measures on a healthy card of that model: dense matrix-multiply throughput
in GFLOP/s, fp16 (fp32 accumulate, as torch does) and fp32. They are 70 % of the
vendors' peak figures (NVIDIA Ampere GA102/GA104 white paper, RTX A-series data
sheets, AMD RDNA2 specifications), about what a large ``torch.matmul`` reaches.

**Score.** ``100 x (0.6 x fp16 / fp16_3090 + 0.4 x fp32 / fp32_3090)``, rounded down:
an RTX 3090 that measures its reference scores 100, a card twice as fast 200, in the
spirit of Vast.ai's DLPerf. Only compute counts; PCIe bandwidth, host RAM and CPU cores
are matched separately (``min_pcie_gbps`` and friends), so a riser rig's card scores
what the card is worth.

**Verification.** A GPU is VERIFIED when its figures reach :data:`VERIFY_RATIO` (70 %)
of its claimed model's reference in both precisions and it could fill
:data:`VRAM_RATIO` (90 %) of its claimed VRAM; otherwise UNVERIFIED with the reason in
words. A model without reference figures, or a test that failed, is UNVERIFIED too; a
GPU never measured is PENDING.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING

from rigshift.catalogue import model_key

if TYPE_CHECKING:
    from rigshift.v1 import farm_pb2

__all__ = [
    "REFERENCE",
    "REFERENCE_MODEL",
    "VERIFY_RATIO",
    "VRAM_RATIO",
    "Measurement",
    "Reference",
    "Verdict",
    "Verification",
    "judge",
    "measurement_message",
    "reference",
    "score",
]


class Verification(StrEnum):
    """Names match ``rigshift.v1.Gpu.Verification``."""

    PENDING = "PENDING"
    VERIFIED = "VERIFIED"
    UNVERIFIED = "UNVERIFIED"


@dataclass(frozen=True, slots=True)
class Reference:
    """What a healthy card of one model measures, GFLOP/s."""

    fp16_gflops: int
    fp32_gflops: int


@dataclass(frozen=True, slots=True)
class Measurement:
    """The self-test's figures for one GPU (``rigshift.v1.GpuMeasurement``); 0: not measured.

    ``error`` says why the GPU could not be measured or failed the test (empty: it ran).
    """

    fp16_gflops: int = 0
    fp32_gflops: int = 0
    usable_vram_mb: int = 0
    h2d_mbps: int = 0
    d2h_mbps: int = 0
    method: str = ""
    error: str = ""
    measured_at: float = 0.0
    duration_ms: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The broker's view of one GPU: its verification, why, and its score."""

    verification: Verification
    reason: str
    score: int


def _ref(peak_fp16_tflops: float, peak_fp32_tflops: float) -> Reference:
    return Reference(int(peak_fp16_tflops * 700), int(peak_fp32_tflops * 700))


REFERENCE: Mapping[str, Reference] = MappingProxyType(
    {
        model_key(name): _ref(fp16, fp32)
        for name, fp16, fp32 in (
            #  model         peak fp16 (fp32 acc.) TFLOPS, peak fp32 TFLOPS
            ("RTX 3060", 25.4, 12.7),
            ("RTX 3060 Ti", 32.4, 16.2),
            ("RTX 3070", 40.6, 20.3),
            ("RTX 3070 Ti", 43.5, 21.7),
            ("RTX 3080", 59.5, 29.8),
            ("RTX 3080 Ti", 68.2, 34.1),
            ("RTX 3090", 71.0, 35.6),
            ("RX 6700 XT", 26.4, 13.2),
            ("RX 6800 XT", 41.5, 20.7),
            ("A4000", 76.7, 19.2),
            ("A5000", 111.1, 27.8),
            ("CMP 90HX", 43.8, 21.9),
        )
    }
)
"""Reference figures per :func:`~rigshift.catalogue.model_key`."""

REFERENCE_MODEL = "RTX 3090"
"""The model that scores 100."""

VERIFY_RATIO = 0.70
"""Share of the claimed model's reference throughput a GPU must reach to be VERIFIED."""

VRAM_RATIO = 0.90
"""Share of the claimed VRAM the self-test must fill and verify."""


def reference(model: str) -> Reference | None:
    """Reference figures of ``model`` (matched without spaces and case), or None."""
    return REFERENCE.get(model_key(model))


def score(m: Measurement) -> int:
    """The score of measured figures, an RTX 3090 = 100 (0 when compute was not measured)."""
    base = REFERENCE[model_key(REFERENCE_MODEL)]
    # 100 x (0.6 x a / A + 0.4 x b / B) in integers: floats would round 100.0 down to 99
    # for some figures.
    value = (60 * m.fp16_gflops * base.fp32_gflops + 40 * m.fp32_gflops * base.fp16_gflops) // (
        base.fp16_gflops * base.fp32_gflops
    )
    return max(0, value)


def judge(model: str, vram_mb: int, m: Measurement | None) -> Verdict:
    """Verification of a GPU claiming ``model`` with ``vram_mb`` against its measurement."""
    if m is None:
        return Verdict(Verification.PENDING, "not measured yet (self-test pending)", 0)
    if m.error:
        return Verdict(Verification.UNVERIFIED, f"self-test failed: {m.error}", score(m))
    s = score(m)
    ref = reference(model)
    if ref is None:
        return Verdict(Verification.UNVERIFIED, f"no reference figures for model {model!r}", s)
    short = []
    for what, got, want in (
        ("fp16", m.fp16_gflops, ref.fp16_gflops),
        ("fp32", m.fp32_gflops, ref.fp32_gflops),
    ):
        if 100 * got < round(100 * VERIFY_RATIO) * want:  # integers: exactly 70 % passes
            short.append(
                f"{what} {got / 1000:.1f} TFLOPS is {100 * got // want}% of a {model}'s "
                f"{want / 1000:.1f}"
            )
    if vram_mb and 100 * m.usable_vram_mb < round(100 * VRAM_RATIO) * vram_mb:
        short.append(f"only {m.usable_vram_mb} of {vram_mb} MiB VRAM usable")
    if short:
        limit = int(VERIFY_RATIO * 100)
        return Verdict(
            Verification.UNVERIFIED,
            f"measures short of its claimed model (under {limit}%): " + "; ".join(short),
            s,
        )
    return Verdict(Verification.VERIFIED, "", s)


def measurement_message(m: Measurement) -> farm_pb2.GpuMeasurement:
    """``rigshift.v1.GpuMeasurement`` of a measurement: what the agent sends and the broker
    shows (bandwidths clamped to the int32 fields)."""
    from rigshift.v1 import farm_pb2

    out = farm_pb2.GpuMeasurement(
        fp16_gflops=m.fp16_gflops,
        fp32_gflops=m.fp32_gflops,
        usable_vram_mb=m.usable_vram_mb,
        h2d_mbps=min(m.h2d_mbps, 2**31 - 1),
        d2h_mbps=min(m.d2h_mbps, 2**31 - 1),
        method=m.method,
        error=m.error,
        duration_ms=m.duration_ms,
    )
    if m.measured_at:
        out.measure_time.FromNanoseconds(int(m.measured_at * 1e9))
    return out
