"""Trace replay through the real broker core (the engine behind ``benchmarks/trace_replay.py``).

* ``replay.workload`` -- the inputs: a CSV job trace and a fleet of mining farms;
* ``replay.view`` -- ``LeanView``, the lean scheduling view the replay injects into
  ``BrokerCore(view=...)``;
* ``replay.estimator`` -- ``DurationEstimator``, run-time predictions for ``short-first``;
* ``replay.power`` -- power settings (``max``, ``efficient`` at a slowdown) and each
  simulated GPU's power curve (issue 16);
* ``replay.curtail`` -- ``--curtail`` schedules and the curtailment windows they give;
* ``replay.simulate`` -- the virtual-time loop and its figures (``replay()``, ``Outcome``).
"""

from .curtail import CurtailSpec, busiest_farm, parse_curtail, windows_for
from .estimator import DurationEstimator, order
from .power import MAX, PowerSetting, simulated_curve
from .simulate import DEFAULT_POLICIES, POLICIES, SCORINGS, Outcome, declared_limit, replay
from .view import LeanView
from .workload import DEFAULT_FLEET, Fleet, Rig, Trace, TraceJob, build_fleet, load_trace

__all__ = [
    "DEFAULT_FLEET",
    "DEFAULT_POLICIES",
    "MAX",
    "POLICIES",
    "SCORINGS",
    "CurtailSpec",
    "DurationEstimator",
    "Fleet",
    "LeanView",
    "Outcome",
    "PowerSetting",
    "Rig",
    "Trace",
    "TraceJob",
    "build_fleet",
    "busiest_farm",
    "declared_limit",
    "load_trace",
    "order",
    "parse_curtail",
    "replay",
    "simulated_curve",
    "windows_for",
]
