"""Checkpoints that survive the rig: upload ``$RIGSHIFT_CHECKPOINT_DIR`` while the job runs.

While an attempt runs, :meth:`CheckpointWatcher.watch` uploads its checkpoint
directory at a bounded rate, whatever the job's cadence, and only in a consistent
state. Each upload is a deterministic tar.gz sent with ``ArtifactService.UploadArtifact``
and announced with a ``checkpoint`` job event (its sha256 and size). The broker hands
that sha256 to the job's next attempt, on this rig or another, and the agent there
restores it into the new attempt's empty checkpoint directory before the process
starts (``attempts.py``).

**When.** Two ways, chosen by the job:

- *Signalled* (the job calls :func:`rigshift.checkpoint.checkpoint_complete`, which
  writes ``.rigshift-complete`` listing the checkpoint's files): the marker is looked at
  every :data:`MARKER_POLL_S`; a new one is uploaded at once, if the directory still
  holds exactly the files it names (else the job has moved on, and the next signal
  counts). Once a job has signalled, nothing else is uploaded.
- *Watched* (no marker): every ``checkpoint_scan_interval_s`` the files are compared
  with the last upload. A change is uploaded once it stayed the same for one scan;
  a directory that never does (a job checkpointing faster than the scan) is uploaded
  anyway once its change has waited ``checkpoint_min_interval_s``.

Either way uploads start at least ``checkpoint_min_interval_s`` apart, and the agent
waits after each at least as long as it took (a slow uplink is never busy with
checkpoints more than half the time). A failed upload is tried again on the next turn.

**Consistent.** The upload is the directory as it was at one instant: its files are
hard-linked (copied where links fail) into ``.<job>.snapshot`` beside it, and that
counts only if no file of the directory changed (path, size, mtime, inode) while the
links were made, nor any linked file while it was packed; else it is tried again.
A job that writes each file atomically (temporary file, then rename: a new inode) thus
never has half a file uploaded, and the links keep the files it replaces meanwhile;
a checkpoint made of several files is consistent as a whole only with the signal.

A checkpoint restored at start (or left by an earlier attempt on this rig) counts
as uploaded. A snapshot whose archive has the last upload's sha256 is not sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from rigshift.archive import ArchiveError, pack_directory
from rigshift.checkpoint import FileState, directory_state, read_marker
from worker_agent.outbox import AttemptKey, Outbox

__all__ = [
    "MARKER_POLL_S",
    "Baseline",
    "CheckpointWatcher",
    "Snapshot",
    "Uploader",
    "baseline",
    "snapshot",
]

log = logging.getLogger("rigshift.agent.checkpoints")

Uploader = Callable[[str, bytes], Awaitable[None]]
"""``upload(sha256, data)``: store one archive in the broker's artifact store."""

#: How often a running attempt's ``.rigshift-complete`` is looked at (one stat).
MARKER_POLL_S = 0.25

#: Tries of one snapshot before the directory is left until the next turn.
SNAPSHOT_TRIES = 5


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A consistent archive of a checkpoint directory."""

    state: tuple[FileState, ...]
    """The files it holds, as :func:`rigshift.checkpoint.directory_state` lists them."""

    data: bytes
    """The deterministic tar.gz."""


def _strip_inodes(state: tuple[FileState, ...]) -> tuple[tuple[str, int, int], ...]:
    return tuple((path, size, mtime) for path, size, mtime, _ in state)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest, follow_symlinks=False)
    except FileNotFoundError:
        raise
    except OSError:  # another filesystem, a protected link, too many links: copy
        shutil.copy2(src, dest, follow_symlinks=False)  # mode and mtime too


def snapshot(
    directory: Path,
    scratch: Path,
    *,
    max_bytes: int,
    expect: tuple[FileState, ...] | None = None,
) -> Snapshot | None:
    """The directory as it was at one instant, packed; None when it kept changing
    (:data:`SNAPSHOT_TRIES` tries) or, with ``expect``, no longer holds those files.

    Blocking (run it in a thread). ``scratch`` (on the same filesystem, for hard links)
    is emptied first and removed afterwards. ArchiveError past ``max_bytes``.
    """
    try:
        for _ in range(SNAPSHOT_TRIES):
            before = directory_state(directory)
            if expect is not None and before != expect:
                return None
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            for dirpath, _dirs, _files in os.walk(directory):  # empty ones are restored too
                (scratch / Path(dirpath).relative_to(directory)).mkdir(parents=True, exist_ok=True)
            try:
                for path, *_ in before:
                    dest = scratch / path
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(directory / path, dest)
            except FileNotFoundError:  # replaced while we linked: try again
                time.sleep(0.01)
                continue
            if directory_state(directory) != before:
                time.sleep(0.01)
                continue
            data = pack_directory(scratch, max_bytes=max_bytes)
            # Written in place while packed (links share the inode): not one instant.
            if _strip_inodes(directory_state(scratch)) != _strip_inodes(before):
                time.sleep(0.01)
                continue
            return Snapshot(before, data)
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


Baseline = tuple[tuple[FileState, ...], int | None]
"""What a checkpoint directory holds (as uploaded), and the sequence of its marker, if any."""


def baseline(directory: Path) -> Baseline:
    """The directory's state and marker before the job runs: a restored checkpoint (or one
    left by an earlier attempt here) counts as uploaded, its signal as seen."""
    marker = read_marker(directory)
    return directory_state(directory), (marker[0] if marker is not None else None)


class CheckpointWatcher:
    """Uploads consistent checkpoint directories and queues ``checkpoint`` events."""

    def __init__(
        self,
        upload: Uploader,
        outbox: Outbox,
        wake: asyncio.Event,
        *,
        interval_s: float,
        max_bytes: int,
    ) -> None:
        self.upload = upload
        self.outbox = outbox
        self.wake = wake
        self.interval_s = interval_s
        self.max_bytes = max_bytes
        self.uploaded_total = 0

    async def watch(
        self,
        key: AttemptKey,
        directory: Path,
        *,
        min_interval_s: float,
        start: Baseline | None = None,
    ) -> None:
        """Run until cancelled (the attempt ended); see the module docstring for the rule.

        ``start`` is what the directory held before the job's process was launched
        (:func:`baseline`); without it the watcher looks now, and would take a checkpoint
        the job wrote in its first instant as already uploaded.
        """
        scratch = directory.with_name(f".{directory.name}.snapshot")
        if start is None:
            start = await asyncio.to_thread(baseline, directory)
        uploaded, seen = start  # seen: a signal left from before
        previous, pending_since = uploaded, 0.0
        last_sha, next_try = "", 0.0
        next_scan = time.monotonic() + self.interval_s
        poll_s = min(self.interval_s, MARKER_POLL_S)
        while True:
            await asyncio.sleep(poll_s)
            now = time.monotonic()
            marker = await asyncio.to_thread(read_marker, directory)
            expect: tuple[FileState, ...] | None = None
            if marker is not None:  # signalled: only what the job declared complete
                if marker[0] == seen or now < next_try:
                    continue
                expect = marker[1]
            else:
                if now < next_scan:
                    continue
                next_scan = now + self.interval_s
                state = await asyncio.to_thread(directory_state, directory)
                stable, previous = state == previous, state
                if not state or state == uploaded:
                    pending_since = 0.0
                    continue
                pending_since = pending_since or now
                if now < next_try or (not stable and now - pending_since < min_interval_s):
                    continue
            started = time.monotonic()
            try:
                snap = await asyncio.to_thread(
                    snapshot, directory, scratch, max_bytes=self.max_bytes, expect=expect
                )
            except (ArchiveError, OSError) as err:  # too big, or no room for the links
                log.warning("%s attempt %d: checkpoint not uploaded: %s", *key, err)
                uploaded = await asyncio.to_thread(directory_state, directory)  # not again
                seen = marker[0] if marker is not None else seen
                next_try = started + min_interval_s
                continue
            if snap is None:  # it kept changing, or the job moved past its signal: later
                seen = marker[0] if marker is not None else seen
                continue
            sha256 = hashlib.sha256(snap.data).hexdigest()
            try:
                if sha256 != last_sha:
                    await self._upload(key, sha256, snap.data)
                    last_sha = sha256
            except Exception as err:  # gRPC errors: the broker is away or full; next turn
                log.info("%s attempt %d: checkpoint upload failed: %s", *key, err)
            else:
                uploaded, pending_since = snap.state, 0.0
                seen = marker[0] if marker is not None else seen
            # Starts at least min_interval_s apart, and idle at least as long as it took.
            next_try = started + max(min_interval_s, 2 * (time.monotonic() - started))

    async def _upload(self, key: AttemptKey, sha256: str, data: bytes) -> None:
        await self.upload(sha256, data)
        self.outbox.checkpointed(key, sha256, len(data), time.time())
        self.wake.set()
        self.uploaded_total += 1
        log.info("%s attempt %d: checkpoint %s… uploaded (%d bytes)", *key, sha256[:12], len(data))
