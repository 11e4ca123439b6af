"""The agent's identity on disk: worker name and credential, so a restart is the same worker.

``state_dir/identity.json`` (mode 0600, written atomically)::

    {"broker": "host:port", "worker": "workers/…", "credential": "…", "rig_id": "…"}

``rig_id`` is random and made once; simulated GPU UUIDs derive from it, so they
stay the same across restarts and differ between rigs on one host. The saved
worker name is sent with every registration; a broker that does not know it (or
knows it under another farm) simply issues a new one, so reusing it is always safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Identity", "load_identity", "save_identity"]

FILE_NAME = "identity.json"


@dataclass(frozen=True, slots=True)
class Identity:
    """What the agent keeps between runs."""

    rig_id: str
    broker: str = ""
    worker: str = ""
    credential: str = ""


def load_identity(state_dir: Path) -> Identity:
    """The saved identity; a fresh rig id (no worker) when none is saved or it is unreadable."""
    try:
        data = json.loads((state_dir / FILE_NAME).read_text())
        saved = Identity(
            rig_id=str(data["rig_id"]),
            broker=str(data.get("broker", "")),
            worker=str(data.get("worker", "")),
            credential=str(data.get("credential", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return Identity(rig_id=secrets.token_hex(8))
    return saved


def save_identity(state_dir: Path, identity: Identity) -> None:
    """Write the identity atomically, readable only by the agent's user."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{FILE_NAME}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(identity), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_dir / FILE_NAME)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
