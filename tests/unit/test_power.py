"""Power curves and the choice of a cap (``rigshift.power``), table-driven.

The curve below is the simulated RTX 3090 (``simulated_throughput_ratio``, board 350 W,
uncapped draw 340 W, fp16 49,700 GFLOP/s uncapped): throughput ``1 - 0.9 (1 - f)^2`` of
49,700 at f = 0.5 .. 1.0, draw min(340, cap)::

    limit W   175     210     245     280     315     350
    fp16      38,517  42,543  45,674  47,910  49,252  49,700
    draw W    175     210     245     280     315     340
"""

from __future__ import annotations

import pytest

from rigshift.power import (
    SWEEP_SHARES_PERCENT,
    PowerPoint,
    choose_limit,
    ratio_at,
    simulated_throughput_ratio,
)

BOARD, UNCAPPED_DRAW, TOP = 350, 340, 49_700


def simulated_curve(board: int = BOARD, draw: int = UNCAPPED_DRAW, top: int = TOP):
    """The simulated curve at the self-test's sweep shares."""
    out = []
    for share in SWEEP_SHARES_PERCENT:
        limit = board * share // 100
        out.append(
            PowerPoint(limit, int(top * simulated_throughput_ratio(limit, board)), min(draw, limit))
        )
    return tuple(out)


CURVE = simulated_curve()


def test_the_simulated_curve_is_the_table_in_the_docstring():
    assert [p.fp16_gflops for p in CURVE] == [38_517, 42_543, 45_674, 47_910, 49_252, 49_700]
    assert [p.limit_watts for p in CURVE] == [175, 210, 245, 280, 315, 350]
    assert [p.draw_watts for p in CURVE] == [175, 210, 245, 280, 315, 340]


@pytest.mark.parametrize(
    ("slowdown", "limit"),
    [
        (0, 350),  # need 49,700: only the top
        (1, 315),  # need 49,203: 49,252 qualifies
        (5, 280),  # need 47,215: 47,910 qualifies, 45,674 does not
        (10, 245),  # need 44,730: 45,674
        (15, 210),  # need 42,245: 42,543
        (20, 210),  # need 39,760: 38,517 falls short
        (25, 175),  # need 37,275: the lowest point
        (50, 175),
        (-3, 350),  # clamped to 0
        (150, 175),  # clamped to 100
    ],
)
def test_choose_limit_picks_the_lowest_limit_within_the_slowdown(slowdown, limit):
    assert choose_limit(CURVE, slowdown) == limit


@pytest.mark.parametrize(
    ("curve", "limit"),
    [
        ((), 0),  # no curve: no cap
        ((PowerPoint(200, 0, 150), PowerPoint(300, 0, 250)), 0),  # measured nothing
        (tuple(reversed(CURVE)), 245),  # any order
    ],
)
def test_choose_limit_edge_cases(curve, limit):
    assert choose_limit(curve, 10) == limit


@pytest.mark.parametrize(
    ("limit", "ratios"),
    [
        (0, (1000, 1000)),  # no cap
        (350, (1000, 1000)),
        # 1000 x 47,910 / 49,700 = 963.98 -> 963; 1000 x 280 / 340 = 823.5 -> 823
        (280, (963, 823)),
        (245, (918, 720)),  # 918.99, 720.6
        (260, (963, 823)),  # between points: the measured limit above it
        (400, (1000, 1000)),  # above the curve: the top
    ],
)
def test_ratio_at(limit, ratios):
    assert ratio_at(CURVE, limit) == ratios


def test_ratio_at_without_a_curve_is_one():
    assert ratio_at((), 200) == (1000, 1000)


@pytest.mark.parametrize(
    ("limit", "board", "ratio"),
    [(350, 350, 1.0), (400, 350, 1.0), (280, 350, 0.964), (175, 350, 0.775), (0, 350, 0.1)],
)
def test_simulated_throughput_ratio(limit, board, ratio):
    assert simulated_throughput_ratio(limit, board) == pytest.approx(ratio)
