"""Real containers for the tests and the benchmark: podman's configuration, a local
registry, and images built here and pushed to it.

There is no Docker daemon on the machines Rigshift is tested on; Debian's ``podman``
runs containers, with two quirks handled through podman's own configuration files
(never through special cases in the agent, which passes its environment on to podman):
crun refuses a hybrid cgroup layout, so ``runc`` is the runtime, and limits above the
current ones are refused, so ``default_ulimits`` stay at 4096. A registry is Debian's
``docker-registry`` on a free loopback port, declared insecure (plain HTTP)::

    with ContainerKit.start(tmp / "kit") as kit:
        ref = kit.build_image("train", {"opt/train.sh": SCRIPT})   # pushed, not local
        fleet = LocalFleet(tmp / "fleet", env=kit.env)            # agents see the config
        ...
        kit.blob_fetches("train")   # layers the registry served for that repository

:meth:`ContainerKit.build_image` imports a root file system holding static busybox
(``/bin/sh`` and the usual tools) and the given files with ``podman import``, pushes it
and removes the local copy, so the first job that uses it must pull it. Each image gets
a file naming it, so two images never share a layer (podman would skip a layer it
already holds, whichever image brought it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CONTAINERS_CONF",
    "TOOLS",
    "ContainerKit",
    "ContainerKitError",
    "missing_tools",
]

#: What the kit needs on the machine: Debian package -> a file it installs.
TOOLS: dict[str, str] = {
    "podman": "podman",
    "runc": "runc",
    "docker-registry": "docker-registry",
    "busybox-static": "busybox",
}

#: podman's configuration for this machine (see the module docstring).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


class ContainerKitError(RuntimeError):
    """A podman command or the registry failed."""


def missing_tools() -> list[str]:
    """The Debian packages of :data:`TOOLS` whose program is not installed."""
    missing = [pkg for pkg, prog in TOOLS.items() if shutil.which(prog) is None]
    busybox = shutil.which("busybox")
    if busybox and "busybox-static" not in missing and not _static(Path(busybox)):
        missing.append("busybox-static")  # a dynamic busybox cannot run in a bare image
    return missing


def _static(path: Path) -> bool:
    """True when ``path`` is an ELF file with no program interpreter (statically linked)."""
    try:
        data = path.read_bytes()[:4096]
    except OSError:
        return False
    return data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data and b"/lib/ld-" not in data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ContainerKit:
    """podman's configuration under ``root``, a running registry, and what was pushed."""

    root: Path
    registry: str  # host:port of the registry
    env: dict[str, str]  # the whole environment, with CONTAINERS_CONF and ..._REGISTRIES_CONF
    registry_proc: subprocess.Popen[bytes] | None = None
    pushed: list[str] = field(default_factory=list)

    # --- starting and stopping ----------------------------------------------------------

    @classmethod
    def start(cls, root: Path, *, timeout_s: float = 30.0) -> ContainerKit:
        """Write the configuration, start the registry, wait until it answers."""
        missing = missing_tools()
        if missing:
            raise ContainerKitError(f"not installed: {', '.join(missing)}")
        root.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        registry = f"127.0.0.1:{port}"
        (root / "containers.conf").write_text(CONTAINERS_CONF)
        (root / "registries.conf").write_text(
            f'[[registry]]\nlocation = "{registry}"\ninsecure = true\n'
        )
        storage = root / "registry-data"
        (root / "registry.yml").write_text(
            "version: 0.1\n"
            "log: {level: info, accesslog: {disabled: false}}\n"
            f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: {registry}}}\n"
        )
        env = {
            **os.environ,
            "CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
        }
        kit = cls(root, registry, env)
        with open(kit.registry_log, "ab") as log:
            kit.registry_proc = subprocess.Popen(
                ["docker-registry", "serve", str(root / "registry.yml")],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            kit._wait_registry(timeout_s)
        except BaseException:
            kit.stop()
            raise
        return kit

    def __enter__(self) -> ContainerKit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def registry_log(self) -> Path:
        """The registry's output, its access log included."""
        return self.root / "registry.log"

    def _wait_registry(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.registry_proc is not None
            if self.registry_proc.poll() is not None:
                raise ContainerKitError(f"docker-registry exited:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.registry}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise ContainerKitError(f"the registry did not answer:\n{self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.registry_log.read_text(errors="replace").splitlines()[-20:])
        return ""

    def stop(self) -> None:
        """Stop the registry and remove the local copies of what the kit pushed (pulled
        by the tests' agents into podman's storage)."""
        for ref in self.pushed:
            self.podman("rmi", "-f", ref, check=False)
        proc = self.registry_proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- podman ---------------------------------------------------------------------------

    def podman(
        self, *args: str, check: bool = True, timeout_s: float = 600.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS`` with the kit's configuration; raise on failure if ``check``."""
        done = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise ContainerKitError(
                f"podman {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}"
            )
        return done

    def build_image(
        self,
        name: str,
        files: Mapping[str, str | bytes] | None = None,
        *,
        tag: str = "1",
        random_mb: int = 0,
        keep_local: bool = False,
    ) -> str:
        """Build an image of static busybox (every applet linked in /bin) plus ``files``
        (path in the image -> content; executable when it starts with ``#!``), push it as
        ``REGISTRY/NAME:TAG`` and return that reference. ``random_mb`` adds a file of that
        many MiB of random bytes (a large layer that does not compress). The local copy is
        removed unless ``keep_local``.
        """
        work = self.root / "build" / f"{name}-{tag}-{secrets.token_hex(4)}"
        rootfs_tar = work / "rootfs.tar"
        work.mkdir(parents=True)
        busybox = shutil.which("busybox")
        assert busybox is not None
        with tarfile.open(rootfs_tar, "w") as tar:
            for d in ("bin", "tmp", "opt", "etc"):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
                tar.addfile(info)
            tar.add(busybox, "bin/busybox")
            for applet in _applets(busybox):  # sh, ls, cat, env, sleep, true, ...
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
            contents: dict[str, str | bytes] = {
                "etc/rigshift-test-image": f"{name}:{tag}\n",
                **(files or {}),
            }
            for path, content in contents.items():
                data = content.encode() if isinstance(content, str) else content
                _add_bytes(tar, path.lstrip("/"), data, executable=data.startswith(b"#!"))
            if random_mb:
                info = tarfile.TarInfo("opt/random.bin")
                info.size, info.mode = random_mb << 20, 0o644
                tar.addfile(info, _RandomBytes())
        ref = f"{self.registry}/{name}:{tag}"
        local = f"localhost/{name}-build:{tag}"
        self.podman("import", "-q", str(rootfs_tar), local)
        rootfs_tar.unlink()
        self.podman("tag", local, ref)
        self.podman("push", "-q", ref)
        self.pushed.append(ref)
        self.podman("rmi", "-f", local, *(() if keep_local else (ref,)))
        return ref

    def remove_local(self, ref: str) -> None:
        """Remove the local copy of ``ref`` (nothing if there is none)."""
        self.podman("rmi", "-f", ref, check=False)

    def has_local(self, ref: str) -> bool:
        """True when podman's storage holds ``ref``."""
        return self.podman("image", "exists", ref, check=False).returncode == 0

    def containers(self) -> list[dict[str, Any]]:
        """``podman ps -a`` as JSON: every container, running or not."""
        out = self.podman("ps", "-a", "--format", "json").stdout
        found: list[dict[str, Any]] = json.loads(out or "[]") or []
        return found

    def containers_named(self, fragment: str) -> list[str]:
        """Names of the containers (running or not) whose name contains ``fragment``."""
        return [n for c in self.containers() for n in (c.get("Names") or []) if fragment in str(n)]

    # --- the registry -----------------------------------------------------------------

    def layers(self, ref: str) -> list[str]:
        """Digests of the layers of ``ref`` (one of this registry's), from its manifest."""
        name, _, tag = ref.removeprefix(f"{self.registry}/").rpartition(":")
        request = urllib.request.Request(
            f"http://{self.registry}/v2/{name}/manifests/{tag}",
            headers={"Accept": ", ".join(_MANIFEST_TYPES)},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            manifest = json.loads(r.read())
        return [str(layer["digest"]) for layer in manifest["layers"]]

    def layer_fetches(self, ref: str) -> int:
        """How many times the registry has served a layer of ``ref``, from its access log.
        A pull of an image podman already holds fetches none (``podman pull`` fetches the
        manifest and the small config blob again, never a layer it has)."""
        name = ref.removeprefix(f"{self.registry}/").rpartition(":")[0]
        try:
            text = self.registry_log.read_text(errors="replace")
        except OSError:
            return 0
        return sum(
            len(re.findall(rf'"GET /v2/{re.escape(name)}/blobs/{digest} [^"]*" 200', text))
            for digest in self.layers(ref)
        )


#: Manifest media types a registry may answer with (OCI's, Docker's v2).
_MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


def _applets(busybox: str) -> list[str]:
    """The commands ``busybox`` provides (each becomes a link in the image's /bin)."""
    out = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"} | {"sh"})


class _RandomBytes:
    """A file of random bytes that never ends (``tarfile`` reads what the member's size says)."""

    def read(self, size: int = -1) -> bytes:
        return os.urandom(size if size >= 0 else 1 << 20)


def _add_bytes(tar: tarfile.TarFile, path: str, data: bytes, *, executable: bool) -> None:
    import io

    parts = Path(path).parts
    for i in range(1, len(parts)):  # parent directories, once each
        d = "/".join(parts[:i])
        if d not in tar.getnames():
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
    info = tarfile.TarInfo(path)
    info.size, info.mode = len(data), 0o755 if executable else 0o644
    tar.addfile(info, io.BytesIO(data))
