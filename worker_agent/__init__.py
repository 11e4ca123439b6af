"""The Rigshift worker agent: one per GPU rig; dials out to the broker and runs jobs on Ray.

Modules, from the outside in::

    cli            `rigshift agent run|gpus|doctor|install` (imports nothing heavy at import time)
    install        the rig's config file and systemd unit (`agent install`)
    doctor/        is this rig ready? findings, local checks, broker/TLS/clock checks
    agent          Agent: lifecycle (run, drain, shutdown) and the shell that carries out
                   the state machine's instructions
    state_machine  AgentState: the agent's decisions, pure (events in, instructions out)
    session        BrokerSession: register, heartbeat, instruction stream, reports
    broker_calls   the calls that carry data: GPUs registered (one ask price), artifacts
                   down and up, DrainWorker
    lease          the lease as the agent sees it: when to stop attempts (pure)
    fence          the lease fence: a process per job that kills it when the lease lapses
    supervise      keeps the agent's loops alive
    channel        the gRPC channel to the broker (keepalive, TLS)
    backoff        exponential backoff with full jitter
    outbox         job events with per-attempt sequence numbers, coalesced and retried
    attempts       AttemptRunner: prepare, launch, meter and stop the attempts on this rig
    setup_failures whose fault a failed setup was (the job's or the rig's)
    environments   the cache of per-job Python environments, built with uv
    interpreters   which Python they are built on, and the cache key
    containers     image jobs: podman detected, pull failures classified, the podman run
                   command (pure)
    images         the images pulled for image jobs: pull in PREPARING, LRU cache, containers
                   removed
    diskspace      full-disk errors and free space under the attempts' directories
    checkpoints    checkpoint directories uploaded while the job runs
    workdir        working, input, output and checkpoint directories (the archive format:
                   rigshift.archive)
    launch         LaunchSpec, the Executor protocol, the job's environment; LocalExecutor
    executor       RayExecutor: attempts as Ray tasks on a local head (or a site cluster)
    process        one job process as a stream of events
    proctree       process trees: find, signal and kill them (/proc)
    sandbox        job isolation: bubblewrap and an unprivileged job user
    gpu            GPU backends: NVML and simulated
    energy         joules per attempt from per-GPU energy counters
    mining         the mining fallback for idle GPUs: a pure policy and its shell
    metrics        Prometheus metrics from a snapshot the event loop publishes
    identity       the persisted worker identity (name, credential, rig id)
    config         AgentConfig (and its TOML file)

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
