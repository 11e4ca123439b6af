"""NVML's health reads for :class:`~worker_agent.gpu.NvmlBackend` (see ``gpu.py``'s docstring).

XID events come from one event set registered for every GPU and polled with timeout 0
(it never blocks the caller); the ECC, retired-pages, temperature and power reads are
plain queries. NVML_ERROR_NOT_SUPPORTED reads as "not reported"; NVML_ERROR_GPU_IS_LOST
on any read makes the GPU read as lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from worker_agent.health import HealthObservation, Observed

__all__ = ["NvmlHealth"]

log = logging.getLogger("rigshift.agent.gpu")


class NvmlHealth:
    """The health reads of the GPUs ``handles`` through the ``nvml`` module;
    ``optional`` calls an NVML function and gives None for NOT_SUPPORTED."""

    def __init__(self, nvml: Any, handles: list[Any], optional: Callable[..., Any]) -> None:
        self._nvml = nvml
        self._handles = handles
        self._optional_read = optional
        self._events: Any = None  # the XID event set, made on the first read
        self._xids: dict[int, list[int]] = {}  # XIDs drained from the set, per GPU
        self._ecc_seen = [0] * len(handles)
        self._slowdown: dict[int, float | None] = {}

    def _event_set(self) -> Any:
        """The XID event set, registered for every GPU that supports it (made once)."""
        nvml = self._nvml
        if self._events is None:
            self._events = nvml.nvmlEventSetCreate()
            for i, h in enumerate(self._handles):
                try:
                    nvml.nvmlDeviceRegisterEvents(
                        h, nvml.nvmlEventTypeXidCriticalError, self._events
                    )
                except nvml.NVMLError as err:
                    log.info("GPU %d: no XID events (%s)", i, err)
        return self._events

    def _drain_xids(self) -> None:
        """Move every waiting XID event into ``_xids`` (timeout 0: never blocks)."""
        nvml = self._nvml
        events = self._event_set()
        timeout = getattr(nvml, "NVML_ERROR_TIMEOUT", 10)
        while True:
            try:
                data = nvml.nvmlEventSetWait(events, 0)
            except nvml.NVMLError as err:
                if getattr(err, "value", None) != timeout:
                    log.debug("XID event wait failed: %s", err)
                return
            index = int(nvml.nvmlDeviceGetIndex(data.device))
            self._xids.setdefault(index, []).append(int(data.eventData))

    def read(self, index: int) -> list[HealthObservation]:
        """XID events since the last call, new double-bit ECC errors, pending retired
        pages, the temperature and its slowdown threshold, whether power reads; a GPU
        whose reads fail with NVML_ERROR_GPU_IS_LOST reads as lost."""
        nvml, h, now = self._nvml, self._handles[index], time.monotonic()
        out = [
            HealthObservation(index, Observed.XID, now, float(code))
            for code in self._take_xids(index)
        ]
        try:
            dbe = self._optional_read(
                nvml.nvmlDeviceGetTotalEccErrors,
                h,
                nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                nvml.NVML_VOLATILE_ECC,
            )
            if dbe is not None and int(dbe) > self._ecc_seen[index]:
                new = int(dbe) - self._ecc_seen[index]
                self._ecc_seen[index] = int(dbe)
                out.append(HealthObservation(index, Observed.ECC_DBE, now, float(new)))
            pending = self._optional_read(nvml.nvmlDeviceGetRetiredPagesPendingStatus, h)
            if pending:
                out.append(HealthObservation(index, Observed.RETIRED_PENDING, now))
            temp = self._optional_read(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
            if index not in self._slowdown:
                limit = self._optional_read(
                    nvml.nvmlDeviceGetTemperatureThreshold,
                    h,
                    nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
                )
                self._slowdown[index] = None if limit is None else float(limit)
            if temp is not None:
                out.append(
                    HealthObservation(
                        index,
                        Observed.TEMPERATURE,
                        now,
                        float(temp),
                        threshold=self._slowdown[index],
                    )
                )
            try:
                nvml.nvmlDeviceGetPowerUsage(h)
                present = True
            except nvml.NVMLError as err:
                if _is_lost(nvml, err):
                    raise
                present = False
            out.append(HealthObservation(index, Observed.POWER, now, present=present))
        except nvml.NVMLError as err:
            if not _is_lost(nvml, err):
                raise
            out.append(HealthObservation(index, Observed.LOST, now))
        return out

    def _take_xids(self, index: int) -> list[int]:
        try:
            self._drain_xids()
        except self._nvml.NVMLError as err:  # events unsupported: the other reads go on
            log.debug("XID events unavailable: %s", err)
        return self._xids.pop(index, [])


def _is_lost(nvml: Any, err: Exception) -> bool:
    return getattr(err, "value", None) == getattr(nvml, "NVML_ERROR_GPU_IS_LOST", 15)
