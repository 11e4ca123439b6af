"""The low-level power-limit helpers both the GPU backends (``gpu.py``) and the
power-limit shell (``power.py``) use: the simulated draw under a cap, and NVML's
power-limit calls. It imports nothing of the agent, so ``gpu.py`` and ``power.py``
do not import each other."""

from __future__ import annotations

from typing import Any

__all__ = ["capped_wave", "nvml_power_range", "nvml_set_power_limit"]


def capped_wave(mean: float, amp: float, cap: float) -> tuple[float, float]:
    """A draw ``mean + amp * sin(…)`` under the power cap ``cap`` (0: none), as a new
    (mean, amp): the mean is ``min(mean, cap)`` and the swing at most ``cap`` minus that,
    so the draw never exceeds the cap, a cap at or below the mean is a flat draw at the
    cap, and the draw is still a sine whose integral is exact in closed form."""
    if cap <= 0 or mean + amp <= cap:
        return mean, amp
    if cap <= mean:
        return float(cap), 0.0
    return mean, min(amp, cap - mean)


def _refused(nvml: Any, err: Exception) -> bool:
    """NO_PERMISSION (not root) or NOT_SUPPORTED: the agent may not set limits here."""
    codes = (
        getattr(nvml, "NVML_ERROR_NO_PERMISSION", 4),
        getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3),
    )
    return getattr(err, "value", None) in codes


def nvml_power_range(nvml: Any, handle: Any) -> tuple[int, int, int] | None:
    """(min, max, default) power limit of the card in watts; None when NVML does not say."""
    try:
        lo, hi = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        default = nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
    except nvml.NVMLError:
        return None
    return int(lo) // 1000, int(hi) // 1000, int(default) // 1000


def nvml_set_power_limit(nvml: Any, handle: Any, watts: int) -> bool:
    """Set the card's power limit to ``watts`` (clamped to its constraints); False when
    NVML refuses for want of permission or support; other NVML errors are raised."""
    milli = int(watts) * 1000
    limits = nvml_power_range(nvml, handle)
    if limits is not None:
        milli = max(limits[0] * 1000, min(limits[1] * 1000, milli))
    try:
        nvml.nvmlDeviceSetPowerManagementLimit(handle, milli)
    except nvml.NVMLError as err:
        if _refused(nvml, err):
            return False
        raise
    return True
