"""Real containers for the tests and the benchmark: podman's configuration, a local
registry, and images built here and pushed to it.

There is no Docker daemon on the machines Rigshift is tested on; Debian's ``podman``
runs containers, with two quirks handled through podman's own configuration files
(never through special cases in the agent, which passes its environment on to podman):
crun refuses a hybrid cgroup layout, so ``runc`` is the runtime, and limits above the
current ones are refused, so ``default_ulimits`` stay at 4096. A registry is Debian's
``docker-registry`` on a free loopback port, declared insecure (plain HTTP); with
``start(private=True)`` a second one asks for a user and password (an htpasswd file;
``kit.auth_json`` is the containers auth file that opens it)::

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

import base64
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
class Registry:
    """A running ``docker-registry``: its address, process and log (its access log too)."""

    address: str  # host:port
    proc: subprocess.Popen[bytes]
    log: Path
    creds: str = ""  # "user:password" when it asks for them

    def log_tail(self) -> str:
        """The last lines of its log, for error messages."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""


@dataclass
class ContainerKit:
    """podman's configuration under ``root``, running registries, and what was pushed.

    ``registry`` is open to anyone; with ``start(private=True)`` ``private_registry``
    asks for a user and password (htpasswd), and ``auth_json`` is the containers auth
    file (``{"auths": ...}``, as ``podman login`` writes it) that opens it.
    """

    root: Path
    env: dict[str, str]  # the whole environment, with CONTAINERS_CONF and ..._REGISTRIES_CONF
    registries: list[Registry] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    auth_json: bytes = b""

    # --- starting and stopping ----------------------------------------------------------

    @classmethod
    def start(cls, root: Path, *, private: bool = False, timeout_s: float = 30.0) -> ContainerKit:
        """Write the configuration, start the registry (and the private one), wait until
        they answer."""
        missing = missing_tools()
        if missing:
            raise ContainerKitError(f"not installed: {', '.join(missing)}")
        root.mkdir(parents=True, exist_ok=True)
        addresses = [f"127.0.0.1:{_free_port()}" for _ in range(2 if private else 1)]
        (root / "containers.conf").write_text(CONTAINERS_CONF)
        (root / "registries.conf").write_text(
            "".join(f'[[registry]]\nlocation = "{a}"\ninsecure = true\n\n' for a in addresses)
        )
        # No credentials but the ones a pull is given: not root's own podman login.
        (root / "no-auth.json").write_text('{"auths": {}}\n')
        env = {
            **os.environ,
            "CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(root / "no-auth.json"),
        }
        kit = cls(root, env)
        try:
            for i, address in enumerate(addresses):
                kit.registries.append(kit._serve(f"registry-{i}", address, secured=i == 1))
            for registry in kit.registries:
                _wait_registry(registry, timeout_s)
        except BaseException:
            kit.stop()
            raise
        return kit

    def _serve(self, name: str, address: str, *, secured: bool) -> Registry:
        auth = ""
        creds = ""
        if secured:
            user, password = "rigshift-test", secrets.token_urlsafe(12)
            (self.root / f"{name}.htpasswd").write_text(f"{user}:{_bcrypt(password)}\n")
            auth = (
                "auth: {htpasswd: {realm: rigshift-test, "
                f"path: {self.root / f'{name}.htpasswd'}}}}}\n"
            )
            creds = f"{user}:{password}"
            token = base64.b64encode(creds.encode()).decode()
            self.auth_json = json.dumps({"auths": {address: {"auth": token}}}).encode()
        (self.root / f"{name}.yml").write_text(
            "version: 0.1\n"
            "log: {level: info, accesslog: {disabled: false}}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.root / name}}}, "
            "delete: {enabled: true}}\n"
            f"http: {{addr: {address}}}\n" + auth
        )
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                ["docker-registry", "serve", str(self.root / f"{name}.yml")],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return Registry(address, proc, log_path, creds)

    def __enter__(self) -> ContainerKit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def registry(self) -> str:
        """host:port of the open registry."""
        return self.registries[0].address

    @property
    def private_registry(self) -> str:
        """host:port of the registry that asks for credentials (``start(private=True)``)."""
        if len(self.registries) < 2:
            raise ContainerKitError("start(private=True) for a private registry")
        return self.registries[1].address

    def _registry_of(self, ref: str) -> Registry:
        for registry in self.registries:
            if ref.startswith(f"{registry.address}/"):
                return registry
        raise ContainerKitError(f"{ref} is not in one of the kit's registries")

    def stop(self) -> None:
        """Stop the registries and remove the local copies of what the kit pushed (pulled
        by the tests' agents into podman's storage)."""
        for ref in self.pushed:
            self.podman("rmi", "-f", ref, check=False)
        for registry in self.registries:
            if registry.proc.poll() is None:
                registry.proc.terminate()
                try:
                    registry.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    registry.proc.kill()
                    registry.proc.wait()

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
        private: bool = False,
    ) -> str:
        """Build an image of static busybox (every applet linked in /bin) plus ``files``
        (path in the image -> content; executable when it starts with ``#!``), push it as
        ``REGISTRY/NAME:TAG`` and return that reference. ``random_mb`` adds a file of that
        many MiB of random bytes (a large layer that does not compress). The local copy is
        removed unless ``keep_local``. ``private`` pushes it to the registry that asks for
        credentials.
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
        registry = self.registries[1 if private else 0]
        ref = f"{registry.address}/{name}:{tag}"
        local = f"localhost/{name}-build:{tag}"
        self.podman("import", "-q", str(rootfs_tar), local)
        rootfs_tar.unlink()
        self.podman("tag", local, ref)
        self.podman("push", "-q", *(("--creds", registry.creds) if private else ()), ref)
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
        """Digests of the layers of ``ref`` (in one of the kit's registries), from its
        manifest."""
        registry = self._registry_of(ref)
        name, _, tag = ref.removeprefix(f"{registry.address}/").rpartition(":")
        headers = {"Accept": ", ".join(_MANIFEST_TYPES)}
        if registry.creds:
            headers["Authorization"] = "Basic " + base64.b64encode(registry.creds.encode()).decode()
        request = urllib.request.Request(
            f"http://{registry.address}/v2/{name}/manifests/{tag}", headers=headers
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            manifest = json.loads(r.read())
        return [str(layer["digest"]) for layer in manifest["layers"]]

    def layer_fetches(self, ref: str) -> int:
        """How many times the registry has served a layer of ``ref``, from its access log.
        A pull of an image podman already holds fetches none (``podman pull`` fetches the
        manifest and the small config blob again, never a layer it has)."""
        registry = self._registry_of(ref)
        name = ref.removeprefix(f"{registry.address}/").rpartition(":")[0]
        try:
            text = registry.log.read_text(errors="replace")
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


def _wait_registry(registry: Registry, timeout_s: float) -> None:
    """Until the registry answers ``/v2/`` (200, or 401 when it asks for credentials)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if registry.proc.poll() is not None:
            raise ContainerKitError(f"docker-registry exited:\n{registry.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{registry.address}/v2/", timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as err:
            if err.code == 401:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ContainerKitError(f"the registry did not answer:\n{registry.log_tail()}")
        time.sleep(0.05)


def _bcrypt(password: str) -> str:
    """A bcrypt hash for an htpasswd file (the registry accepts no other), from the C
    library's crypt(3) (``crypt`` is deprecated, and enough for a test's password)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    salt = "$2b$05$" + "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(22))
    hashed = crypt.crypt(password, salt)
    if not hashed or not hashed.startswith("$2b$"):
        raise ContainerKitError("the C library's crypt(3) does not do bcrypt")
    return hashed


_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


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
