"""Trace replay through the real broker core (the engine behind ``benchmarks/trace_replay.py``).

* ``replay.workload`` -- the inputs: a CSV job trace and a fleet of mining farms;
* ``replay.view`` -- ``ReplayCore``, ``BrokerCore`` with a lean scheduler view;
* ``replay.simulate`` -- the virtual-time loop and its figures (``replay()``, ``Outcome``).
"""

from .simulate import DEFAULT_POLICIES, POLICIES, Outcome, declared_limit, replay
from .view import ReplayCore
from .workload import DEFAULT_FLEET, Fleet, Rig, Trace, TraceJob, build_fleet, load_trace

__all__ = [
    "DEFAULT_FLEET",
    "DEFAULT_POLICIES",
    "POLICIES",
    "Fleet",
    "Outcome",
    "ReplayCore",
    "Rig",
    "Trace",
    "TraceJob",
    "build_fleet",
    "declared_limit",
    "load_trace",
    "replay",
]
