"""Power curves and the power policy's choice of a cap (issue 16), pure and shared.

A GPU's **power curve** is its throughput and draw at a few power limits, measured by
the self-test's sweep (``worker_agent.selftest``) or, on a simulated rig, given by
:func:`simulated_throughput_ratio`. The broker stores it per GPU and, for a farm on the
``efficient`` policy, picks per GPU the lowest limit whose throughput is at least
``100 - max_slowdown_percent`` % of the uncapped throughput (:func:`choose_limit`);
the agent applies that limit while the GPU runs AI work.

The simulated curve (``docs/gpu.md``): with ``f`` the limit as a share of the board
limit, throughput is ``1 - 0.9 (1 - f)^2`` of the uncapped throughput. It is fitted to
published points: an RTX 3090 capped at 280 W of 350 W (f = 0.8) keeps over 95 % of its
training throughput (96.4 % here); a card at 60 % of its board power keeps about 85 %
(Zeus, NSDI '23, figure 2, and the power-capping studies it cites). A card draws what
it would uncapped, or its cap when that is lower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "SWEEP_SHARES_PERCENT",
    "PowerPoint",
    "choose_limit",
    "ratio_at",
    "simulated_throughput_ratio",
]

SWEEP_SHARES_PERCENT: tuple[int, ...] = (50, 60, 70, 80, 90, 100)
"""The limits the self-test sweeps, as percent of the board limit."""


@dataclass(frozen=True, slots=True)
class PowerPoint:
    """Throughput (fp16 GFLOP/s) and average draw (W) at one power limit (W)."""

    limit_watts: int
    fp16_gflops: int
    draw_watts: int


def simulated_throughput_ratio(limit_watts: int, board_watts: int) -> float:
    """The simulated curve: throughput at ``limit_watts`` over the uncapped throughput."""
    if board_watts <= 0 or limit_watts >= board_watts:
        return 1.0
    f = max(0.0, limit_watts / board_watts)
    return max(0.0, 1.0 - 0.9 * (1.0 - f) ** 2)


def choose_limit(curve: Sequence[PowerPoint], max_slowdown_percent: int) -> int:
    """The lowest limit whose throughput is at least ``100 - max_slowdown_percent`` % of
    the throughput at the highest limit measured; 0 (no cap) for an empty curve or a
    curve whose best throughput is 0. The highest limit itself when nothing lower keeps
    enough throughput."""
    points = sorted(curve, key=lambda p: p.limit_watts)
    if not points:
        return 0
    top = points[-1]
    if top.fp16_gflops <= 0:
        return 0
    need = top.fp16_gflops * (100 - max(0, min(100, max_slowdown_percent)))
    for p in points:
        if p.fp16_gflops * 100 >= need:
            return p.limit_watts
    return top.limit_watts


def ratio_at(curve: Sequence[PowerPoint], limit_watts: int) -> tuple[int, int]:
    """(throughput, draw) at ``limit_watts`` relative to the highest limit measured, in
    thousandths: the point at that limit, or the nearest measured limit above it; (1000,
    1000) when there is no curve or no cap."""
    points = sorted(curve, key=lambda p: p.limit_watts)
    if not points or not limit_watts or points[-1].fp16_gflops <= 0:
        return 1000, 1000
    top = points[-1]
    at = next((p for p in points if p.limit_watts >= limit_watts), top)
    draw = 1000 * at.draw_watts // top.draw_watts if top.draw_watts else 1000
    return 1000 * at.fp16_gflops // top.fp16_gflops, draw
