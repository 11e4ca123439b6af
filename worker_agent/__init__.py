"""The Rigshift worker agent: one per GPU rig; dials out to the broker and runs jobs on Ray.

Modules, from the outside in::

    cli        `rigshift agent run|gpus` (imports nothing heavy at import time)
    agent      the session with the broker: register, heartbeat, instructions, reports, drain
    attempts   prepare, launch, meter and stop the attempts on this rig
    executor   where attempts run: Ray tasks on a local head (or a site cluster); LocalExecutor
    process    one job process as a stream of events; kill a process tree
    outbox     job events with per-attempt sequence numbers, coalesced and retried
    backoff    exponential backoff with full jitter
    gpu        GPU backends: NVML and simulated
    energy     joules per attempt from per-GPU energy counters
    workdir    working and checkpoint directories, verified archives, safe extraction
    state      the persisted worker identity
    metrics    Prometheus metrics of the agent
    config     AgentConfig (and its TOML file)

Import :class:`Agent` and :class:`AgentConfig` from here; they load lazily, so
``import worker_agent`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Agent", "AgentConfig", "AgentError", "ConfigError"]

if TYPE_CHECKING:
    from worker_agent.agent import Agent, AgentError
    from worker_agent.config import AgentConfig, ConfigError


def __getattr__(name: str) -> Any:
    if name in ("Agent", "AgentError"):
        from worker_agent import agent

        return getattr(agent, name)
    if name in ("AgentConfig", "ConfigError"):
        from worker_agent import config

        return getattr(config, name)
    raise AttributeError(name)
