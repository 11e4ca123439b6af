"""The doctor's checks of the rig itself: config file, GPUs, power readings, Ray,
/dev/shm and disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker_agent.doctor.findings import DoctorInput, Finding

__all__ = [
    "DISK_FAIL_BYTES",
    "DISK_WARN_BYTES",
    "GIB",
    "check_config",
    "check_disk",
    "check_gpu",
    "check_power",
    "check_power_limit",
    "check_ray",
    "check_shm",
    "open_nvml_backend",
]

GIB = 1 << 30
#: Under this much free disk the agent cannot hold a working directory (≤ 512 MiB) next to
#: its archive, a checkpoint (≤ 256 MiB) and the artifact cache.
DISK_FAIL_BYTES = 2 * GIB
#: Under this much, a few cached archives and checkpoints fill the disk.
DISK_WARN_BYTES = 10 * GIB
#: Ray's default object store is 30 % of the memory; it goes to /tmp when /dev/shm is smaller.
SHM_SHARE_OF_MEMORY = 0.30
#: A GPU reading above its power limit by more than this share is implausible.
POWER_OVER_LIMIT = 1.25


# -- config ------------------------------------------------------------------------------


def check_config(inp: DoctorInput) -> Finding:
    """The config file loads, and nobody but its owner can read the token in it."""
    path = inp.config_path
    assert path is not None
    if inp.config_error:
        return Finding(
            "config",
            "FAIL",
            inp.config_error,
            f"correct {path} (keys are AgentConfig fields, docs/agent.md), or write it again "
            "with `rigshift agent install --force`; run the doctor as root or the agent's user",
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return Finding(
            "config",
            "WARN",
            f"{path} loads but is mode {mode:04o}: others can read the enrollment token",
            f"chmod 600 {path}",
        )
    return Finding("config", "PASS", f"{path} loads (broker {inp.broker_address}, mode 0600)")


# -- gpu and power -----------------------------------------------------------------------


def _nvml_reason(err: Exception) -> str:
    name = type(err).__name__
    if "LibraryNotFound" in name:
        return "no NVIDIA driver (libnvidia-ml not found)"
    if "DriverNotLoaded" in name:
        return "NVIDIA driver not loaded (libnvidia-ml found, kernel module not)"
    if "NoPermission" in name:
        return "no permission to open /dev/nvidia* (not in the video group?)"
    return f"NVML failed: {err}"


def open_nvml_backend() -> Any:
    from worker_agent.gpu import NvmlBackend

    return NvmlBackend()


def check_gpu(
    inp: DoctorInput, open_nvml: Callable[[], Any] = open_nvml_backend
) -> tuple[Finding, Any]:
    """NVML's view of the rig, and the backend the agent would use (None when it has none)."""
    from worker_agent.gpu import SimulatedBackend

    try:
        nvml = open_nvml()
    except Exception as err:  # pynvml raises NVMLError_* subclasses, RuntimeError for 0 GPUs
        reason = _nvml_reason(err)
        if inp.simulate:
            return (
                Finding(
                    "gpu",
                    "WARN",
                    f"{reason}; the simulated backend would be used: {inp.simulate}",
                    "fine for a test rig; on a GPU rig install the NVIDIA driver "
                    "(nvidia-smi must list the GPUs) and drop `simulate` from the config",
                ),
                SimulatedBackend(inp.simulate),
            )
        return (
            Finding(
                "gpu",
                "FAIL",
                f"{reason}; the agent would fall back to simulated GPUs and sell GPUs "
                "this rig does not have",
                "install the NVIDIA driver so that `nvidia-smi` lists the GPUs (and add the "
                'agent\'s user to the video group), or set `simulate = "RTX3090x4"` '
                "for a test rig",
            ),
            None,
        )
    gpus = nvml.gpus()
    models = ", ".join(f"{g.index}: {g.model}" for g in gpus)
    if inp.simulate:
        nvml.close()
        return (
            Finding(
                "gpu",
                "WARN",
                f"NVML sees {len(gpus)} GPU(s) ({models}) but simulate={inp.simulate!r} is set: "
                "the agent would simulate instead",
                "drop `simulate` (--simulate) to offer the real GPUs",
            ),
            SimulatedBackend(inp.simulate),
        )
    return Finding("gpu", "PASS", f"NVML: {len(gpus)} GPU(s): {models}"), nvml


def check_power(backend: Any, interval_s: float = 0.5) -> Finding:
    """Power of every GPU read twice; each reading must lie in (0, 1.25 times the limit]."""
    if backend is None:
        return Finding(
            "power",
            "FAIL",
            "no readings: there is no GPU backend (see gpu)",
            "fix the gpu check first",
        )
    gpus = backend.gpus()
    readings: dict[int, list[float]] = {g.index: [] for g in gpus}
    try:
        for n in range(2):
            if n:
                time.sleep(interval_s)
            for g in gpus:
                readings[g.index].append(float(backend.power_watts(g.index)))
    except Exception as err:
        return Finding(
            "power", "FAIL", f"reading power failed: {err}", "check `nvidia-smi -q -d POWER`"
        )
    bad = [
        f"GPU {g.index} read {', '.join(f'{w:.1f}' for w in readings[g.index])} W "
        f"(limit {g.power_limit_watts} W)"
        for g in gpus
        if not all(0 < w <= g.power_limit_watts * POWER_OVER_LIMIT for w in readings[g.index])
    ]
    simulated = backend.name != "nvml"
    values = [w for ws in readings.values() for w in ws]
    span = f"{min(values):.1f} to {max(values):.1f} W"
    if bad:
        return Finding(
            "power",
            "WARN",
            f"implausible readings: {'; '.join(bad)}",
            "energy would be metered wrongly: check `nvidia-smi -q -d POWER` and the driver; "
            "a riser or PSU fault can also show this",
        )
    counters = sum(backend.energy_millijoules(g.index) is not None for g in gpus)
    what = "simulated values (a model, not a measurement)" if simulated else "measured"
    return Finding(
        "power",
        "PASS",
        f"{len(gpus)} GPU(s) read twice {interval_s:g} s apart: {span}, {what}; "
        f"energy counter on {counters} of {len(gpus)}",
    )


def check_power_limit(backend: Any) -> Finding:
    """Whether the agent may set each GPU's power limit: each is set to the limit it has
    now (no change), as the agent does at start (``worker_agent.power``)."""
    from worker_agent.power import PowerLimits

    if backend is None:
        return Finding("power-limit", "FAIL", "no GPU backend (see gpu)", "fix the gpu check first")
    probed = PowerLimits(backend).probe()
    refused = sorted(i for i, ok in probed.items() if not ok)
    if not probed or refused:
        which = ", ".join(map(str, refused)) if probed else "any GPU"
        return Finding(
            "power-limit",
            "WARN",
            f"the power limit of GPU(s) {which} cannot be set: AI work runs uncapped there",
            "a farm on the efficient power policy needs the agent to run as root (as "
            "`nvidia-smi -pl` does) and a card that supports power limits",
        )
    what = "simulated" if backend.name != "nvml" else "NVML accepts them"
    return Finding("power-limit", "PASS", f"{len(probed)} GPU(s) can be power-limited ({what})")


# -- ray and shm -------------------------------------------------------------------------

_RAY_PROBE = """
import json, sys
try:
    import ray
except Exception as err:
    print(json.dumps({"error": f"{type(err).__name__}: {err}"})); sys.exit(0)
out = {"version": ray.__version__}
try:
    from ray._private.authentication import authentication_utils as u
    out["token_auth"] = bool(u.is_token_auth_enabled())
except Exception as err:
    out["token_auth_error"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


def check_ray(inp: DoctorInput, python: str = sys.executable) -> Finding:
    """Ray in the agent's Python: importable, version, token authentication can be switched on.

    Probed in a child process with ``RAY_AUTH_MODE=token`` and a throwaway token file,
    the way the agent starts its local head; no Ray process is started.
    """
    fix_install = f"{python} -m pip install 'ray[default]>=2.40'"
    with tempfile.TemporaryDirectory() as tmp:
        token = Path(tmp) / "ray_auth_token"
        token.write_text("0" * 64)
        token.chmod(0o600)
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
        }
        env.pop("RAY_AUTH_TOKEN", None)
        try:
            out = subprocess.run(
                [python, "-c", _RAY_PROBE],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            probe = json.loads(out.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, OSError, ValueError, IndexError) as err:
            return Finding("ray", "FAIL", f"probing Ray failed: {err}", fix_install)
    if "error" in probe:
        return Finding("ray", "FAIL", f"Ray not importable: {probe['error']}", fix_install)
    version = probe["version"]
    where = f"joins {inp.ray_address} (not contacted)" if inp.ray_address else "local head"
    if not probe.get("token_auth"):
        why = probe.get("token_auth_error", "RAY_AUTH_MODE=token is not honoured")
        return Finding(
            "ray",
            "FAIL",
            f"ray {version}: token authentication cannot be enabled ({why})",
            f"upgrade Ray: {python} -m pip install -U 'ray[default]>=2.40'",
        )
    return Finding(
        "ray",
        "PASS",
        f"ray {version} importable; token authentication can be enabled; {where}",
    )


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_shm(shm: Path = Path("/dev/shm"), memory_bytes: int | None = None) -> Finding:
    """Ray's object store wants 30 % of the memory in /dev/shm (else it falls back to /tmp)."""
    memory = _memory_bytes() if memory_bytes is None else memory_bytes
    want = int(memory * SHM_SHARE_OF_MEMORY)
    try:
        free = shutil.disk_usage(shm).free
    except OSError as err:
        return Finding(
            "shm",
            "WARN",
            f"{shm} unusable ({err}): Ray would keep its object store in /tmp (slower)",
            "mount a tmpfs on /dev/shm",
        )
    found = f"{free / GIB:.1f} GiB free in {shm} (Ray's object store wants {want / GIB:.1f} GiB)"
    if free < want:
        return Finding(
            "shm",
            "WARN",
            found + ": Ray would fall back to /tmp (slower)",
            f"mount -o remount,size={max(1, -(-want // GIB))}G {shm} (in a container: --shm-size)",
        )
    return Finding("shm", "PASS", found)


# -- disk --------------------------------------------------------------------------------


def check_disk(state_dir: Path, usage: Callable[[Path], Any] = shutil.disk_usage) -> Finding:
    """Free space on the filesystem that holds (or will hold) the agent's state directory."""
    path = state_dir.absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = usage(probe).free
    except OSError as err:
        return Finding("disk", "FAIL", f"cannot stat {probe}: {err}", "check the filesystem")
    where = str(path) if probe == path else f"{path} (not created yet; {probe})"
    found = f"{free / GIB:.1f} GiB free for {where}"
    fix = (
        "free space there or point state_dir at a larger disk; attempts need up to 512 MiB "
        "of working directory and 256 MiB of checkpoint each"
    )
    if free < DISK_FAIL_BYTES:
        return Finding("disk", "FAIL", found + f" (< {DISK_FAIL_BYTES // GIB} GiB)", fix)
    if free < DISK_WARN_BYTES:
        return Finding("disk", "WARN", found + f" (< {DISK_WARN_BYTES // GIB} GiB)", fix)
    if probe == path and not os.access(path, os.W_OK):
        return Finding(
            "disk",
            "WARN",
            found + f"; not writable by uid {os.geteuid()} (fine if the agent runs as its owner)",
            f"run the doctor as the agent's user, or chown that user {path}",
        )
    return Finding("disk", "PASS", found)
