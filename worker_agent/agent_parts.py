"""Parts the agent builds at start, kept out of ``agent.py`` to keep that module short."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from worker_agent.attempts import AttemptRunner
from worker_agent.checkpoints import CheckpointWatcher
from worker_agent.environments import EnvironmentCache
from worker_agent.interpreters import job_python
from worker_agent.workdir import Workspace

if TYPE_CHECKING:
    from worker_agent.config import AgentConfig
    from worker_agent.energy import EnergyMeter
    from worker_agent.gpu import GpuBackend
    from worker_agent.images import ImageCache
    from worker_agent.launch import Executor
    from worker_agent.outbox import Outbox
    from worker_agent.session import BrokerSession

__all__ = ["make_runner"]

log = logging.getLogger("rigshift.agent")


def make_runner(
    cfg: AgentConfig,
    backend: GpuBackend,
    meter: EnergyMeter,
    executor: Executor,
    outbox: Outbox,
    session: BrokerSession,
    wake: asyncio.Event,
    images: ImageCache | None,
) -> AttemptRunner:
    """The AttemptRunner with its workspace, checkpoint watcher and environment cache."""
    return AttemptRunner(
        cfg,
        backend,
        meter,
        executor,
        outbox,
        Workspace(cfg.state_dir),
        session.download,
        wake,
        CheckpointWatcher(
            session.upload,
            outbox,
            wake,
            interval_s=cfg.checkpoint_scan_interval_s,
            max_bytes=cfg.max_checkpoint_bytes,
        ),
        environments=EnvironmentCache(
            cfg.state_dir / "environments",
            cfg.environments,
            python=job_python(
                cfg.environments.python,
                _job_uid(getattr(executor, "isolation", None)),
                log.warning,
            ),
        ),
        upload_output=session.upload_output,
        images=images,
    )


def _job_uid(isolation: Any) -> int | None:
    """The uid jobs run as when the executor's isolation changes it, else None."""
    return getattr(isolation, "uid", None) if isolation is not None else None
