"""GPU health: what a backend observes, and whether it takes the GPU out (pure).

A backend (``gpu.py``) answers ``health(index)`` with :class:`HealthObservation` s: the
events since its last call (XID errors, new double-bit ECC errors) and the current
readings (pending retired pages, lost, temperature against the slowdown threshold,
whether power is reported). :func:`classify` turns one observation into a
:class:`Verdict`; :class:`HealthWatch` adds what needs time (a temperature over the
threshold for ``overheat_s``, power readings that stopped for ``power_silence_s``)::

    observation                                   verdict
    XID 13, 31, 43, 45, 68, 109                   not critical: the application's fault
                                                  (as NVIDIA's k8s device plugin ignores them)
    any other XID                                 critical ("XID 79: GPU has fallen off the bus")
    double-bit ECC errors (new)                   critical
    retired pages pending                         critical (a reset is needed)
    GPU lost (NVML_ERROR_GPU_IS_LOST)             critical
    temperature >= slowdown threshold             critical once held for overheat_s
    power readings stopped                        critical once silent for power_silence_s
                                                  (only a GPU that did report power)

The watch and the classification read no clock: the time is on the observation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum

__all__ = [
    "APPLICATION_XIDS",
    "FAULT_KINDS",
    "Fault",
    "HealthConfig",
    "HealthObservation",
    "HealthWatch",
    "Observed",
    "Verdict",
    "classify",
    "health_table",
    "parse_fault",
    "xid_reason",
]

#: XIDs caused by the application, not the card (NVIDIA's k8s device plugin skips them).
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})

_XID_TEXT = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping event",
    64: "ECC page retirement or row remapper recording failure",
    68: "video processor exception",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    109: "context switch timeout",
    119: "GSP RPC timeout",
    120: "GSP error",
}

#: The simulated fault kinds (``--simulate-fault GPU:KIND:AFTER_S``).
FAULT_KINDS = ("xid79", "xid48", "ecc-dbe", "overheat", "lost", "impostor")


class Observed(StrEnum):
    """What a :class:`HealthObservation` is about."""

    XID = "xid"
    ECC_DBE = "ecc-dbe"
    RETIRED_PENDING = "retired-pages-pending"
    LOST = "lost"
    TEMPERATURE = "temperature"
    POWER = "power"


@dataclass(frozen=True, slots=True)
class HealthObservation:
    """One thing a backend saw on GPU ``index`` at ``at`` (monotonic seconds).

    ``value``: the XID code (XID), the new double-bit errors (ECC_DBE), the temperature
    in °C (TEMPERATURE); ``threshold``: the slowdown temperature (TEMPERATURE, None when
    the GPU does not report it); ``present``: whether a power reading came (POWER).
    """

    index: int
    kind: Observed
    at: float
    value: float = 0.0
    threshold: float | None = None
    present: bool = True


@dataclass(frozen=True, slots=True)
class Verdict:
    """``critical``: quarantine the GPU, for ``reason`` (words the operator reads)."""

    critical: bool
    reason: str = ""


OK = Verdict(False)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """The ``[health]`` table of the agent's config."""

    interval_s: float = 5.0
    """How often every GPU's health is read."""
    overheat_s: float = 30.0
    """A temperature at or over the slowdown threshold this long is critical."""
    power_silence_s: float = 60.0
    """Power readings that stop for this long are critical."""
    probation_s: float = 600.0
    """A quarantined GPU is self-tested again after this long."""
    selftest_budget_s: float = 30.0
    """Time one probation self-test may take."""

    def __post_init__(self) -> None:
        for name in ("interval_s", "overheat_s", "power_silence_s", "probation_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"health.{name} must be a positive number of seconds")
        if not isinstance(self.selftest_budget_s, int | float) or self.selftest_budget_s <= 0:
            raise ValueError("health.selftest_budget_s must be a positive number of seconds")


def health_table(table: object) -> HealthConfig:
    """The ``[health]`` table of the config file as a :class:`HealthConfig`."""
    known = [f.name for f in fields(HealthConfig)]
    if not isinstance(table, dict):
        raise ValueError("health must be a table ([health])")
    for key in table:
        if key not in known:
            raise ValueError(f"unknown key health.{key!r}; known: {', '.join(known)}")
    return HealthConfig(**table)


def xid_reason(code: int) -> str:
    """``XID 79: GPU has fallen off the bus``."""
    text = _XID_TEXT.get(code)
    return f"XID {code}: {text}" if text else f"XID {code}"


def classify(
    obs: HealthObservation, *, held_s: float = 0.0, config: HealthConfig | None = None
) -> Verdict:
    """The verdict on one observation; ``held_s``: how long a sustained condition
    (over the slowdown temperature, power silent) has held so far."""
    cfg = config or HealthConfig()
    kind = obs.kind
    if kind is Observed.XID:
        code = int(obs.value)
        return OK if code in APPLICATION_XIDS else Verdict(True, xid_reason(code))
    if kind is Observed.ECC_DBE:
        return Verdict(True, f"{int(obs.value)} double-bit ECC error(s)") if obs.value > 0 else OK
    if kind is Observed.RETIRED_PENDING:
        return Verdict(True, "retired memory pages pending: the GPU needs a reset")
    if kind is Observed.LOST:
        return Verdict(True, "GPU is lost (NVML_ERROR_GPU_IS_LOST): fallen off the bus")
    if kind is Observed.TEMPERATURE:
        if _hot(obs) and held_s >= cfg.overheat_s:
            return Verdict(
                True,
                f"temperature {obs.value:.0f} °C at or over the slowdown threshold "
                f"{obs.threshold:.0f} °C for {held_s:.0f} s",
            )
        return OK
    if kind is Observed.POWER:
        if not obs.present and held_s >= cfg.power_silence_s:
            return Verdict(True, f"no power reading for {held_s:.0f} s")
        return OK
    raise ValueError(f"unknown observation {kind!r}")  # pragma: no cover


def _hot(obs: HealthObservation) -> bool:
    return obs.threshold is not None and obs.threshold > 0 and obs.value >= obs.threshold


@dataclass(slots=True)
class HealthWatch:
    """Classifies a rig's observations, keeping since when a sustained condition holds."""

    config: HealthConfig = field(default_factory=HealthConfig)
    _hot_since: dict[int, float] = field(default_factory=dict)
    _silent_since: dict[int, float] = field(default_factory=dict)
    _had_power: set[int] = field(default_factory=set)

    def observe(self, obs: HealthObservation) -> Verdict:
        """The verdict on ``obs`` given what this GPU showed before."""
        held = 0.0
        if obs.kind is Observed.TEMPERATURE:
            if _hot(obs):
                held = obs.at - self._hot_since.setdefault(obs.index, obs.at)
            else:
                self._hot_since.pop(obs.index, None)
        elif obs.kind is Observed.POWER:
            if obs.present:
                self._had_power.add(obs.index)
                self._silent_since.pop(obs.index, None)
            elif obs.index not in self._had_power:
                return OK  # a GPU that never reported power: nothing stopped
            else:
                held = obs.at - self._silent_since.setdefault(obs.index, obs.at)
        return classify(obs, held_s=held, config=self.config)

    def forget(self, index: int) -> None:
        """Start afresh on GPU ``index`` (it came back from quarantine)."""
        self._hot_since.pop(index, None)
        self._silent_since.pop(index, None)


@dataclass(frozen=True, slots=True)
class Fault:
    """A simulated fault: ``kind`` (one of :data:`FAULT_KINDS`) strikes GPU ``gpu``
    ``after_s`` seconds after the backend starts."""

    gpu: int
    kind: str
    after_s: float

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(FAULT_KINDS)}")
        if self.gpu < 0:
            raise ValueError(f"fault GPU index must not be negative, got {self.gpu}")
        if self.after_s < 0:
            raise ValueError(f"fault time must not be negative, got {self.after_s}")


def parse_fault(text: str) -> Fault:
    """``GPU:KIND:AFTER_S`` (e.g. ``1:xid79:30``) as a :class:`Fault`; ValueError with
    the expected form otherwise."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"fault {text!r} is not GPU:KIND:AFTER_S, e.g. 1:xid79:30")
    gpu, kind, after = parts
    try:
        return Fault(int(gpu), kind.strip().lower(), float(after))
    except ValueError as err:
        raise ValueError(f"fault {text!r}: {err} (GPU:KIND:AFTER_S, e.g. 1:xid79:30)") from err
