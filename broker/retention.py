"""Artifact retention: which archives the broker must keep, and the hourly collection.

``referenced_artifacts(core, now, retention_s)`` is pure (the core's state in, a set
of sha256 out); :func:`collect_artifacts` does the I/O through the
:class:`~broker.artifacts.ArtifactStore`. An archive is removed only when it is
older than the retention window (its file's mtime; uploading or asking for it again
refreshes that) and nothing below refers to it:

- a job that has not ended: its working directory, checkpoint, inputs and the
  outputs of its attempts;
- a job that ended less than ``retention_s`` ago: its working directory, inputs and
  the outputs of its attempts (a finished job's checkpoint is not needed again). The
  core holds only live work: those the core let go of are read from the store
  (``stored``, ``Store.recent_artifacts``: one query by ``(state, update_time)``).

Interrupted uploads untouched for a day go too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from broker.artifacts import PARTIAL_MAX_AGE_S, ArtifactStore, Collected
from broker.core import BrokerCore, Job
from broker.model import TERMINAL_JOB_STATES

__all__ = [
    "COLLECT_INTERVAL_S",
    "collect_artifacts",
    "end_time",
    "referenced_artifacts",
    "retention_loop",
]

log = logging.getLogger("rigshift.broker.retention")

COLLECT_INTERVAL_S = 3600.0
"""How often the broker collects old artifacts (and once at start)."""


def end_time(job: Job) -> float | None:
    """When a job reached its final state; None while it has not."""
    if job.state not in TERMINAL_JOB_STATES:
        return None
    for entry in reversed(job.history):
        if entry.to_state in TERMINAL_JOB_STATES:
            return entry.time
    return job.update_time


def referenced_artifacts(
    core: BrokerCore,
    now: float,
    retention_s: float,
    stored: Callable[[float], set[str]] | None = None,
) -> set[str]:
    """The sha256 of every archive that jobs still need (see the module docstring).

    ``stored(since)``: what the store's jobs that finished after ``since`` refer to
    (``Store.recent_artifacts``): the core holds only live work, so the recently finished
    jobs it let go of come from there. None: the core holds every job (tests)."""
    keep: set[str] = set() if stored is None else set(stored(now - retention_s))
    for job in core.jobs.values():
        ended = end_time(job)
        if ended is not None and now - ended >= retention_s:
            continue
        keep.add(job.spec.working_dir_sha256)
        keep.update(sha for _, sha in job.spec.inputs)
        keep.update(a.output.sha256 for a in job.attempts if a.output is not None)
        if ended is None:
            keep.add(job.checkpoint_sha256)
    keep.discard("")
    return keep


async def collect_artifacts(
    core: BrokerCore,
    artifacts: ArtifactStore,
    now: float,
    retention_s: float,
    stored: Callable[[float], set[str]] | None = None,
) -> Collected:
    """Remove the archives older than ``retention_s`` that no job needs, and stale partials.

    The directory scan runs in a thread; the references are computed and the files
    removed in one step on the event loop, so no job created meanwhile can lose an archive.
    """
    older_than = now - retention_s
    partials_older_than = now - PARTIAL_MAX_AGE_S
    candidates = await asyncio.to_thread(artifacts.expired, older_than, partials_older_than)
    if not candidates:
        return Collected()
    keep = referenced_artifacts(core, now, retention_s, stored)
    return artifacts.collect(candidates, keep, older_than, partials_older_than)


async def retention_loop(
    core: BrokerCore,
    artifacts: ArtifactStore,
    retention_s: float,
    *,
    interval_s: float = COLLECT_INTERVAL_S,
    clock: Callable[[], float] = time.time,
    stored: Callable[[float], set[str]] | None = None,
) -> None:
    """Collect once now, then every ``interval_s``, until cancelled; logs what went."""
    while True:
        try:
            got = await collect_artifacts(core, artifacts, clock(), retention_s, stored)
            if got.blobs or got.partials:
                log.info(
                    "artifact retention removed %d archives and %d interrupted uploads (%d bytes)",
                    got.blobs,
                    got.partials,
                    got.bytes,
                )
        except Exception:  # a bug or a disk error; try again next time
            log.exception("artifact retention failed")
        await asyncio.sleep(interval_s)
