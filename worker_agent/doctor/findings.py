"""What a doctor check finds (:class:`Finding`), what it checks (:class:`DoctorInput`),
and how findings are printed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

__all__ = ["DoctorInput", "Finding", "Status", "findings_json", "format_finding"]

Status = Literal["PASS", "WARN", "FAIL"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's outcome."""

    check: str
    """Short name: gpu, power, broker, tls, ray, shm, clock, disk, config."""
    status: Status
    """PASS, WARN or FAIL."""
    finding: str
    """What was found, in one line."""
    fix: str = ""
    """What to do about a WARN or FAIL; empty on PASS."""


@dataclass(frozen=True, slots=True)
class DoctorInput:
    """What the doctor checks: the agent's settings as ``agent run`` would see them."""

    broker_address: str = ""
    """Broker ``host:port``; empty fails the broker check."""
    simulate: str = ""
    """Simulated GPU SPEC, as the agent's ``--simulate``."""
    tls_ca: Path | None = None
    """CA file to verify the broker's certificate with; None checks plaintext."""
    state_dir: Path = Path(".rigshift/agent")
    """The agent's state directory (working directories and checkpoints); AgentConfig's default."""
    ray_address: str = ""
    """A Ray cluster the agent joins instead of starting a local head."""
    config_path: Path | None = None
    """The TOML file the settings came from, when one was given."""
    config_error: str = ""
    """Why that file did not load (the config check FAILs with it)."""
    timeout_s: float = 5.0
    """Per network check."""
    podman: str = "podman"
    """``[containers] podman``: the executable image jobs run with."""
    containers_enabled: str = "auto"
    """``[containers] enabled``: ``false`` skips the check, ``true`` fails without podman."""


def format_finding(f: Finding) -> str:
    """``PASS  gpu: …``, and on WARN/FAIL with a fix a second line ``      fix: …``."""
    line = f"{f.status}  {f.check}: {f.finding}"
    if f.fix and f.status != "PASS":
        line += f"\n      fix: {f.fix}"
    return line


def findings_json(findings: list[Finding]) -> str:
    """The findings as a JSON list of {check, status, finding, fix}."""
    return json.dumps([asdict(f) for f in findings], indent=2)
