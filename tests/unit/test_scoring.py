"""``rigshift.scoring``: the score's arithmetic and the verification rule, table-driven.

The RTX 3090's reference figures are fp16 49 700 and fp32 24 920 GFLOP/s (70 % of
71.0 and 35.6 TFLOPS); score = (60·a·24920 + 40·b·49700) // (49700·24920).
"""

from __future__ import annotations

import pytest

from rigshift.scoring import (
    REFERENCE_MODEL,
    Measurement,
    Verification,
    judge,
    reference,
    score,
)

A, B = 49_700, 24_920  # the RTX 3090's fp16 and fp32 reference


def test_the_reference_model_and_its_figures() -> None:
    assert REFERENCE_MODEL == "RTX 3090"
    ref = reference("rtx3090")  # matched without spaces and case
    assert ref is not None and (ref.fp16_gflops, ref.fp32_gflops) == (A, B)
    assert reference("GTX 1080") is None


@pytest.mark.parametrize(
    ("fp16", "fp32", "expected"),
    [
        (A, B, 100),  # 60 + 40
        (2 * A, 2 * B, 200),  # twice as fast
        (17_780, 8_890, 35),  # an RTX 3060's reference: 60·0.3577 + 40·0.3567 = 35.7
        (77_770, 19_460, 125),  # an A5000's: 60·1.5648 + 40·0.7809 = 125.1 (fp16-heavy)
        (0, B, 40),  # fp32 only
        (A, 0, 60),  # fp16 only
        (16_566, 8_306, 33),  # an impostor at a third: 19.999 + 13.332 = 33.3
        (57_155, 24_920, 109),  # 60·1.15 + 40 = 109.0 exactly (floats gave 108)
        (34_790, 17_444, 70),  # 70 % of both: 42 + 28
        (34_789, 17_444, 69),  # a GFLOP/s under: 69.9988, rounded down
        (0, 0, 0),  # not measured
    ],
)
def test_score(fp16: int, fp32: int, expected: int) -> None:
    assert score(Measurement(fp16_gflops=fp16, fp32_gflops=fp32)) == expected


VRAM = 24_576  # an RTX 3090's MiB; 90 % is 22 118.4


@pytest.mark.parametrize(
    ("model", "m", "verification", "reason_has"),
    [
        ("RTX 3090", None, Verification.PENDING, ["not measured yet"]),
        (
            "RTX 3090",
            Measurement(error="GPU not responding"),
            Verification.UNVERIFIED,
            ["self-test failed: GPU not responding"],
        ),
        (
            "GTX 1080",
            Measurement(A, B, 23_000),
            Verification.UNVERIFIED,
            ["no reference figures for model 'GTX 1080'"],
        ),
        ("RTX 3090", Measurement(A, B, 23_500), Verification.VERIFIED, []),
        # exactly 70 % of both throughputs and the first MiB over 90 %: passes
        ("RTX 3090", Measurement(34_790, 17_444, 22_119), Verification.VERIFIED, []),
        # the impostor: a third of an RTX 3090
        (
            "RTX 3090",
            Measurement(16_566, 8_306, 23_500),
            Verification.UNVERIFIED,
            [
                "under 70%",
                "fp16 16.6 TFLOPS is 33% of a RTX 3090's 49.7",
                "fp32 8.3 TFLOPS is 33% of a RTX 3090's 24.9",
            ],
        ),
        # one GFLOP/s under 70 % in fp16 only, and one MiB short of 90 % VRAM
        (
            "RTX 3090",
            Measurement(34_789, 17_444, 22_118),
            Verification.UNVERIFIED,
            ["fp16 34.8 TFLOPS is 69%", "only 22118 of 24576 MiB VRAM usable"],
        ),
        # a real RTX 3060 claiming to be an RTX 3090
        (
            "RTX 3090",
            Measurement(17_780, 8_890, 11_800),
            Verification.UNVERIFIED,
            ["is 35% of a RTX 3090's", "only 11800 of 24576 MiB"],
        ),
        # the same card claiming what it is
        ("RTX 3060", Measurement(17_780, 8_890, 11_800), Verification.VERIFIED, []),
    ],
)
def test_judge(
    model: str, m: Measurement | None, verification: Verification, reason_has: list[str]
) -> None:
    vram = 12_288 if model == "RTX 3060" else VRAM
    verdict = judge(model, vram, m)
    assert verdict.verification == verification
    for part in reason_has:
        assert part in verdict.reason
    if verification == Verification.VERIFIED:
        assert verdict.reason == ""
    assert verdict.score == (0 if m is None else score(m))


def test_the_score_is_the_figures_not_the_claim() -> None:
    """Two claims, one card: the score is the same; only the verdict differs."""
    m = Measurement(17_780, 8_890, 11_800)
    assert judge("RTX 3090", VRAM, m).score == judge("RTX 3060", 12_288, m).score == 35


def test_docs_gpu_md_reference_table_matches_the_code() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "gpu.md").read_text()
    section = text.split("## The self-test and the score", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[3].isdigit():
            rows[cells[0]] = (float(cells[1]), float(cells[2]), int(cells[3]))
    assert len(rows) == 12
    for model, (fp16, fp32, s) in rows.items():
        ref = reference(model)
        assert ref is not None, model
        assert (round(ref.fp16_gflops / 1000, 1), round(ref.fp32_gflops / 1000, 1)) == (fp16, fp32)
        assert score(Measurement(ref.fp16_gflops, ref.fp32_gflops)) == s, model
