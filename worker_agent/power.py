"""Power limits on the rig (issue 16): the sweep's simulated curve, setting a limit
through NVML, and the shell that applies an attempt's cap and restores the operator's.

- :func:`~worker_agent.power_draw.capped_wave`: the simulated power model under a cap.
- :func:`simulated_curve`: a simulated GPU's power curve, from its measured fp16 figure
  and ``rigshift.power.simulated_throughput_ratio``; the draw at each limit is
  ``min(mean uncapped training draw, limit)``, the same mean the capped model draws.
- :func:`~worker_agent.power_draw.nvml_set_power_limit`:
  ``nvmlDeviceSetPowerManagementLimit`` in mW, clamped to
  ``nvmlDeviceGetPowerManagementLimitConstraints``; False when not permitted (not root:
  NVML_ERROR_NO_PERMISSION) or unsupported.
- :class:`PowerLimits`: the operator's limit of each GPU as read at start
  (``GpuInfo.power_limit_watts``); :meth:`~PowerLimits.apply` sets an attempt's cap,
  :meth:`~PowerLimits.restore` puts the operator's back (for mining and idle). A GPU
  whose limit cannot be set is said once in the log and runs uncapped. While a GPU is
  capped, the operator's limits are kept in ``STATE_DIR/power-limits.json``: an agent
  that died with a cap in force reads them from there at its next start (the card
  would otherwise report the cap as the operator's limit) and puts them back.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rigshift.power import SWEEP_SHARES_PERCENT, PowerPoint, simulated_throughput_ratio

if TYPE_CHECKING:
    from rigshift.v1 import farm_pb2
    from worker_agent.gpu import GpuBackend

__all__ = [
    "PowerLimits",
    "curve_protos",
    "simulated_curve",
    "sweep_limits",
]

LIMITS_FILE = "power-limits.json"

log = logging.getLogger("rigshift.agent.power")

_TRAIN_MEAN = 0.90  # the simulated training load's mean share of (board - idle): gpu.py


def sweep_limits(board_watts: int, lo_watts: int = 0, hi_watts: int = 0) -> list[int]:
    """The limits the sweep sets, lowest first: ``SWEEP_SHARES_PERCENT`` of the board
    limit, clamped to the card's [lo, hi] where known, duplicates dropped."""
    out: list[int] = []
    for share in SWEEP_SHARES_PERCENT:
        watts = board_watts * share // 100
        if lo_watts:
            watts = max(lo_watts, watts)
        if hi_watts:
            watts = min(hi_watts, watts)
        if watts > 0 and watts not in out:
            out.append(watts)
    return sorted(out)


def simulated_curve(
    board_watts: int, idle_watts: int, fp16_gflops: int, *, train_mean: float = _TRAIN_MEAN
) -> list[PowerPoint]:
    """A simulated GPU's power curve: at each sweep limit, ``fp16_gflops`` times the
    simulated throughput ratio, and ``min(uncapped mean training draw, limit)``."""
    uncapped = idle_watts + (board_watts - idle_watts) * train_mean
    return [
        PowerPoint(
            limit_watts=w,
            fp16_gflops=int(fp16_gflops * simulated_throughput_ratio(w, board_watts)),
            draw_watts=int(min(uncapped, w)),
        )
        for w in sweep_limits(board_watts)
    ]


def curve_protos(curve: Iterable[PowerPoint]) -> list[farm_pb2.PowerPoint]:
    """``rigshift.v1.PowerPoint`` of each point, lowest limit first."""
    from rigshift.v1 import farm_pb2

    return [
        farm_pb2.PowerPoint(
            limit_watts=p.limit_watts, fp16_gflops=p.fp16_gflops, draw_watts=p.draw_watts
        )
        for p in sorted(curve, key=lambda p: p.limit_watts)
    ]


class PowerLimits:
    """The agent's power limits: an attempt's cap while it runs, else the operator's.

    The operator's limit of each GPU is the one the backend read at start
    (``GpuInfo.power_limit_watts``). Call from the agent's event loop.
    """

    def __init__(self, backend: GpuBackend, state_dir: Path | None = None) -> None:
        self._backend = backend
        self.operator: dict[int, int] = {g.index: g.power_limit_watts for g in backend.gpus()}
        self.current: dict[int, int] = dict(self.operator)
        self._file = state_dir / LIMITS_FILE if state_dir is not None else None
        left = self._read_file()
        if left:
            log.warning(
                "power limits %s W were capped by a previous run: the operator's limits are %s",
                {i: self.current.get(i) for i in left},
                left,
            )
            self.operator.update(left)
        """The limit each GPU runs at now, as far as the agent set it (the metrics' gauge)."""
        self.refused: set[int] = set()
        """GPUs whose limit the agent may not set (said once in the log)."""
        self._held: dict[Any, list[int]] = {}

    def attempt_started(self, key: Any, indices: Iterable[int], watts: int) -> None:
        """An attempt started on ``indices``: cap them at ``watts`` (0: leave them)."""
        self._held[key] = list(indices)
        self.apply(self._held[key], watts)

    def attempt_ended(self, key: Any) -> None:
        """The attempt ended: the operator's limit again on its GPUs (mining, idle)."""
        self.restore(self._held.pop(key, ()))

    def settable(self, index: int) -> bool:
        """Whether the agent may set this GPU's limit (as far as it has tried)."""
        return index not in self.refused

    def probe(self, indices: Iterable[int] | None = None) -> dict[int, bool]:
        """Set these GPUs' (default: all) limit to the operator's own (a no-op when
        permitted): whether each may be set. Only on GPUs no attempt holds."""
        wanted = self.operator if indices is None else indices
        return {i: self._set(i, self.operator[i]) for i in wanted if self.operator.get(i, 0) > 0}

    def apply(self, indices: Iterable[int], watts: int) -> None:
        """Cap these GPUs at ``watts`` for an attempt (0: leave the operator's limit)."""
        if watts <= 0:
            return
        for i in indices:
            if i in self.operator and i not in self.refused and self._set(i, watts):
                log.info("GPU %d: power limit %d W for AI work", i, watts)

    def restore(self, indices: Iterable[int]) -> None:
        """Put the operator's limit back on these GPUs (the attempt ended)."""
        for i in indices:
            want = self.operator.get(i, 0)
            changed = want > 0 and self.current.get(i) != want and i not in self.refused
            if changed and self._set(i, want):
                log.info("GPU %d: power limit back to the operator's %d W", i, want)

    def _read_file(self) -> dict[int, int]:
        if self._file is None:
            return {}
        try:
            raw = json.loads(self._file.read_text())
            return {int(i): int(w) for i, w in raw.items() if int(i) in self.operator}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def _write_file(self) -> None:
        """The operator's limits of the GPUs capped now; no file when none is."""
        if self._file is None:
            return
        capped = {i: w for i, w in self.operator.items() if self.current.get(i, w) != w}
        try:
            if capped:
                self._file.parent.mkdir(parents=True, exist_ok=True)
                self._file.write_text(json.dumps({str(i): w for i, w in capped.items()}))
            else:
                with contextlib.suppress(FileNotFoundError):
                    self._file.unlink()
        except OSError as err:
            log.warning("could not keep the operator's power limits in %s: %s", self._file, err)

    def _set(self, index: int, watts: int) -> bool:
        try:
            ok = self._backend.set_power_limit(index, watts)
        except Exception as err:  # a driver error leaves the GPU as it was
            log.warning("GPU %d: power limit %d W not set: %s", index, watts, err)
            return False
        if ok:
            self.current[index] = watts
            self._write_file()
        elif index not in self.refused:
            self.refused.add(index)
            log.warning(
                "GPU %d: the agent may not set its power limit (not root, or the card does "
                "not support it): it runs AI work uncapped",
                index,
            )
        return ok
