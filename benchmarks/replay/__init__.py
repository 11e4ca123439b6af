"""Trace replay through the real broker core (the engine behind ``benchmarks/trace_replay.py``).

* ``replay.workload`` -- the inputs: a CSV job trace and a fleet of mining farms;
* ``replay.view`` -- ``LeanView``, the lean scheduling view the replay injects into
  ``BrokerCore(view=...)``;
* ``replay.estimator`` -- ``DurationEstimator``, run-time predictions for ``short-first``;
* ``replay.simulate`` -- the virtual-time loop and its figures (``replay()``, ``Outcome``).
"""

from .estimator import DurationEstimator, order
from .simulate import DEFAULT_POLICIES, POLICIES, SCORINGS, Outcome, declared_limit, replay
from .view import LeanView
from .workload import DEFAULT_FLEET, Fleet, Rig, Trace, TraceJob, build_fleet, load_trace

__all__ = [
    "DEFAULT_FLEET",
    "DEFAULT_POLICIES",
    "POLICIES",
    "SCORINGS",
    "DurationEstimator",
    "Fleet",
    "LeanView",
    "Outcome",
    "Rig",
    "Trace",
    "TraceJob",
    "build_fleet",
    "declared_limit",
    "load_trace",
    "order",
    "replay",
]
