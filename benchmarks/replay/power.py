"""Power caps in the replay (issue 16): each simulated GPU's power curve and what a cap
does to a job in virtual time.

Every rig's GPUs register the simulated curve of ``rigshift.power`` (the self-test's sweep
shares of the rig's board ``watts``; throughput ``1 - 0.9 (1 - f)^2`` of the model's
reference fp16 figure, draw min(board watts, cap): the replay's uncapped power model is
board watts) and say their limit may be set. Under :class:`PowerSetting` ``efficient``
every farm's terms get ``PowerPolicy.EFFICIENT`` with the setting's slowdown, so the
broker's own ``choose_limit`` picks each GPU's cap and the ``Assign`` carries it; the
replay then stretches the job's duration by 1000 / the curve's throughput ratio at the cap
and draws the curve's capped power (:func:`capped`), both from ``rigshift.power.ratio_at``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from broker.economics import FarmTerms, PowerPolicy
from rigshift.power import SWEEP_SHARES_PERCENT, PowerPoint, ratio_at, simulated_throughput_ratio
from rigshift.scoring import reference

__all__ = ["MAX", "PowerSetting", "capped", "simulated_curve"]

_FALLBACK_FP16 = 10_000  # GFLOP/s for a model without reference figures (ratios only matter)


@dataclass(frozen=True, slots=True)
class PowerSetting:
    """A farm power policy to replay: ``max`` (board limits) or ``efficient`` at a slowdown."""

    policy: str = "max"
    max_slowdown_percent: int = 0

    @property
    def label(self) -> str:
        """``max`` or ``efficient-10``."""
        return self.policy if self.policy == "max" else f"{self.policy}-{self.max_slowdown_percent}"

    def terms(self, terms: FarmTerms) -> FarmTerms:
        """A farm's terms under this setting."""
        if self.policy == "max":
            return replace(terms, power_policy=PowerPolicy.MAX, max_slowdown_percent=0)
        return replace(
            terms,
            power_policy=PowerPolicy.EFFICIENT,
            max_slowdown_percent=self.max_slowdown_percent,
        )


MAX = PowerSetting()


def simulated_curve(model: str, board_watts: int) -> tuple[PowerPoint, ...]:
    """The simulated curve of one GPU at the self-test's sweep shares, lowest limit first."""
    ref = reference(model)
    top = ref.fp16_gflops if ref is not None else _FALLBACK_FP16
    out = []
    for share in SWEEP_SHARES_PERCENT:
        limit = board_watts * share // 100
        throughput = int(top * simulated_throughput_ratio(limit, board_watts))
        out.append(PowerPoint(limit, throughput, min(board_watts, limit)))
    return tuple(out)


def capped(
    curve: tuple[PowerPoint, ...], limit_watts: int, duration_s: float, board_watts: int
) -> tuple[float, float]:
    """(duration, draw in W per GPU) of a job of ``duration_s`` uncapped run at
    ``limit_watts`` (0: uncapped): stretched by 1000 / the throughput ratio, drawing the
    draw ratio of board watts."""
    throughput, draw = ratio_at(curve, limit_watts)
    return duration_s * 1000 / max(throughput, 1), board_watts * draw / 1000
