"""The doctor's containers check: podman present and working (``podman info``), able to
run a trivial container (a static busybox as its root filesystem, when there is one), and
free space where it stores images (its graphRoot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from worker_agent.doctor.findings import Finding, Status

__all__ = ["IMAGE_STORE_WARN_BYTES", "check_containers"]

#: Under this much free space in podman's storage, a couple of CUDA images fill it.
IMAGE_STORE_WARN_BYTES = 20 << 30

_INSTALL = "apt-get install podman runc (docs/operator.md: podman and the NVIDIA CDI spec)"

Runner = Callable[..., subprocess.CompletedProcess[str]]


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def check_containers(
    *,
    podman: str = "podman",
    enabled: str = "auto",
    env: Mapping[str, str] | None = None,
    busybox: str | None = None,
    run: Runner = subprocess.run,
    usage: Callable[[str], Any] = shutil.disk_usage,
) -> Finding:
    """PASS when podman works, ran a trivial container and has room for images; WARN when
    it is missing (image jobs go to other rigs) or no busybox was there to run; FAIL when
    it is there but broken, or missing with ``[containers] enabled = true``."""
    if enabled == "false":
        return Finding("containers", "PASS", "image jobs off ([containers] enabled = false)")
    env = dict(os.environ if env is None else env)
    bad: Status = "FAIL" if enabled == "true" else "WARN"
    path = shutil.which(podman, path=env.get("PATH"))
    if path is None:
        return Finding(
            "containers", bad, f"{podman} not found: image jobs go to other rigs", _INSTALL
        )
    kw: dict[str, Any] = {"capture_output": True, "text": True, "env": env, "check": False}
    try:
        done = run([path, "info", "--format", "json"], timeout=60, **kw)
        info = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError) as err:
        return Finding("containers", "FAIL", f"podman info failed: {err}", _INSTALL)
    if not isinstance(info, dict):
        return Finding(
            "containers",
            "FAIL",
            f"podman info failed: {_last_line(done)}",
            "fix podman's configuration (containers.conf: runtime, cgroup_manager, "
            "default_ulimits; the agent passes CONTAINERS_CONF on)",
        )
    version = str((info.get("version") or {}).get("Version", "?"))
    graph_root = str((info.get("store") or {}).get("graphRoot", ""))
    notes: list[str] = []
    status: Status = "PASS"
    fix = ""
    busybox = busybox if busybox is not None else shutil.which("busybox", path=env.get("PATH"))
    if busybox:
        with tempfile.TemporaryDirectory(prefix="rigshift-doctor-") as rootfs:
            (Path(rootfs) / "bin").mkdir()
            shutil.copy(busybox, Path(rootfs) / "bin" / "busybox")
            argv = [path, "run", "--rm", "--network", "none", "--rootfs", rootfs]
            try:
                ran = run([*argv, "/bin/busybox", "true"], timeout=120, **kw)
                why = "" if ran.returncode == 0 else _last_line(ran)
            except (OSError, subprocess.TimeoutExpired) as err:
                why = str(err)
        if why:
            return Finding(
                "containers",
                "FAIL",
                f"podman {version} cannot run a container: {why}",
                "fix podman's runtime (crun/runc, cgroups, ulimits in containers.conf)",
            )
        notes.append("ran a trivial container")
    else:
        status, fix = "WARN", "apt-get install busybox-static, and run the doctor again"
        notes.append("no static busybox here to try a container with")
    if graph_root:
        try:
            free = usage(graph_root).free
        except OSError:
            free = None
        if free is not None:
            notes.append(f"{graph_root} has {free / (1 << 30):.1f} GiB free")
            if free < IMAGE_STORE_WARN_BYTES:
                status = "WARN"
                fix = fix or (f"free space under {graph_root}, or lower [containers] max_cache_gb")
    return Finding("containers", status, f"podman {version}: " + ", ".join(notes), fix)
