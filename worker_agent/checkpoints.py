"""Checkpoints that survive the rig: upload ``$RIGSHIFT_CHECKPOINT_DIR`` when it changes.

While an attempt runs, :meth:`CheckpointWatcher.watch` looks at its checkpoint
directory every ``checkpoint_scan_interval_s``. When the files (names, sizes,
modification times) changed since the last upload and then stayed the same for
one more scan — so a checkpoint being written is not caught half-way — the
directory is packed into a deterministic tar.gz, uploaded with
``ArtifactService.UploadArtifact`` and announced with a ``checkpoint`` job event
(its sha256 and size). The broker hands that sha256 to the job's next attempt,
on this rig or another, and the agent there restores it into the new attempt's
empty checkpoint directory before the process starts (``attempts.py``).

A checkpoint restored at start (or left by an earlier attempt on this rig)
counts as uploaded. A failed upload is retried at the next scan. Jobs write
their checkpoints atomically (write, then rename) for best results; the
examples do.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from worker_agent.outbox import AttemptKey, Outbox
from worker_agent.workdir import ArchiveError, fingerprint, pack_directory

__all__ = ["CheckpointWatcher", "Uploader"]

log = logging.getLogger("rigshift.agent.checkpoints")

Uploader = Callable[[str, bytes], Awaitable[None]]
"""``upload(sha256, data)``: store one archive in the broker's artifact store."""


class CheckpointWatcher:
    """Uploads changed checkpoint directories and queues ``checkpoint`` events."""

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

    async def watch(self, key: AttemptKey, directory: Path) -> None:
        """Run until cancelled (the attempt ended): upload each stable change once."""
        uploaded = await asyncio.to_thread(fingerprint, directory)
        previous = uploaded
        while True:
            await asyncio.sleep(self.interval_s)
            now = await asyncio.to_thread(fingerprint, directory)
            if now and now == previous and now != uploaded:
                try:
                    await self._upload(key, directory)
                    uploaded = now
                except (ArchiveError, OSError) as err:
                    log.warning("%s attempt %d: checkpoint not uploaded: %s", *key, err)
                except Exception as err:  # gRPC errors: the broker is away; next scan
                    log.info("%s attempt %d: checkpoint upload failed: %s", *key, err)
            previous = now

    async def _upload(self, key: AttemptKey, directory: Path) -> None:
        data = await asyncio.to_thread(pack_directory, directory, max_bytes=self.max_bytes)
        sha256 = hashlib.sha256(data).hexdigest()
        await self.upload(sha256, data)
        self.outbox.checkpointed(key, sha256, len(data), time.time())
        self.wake.set()
        self.uploaded_total += 1
        log.info("%s attempt %d: checkpoint %s… uploaded (%d bytes)", *key, sha256[:12], len(data))
