"""``rigshift agent doctor``: is this rig ready to run the agent? One line per check.

Each check returns a :class:`Finding` (check, PASS/WARN/FAIL, what it found, the fix)
and never raises; :func:`run_checks` runs them in order::

    config   the TOML file loads as an AgentConfig, and only its owner can read it
    gpu      NVML answers (driver, GPUs), or says why not; --simulate is reported as such
    power    every GPU's power read twice, values plausible for its power limit
    power-limit  whether the agent may set the GPUs' power limits (a farm's efficient
             policy caps them; not root or an unsupported card: they run uncapped)
    broker   gRPC health check over the channel the agent would use (plaintext or TLS)
    tls      TLS handshake verified with --tls-ca, or which plaintext this is
    ray      Ray importable in this Python, its version, token authentication possible
    shm      free /dev/shm for Ray's object store
    clock    skew against the broker's clock, and the kernel's NTP state (adjtimex)
    disk     free space where the agent keeps working directories and checkpoints
    containers  podman works (``podman info``), runs a trivial container, room for images

A FAIL means the agent would not work (or would register fake GPUs); a WARN is
worth knowing but does not stop it. ``rigshift agent doctor`` exits 1 on any FAIL.

Clock: the broker sends its clock (``rigshift-server-time``) in the initial metadata
of every gRPC health check, which has no side effects (a Heartbeat would bring a
stopped agent's worker back online). The doctor takes the midpoint of the round trip
as "now" here; the skew must stay under a few seconds (leases are 15 s, TLS
certificates and logs need the right time). Without a reachable broker only the
kernel's NTP state is checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from worker_agent.doctor.containers import check_containers
from worker_agent.doctor.findings import DoctorInput, Finding, Status, findings_json, format_finding
from worker_agent.doctor.local import (
    GIB,
    check_config,
    check_disk,
    check_gpu,
    check_power,
    check_power_limit,
    check_ray,
    check_shm,
    open_nvml_backend,
)
from worker_agent.doctor.network import (
    broker_clock_offset,
    check_broker,
    check_clock,
    check_tls,
    read_adjtimex,
)

__all__ = [
    "GIB",
    "DoctorInput",
    "Finding",
    "Status",
    "broker_clock_offset",
    "check_broker",
    "check_clock",
    "check_config",
    "check_containers",
    "check_disk",
    "check_gpu",
    "check_power",
    "check_power_limit",
    "check_ray",
    "check_shm",
    "check_tls",
    "findings_json",
    "format_finding",
    "read_adjtimex",
    "run_checks",
]


# -- all ---------------------------------------------------------------------------------


def run_checks(
    inp: DoctorInput,
    *,
    open_nvml: Callable[[], Any] = open_nvml_backend,
    on_finding: Callable[[Finding], None] | None = None,
) -> list[Finding]:
    """Every check, in order; ``on_finding`` sees each as soon as it is known."""
    findings: list[Finding] = []

    def add(f: Finding) -> None:
        findings.append(f)
        if on_finding is not None:
            on_finding(f)

    if inp.config_path is not None:
        add(check_config(inp))
    gpu, backend = check_gpu(inp, open_nvml)
    add(gpu)
    try:
        add(check_power(backend))
        add(check_power_limit(backend))
    finally:
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.close()
    add(check_broker(inp))
    add(check_tls(inp))
    add(check_ray(inp))
    add(check_shm())
    add(check_clock(offset_s=broker_clock_offset(inp)))
    add(check_disk(inp.state_dir))
    add(check_containers(podman=inp.podman, enabled=inp.containers_enabled))
    return findings
