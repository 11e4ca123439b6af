"""The images this rig has pulled: pull in ``PREPARING``, an LRU cache, containers removed.

:meth:`ImageCache.use` is what an attempt with ``spec.image`` enters while it is set up:
the image is pulled unless this rig already holds it (podman's output going to the
job's logs), then held in use until the attempt ends. A registry credential
(``registry_auth``) goes to a 0600 file in the agent's own ``containers/`` directory
(never mounted into a job), is passed as ``--authfile`` to that one pull and deleted
right after it; it is never logged. An image pulled with credentials is *private*: a
later job gets it only through a pull with its own credentials, which the registry
checks (only the manifest moves, the layers are held), so a client without access cannot
run an image another client's credentials brought onto the rig. A failed pull is a
:class:`SetupError` whose cause :func:`~worker_agent.containers.classify_pull_failure`
decides.

The cache's index (``containers/images.json``: reference → ``name@sha256:digest``,
image id, size, last use) survives restarts; :meth:`ImageCache.held` is what the
heartbeat reports, most recently used first. Past ``[containers] max_cache_gb`` the
least recently used images not in use are removed (``podman rmi``).

:meth:`ImageCache.python` asks an image which ``python3`` it has (for a job's
``python_requirements``, ``image_python.py``), once per image digest: the answers are
kept in ``containers/pythons.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from worker_agent.config import ContainersConfig
from worker_agent.containers import PodmanRuntime, classify_pull_failure, image_name
from worker_agent.image_python import ImagePython, parse_probe, probe_argv
from worker_agent.setup_failures import SetupError

__all__ = ["Image", "ImageCache"]

log = logging.getLogger("rigshift.agent.images")

#: Entries the heartbeat reports at most (``WorkerStatus.images``).
MAX_REPORTED = 64


@dataclass(slots=True)
class Image:
    """A pulled image: the reference it was pulled by and what it resolved to."""

    reference: str
    digest_ref: str
    """``name@sha256:<digest>``."""
    image_id: str
    size: int
    last_used: float
    private: bool = False
    """Pulled with registry credentials: reused only after the registry says yes again."""


class ImageCache:
    """Pulls, holds and evicts the images of this rig's attempts."""

    def __init__(
        self,
        root: Path,
        runtime: PodmanRuntime,
        config: ContainersConfig,
        env: Mapping[str, str] | None = None,
        rig: str = "",
    ) -> None:
        self.root = root
        self.rig = rig
        """This rig's id: its containers carry the label ``rigshift.rig=<rig>``."""
        self.runtime = runtime
        self.config = config
        self.env = dict(os.environ if env is None else env)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self._index = self.root / "images.json"
        self.images: dict[str, Image] = self._load()
        self._in_use: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._pythons_file = self.root / "pythons.json"

    # --- the index -------------------------------------------------------------------

    def _load(self) -> dict[str, Image]:
        try:
            data = json.loads(self._index.read_text())
            return {r: Image(**e) for r, e in data.items()}
        except (OSError, ValueError, TypeError):
            return {}

    def _save(self) -> None:
        tmp = self._index.with_suffix(".tmp")
        tmp.write_text(json.dumps({r: asdict(i) for r, i in self.images.items()}))
        os.replace(tmp, self._index)

    def held(self) -> list[str]:
        """The heartbeat's ``images``: each reference and its ``name@sha256:digest``, most
        recently used first, at most :data:`MAX_REPORTED` entries."""
        out: list[str] = []
        for image in sorted(self.images.values(), key=lambda i: -i.last_used):
            for entry in (image.reference, image.digest_ref):
                if entry and entry not in out:
                    out.append(entry)
        return out[:MAX_REPORTED]

    # --- podman ----------------------------------------------------------------------

    async def _podman(
        self, *args: str, emit: Callable[[str], None] | None = None, timeout: float = 120.0
    ) -> tuple[int, str]:
        """Run podman; ``(status, output)``, each line also to ``emit``. Killed at ``timeout``."""
        proc = await asyncio.create_subprocess_exec(
            self.runtime.path,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        assert proc.stdout is not None
        lines: list[str] = []

        async def read() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode(errors="replace")
                lines.append(line)
                if emit is not None:
                    emit(line)

        try:
            await asyncio.wait_for(read(), timeout)
            code = await proc.wait()
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        return code, "".join(lines)

    async def _pull(self, reference: str, auth: bytes, emit: Callable[[str], None]) -> Image:
        authfile: Path | None = None
        args = ["pull"]
        if auth:
            authfile = self.root / f"auth-{os.getpid()}-{time.monotonic_ns()}.json"
            with os.fdopen(
                os.open(authfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb"
            ) as f:
                f.write(auth)
            args += ["--authfile", str(authfile)]
        t0 = time.monotonic()
        emit(f"[rigshift-agent] pulling image {reference}\n")
        try:
            code, output = await self._podman(
                *args,
                reference,
                emit=lambda line: emit(f"[rigshift-agent] pull: {line}"),
                timeout=self.config.max_pull_s,
            )
        except TimeoutError:
            raise SetupError(
                f"pulling image {reference} took over {self.config.max_pull_s:g} s", "rig"
            ) from None
        finally:
            if authfile is not None:
                authfile.unlink(missing_ok=True)
        if code != 0:
            cause, message = classify_pull_failure(reference, output)
            raise SetupError(message, cause)
        code, out = await self._podman(
            "image", "inspect", "--format", "{{.Id}} {{.Digest}} {{.Size}}", reference
        )
        fields = out.split()
        if code != 0 or len(fields) < 3:
            raise SetupError(f"pulled image {reference} cannot be inspected: {out.strip()}", "rig")
        image_id, digest, size = fields[0], fields[1], int(fields[2])
        emit(
            f"[rigshift-agent] image {reference} pulled in {time.monotonic() - t0:.1f} s "
            f"({image_name(reference)}@{digest}, {size} bytes)\n"
        )
        ref = f"{image_name(reference)}@{digest}"
        return Image(reference, ref, image_id, size, time.time(), private=bool(auth))

    async def python(self, image: Image, emit: Callable[[str], None]) -> ImagePython:
        """The image's ``python3`` (probed in a container without network once per digest);
        SetupError (the client's) when it has none."""
        try:
            known = json.loads(self._pythons_file.read_text())
        except (OSError, ValueError):
            known = {}
        if isinstance(known.get(image.digest_ref), dict):
            with contextlib.suppress(TypeError):
                return ImagePython(**known[image.digest_ref])
        argv = probe_argv(self.runtime.path, image.image_id, self.rig)
        try:
            code, output = await self._podman(*argv[1:], timeout=120)
        except TimeoutError:
            raise SetupError(f"python3 in image {image.reference} did not answer", "rig") from None
        python = parse_probe(image.reference, code, output)
        emit(
            f"[rigshift-agent] image {image.reference}: {python.implementation} "
            f"{python.version} ({python.machine}, {python.libc or 'libc?'} "
            f"{python.libc_version})\n"
        )
        known[image.digest_ref] = python.to_json()
        tmp = self._pythons_file.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(known))
            os.replace(tmp, self._pythons_file)
        return python

    async def _present(self, image: Image) -> bool:
        code, _ = await self._podman("image", "exists", image.image_id)
        return code == 0

    # --- attempts --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(
        self, reference: str, auth: bytes, emit: Callable[[str], None]
    ) -> AsyncIterator[Image]:
        """The image of ``reference``, pulled unless held, in use until the block ends."""
        async with self._locks.setdefault(reference, asyncio.Lock()):
            image = self.images.get(reference)
            if image is not None and not image.private and await self._present(image):
                emit(f"[rigshift-agent] image {reference} held on this rig ({image.digest_ref})\n")
            else:
                # A private image is pulled again with this job's credentials (the registry
                # checks them; the layers held are not fetched again): holding it on this rig
                # must not let a client without access run it.
                image = await self._pull(reference, auth, emit)
            image.last_used = time.time()
            self.images[reference] = image
            self._in_use[image.image_id] = self._in_use.get(image.image_id, 0) + 1
            await asyncio.to_thread(self._save)
        try:
            try:
                await self.evict()
            except OSError as err:  # a full cache is no reason to fail this attempt
                log.warning("image cache eviction failed: %s", err)
            yield image
        finally:
            left = self._in_use.get(image.image_id, 1) - 1
            if left:
                self._in_use[image.image_id] = left
            else:
                self._in_use.pop(image.image_id, None)
            image.last_used = time.time()
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._save)

    async def evict(self) -> list[str]:
        """Remove the least recently used images not in use while the cache is over
        ``max_cache_gb``; returns the references removed."""
        limit = int(self.config.max_cache_gb * 1e9)
        removed: list[str] = []
        total = sum({i.image_id: i.size for i in self.images.values()}.values())
        for image in sorted(self.images.values(), key=lambda i: i.last_used):
            if total <= limit:
                break
            if image.image_id in self._in_use:
                continue
            code, out = await self._podman("rmi", "--force", image.image_id)
            if code != 0 and "image not known" not in out.lower():
                log.warning("cannot remove image %s: %s", image.reference, out.strip())
                continue
            same = [r for r, i in self.images.items() if i.image_id == image.image_id]
            for ref in same:
                del self.images[ref]
            removed += same
            total -= image.size
            log.info("image cache over %d bytes: removed %s", limit, ", ".join(same))
        if removed:
            await asyncio.to_thread(self._save)
        return removed

    async def remove_orphans(self) -> list[str]:
        """Remove the containers of this rig that no attempt runs (an agent that was killed
        left them); called at start, before any attempt."""
        if not self.rig:
            return []
        with contextlib.suppress(OSError, TimeoutError):
            code, out = await self._podman(
                "ps", "-a", "--filter", f"label=rigshift.rig={self.rig}", "--format", "{{.Names}}"
            )
            names = out.split() if code == 0 else []
            for name in names:
                log.warning("removing container %s left by an earlier agent", name)
                await self.remove_container(name)
            return names
        return []

    async def forget_missing(self) -> list[str]:
        """Drop from the index the images no longer in podman's storage (an operator
        removed them), so that the heartbeat reports only what the rig holds; at start."""
        gone = []
        for ref, image in list(self.images.items()):
            with contextlib.suppress(OSError, TimeoutError):
                if not await self._present(image):
                    gone.append(ref)
                    del self.images[ref]
        if gone:
            await asyncio.to_thread(self._save)
        return gone

    async def stop_container(self, name: str, grace_s: float) -> None:
        """``podman stop --time <grace>`` (cancel: the job gets its grace, then SIGKILL)."""
        with contextlib.suppress(OSError, TimeoutError):
            await self._podman(
                "stop",
                "--ignore",
                "--time",
                f"{max(0, round(grace_s))}",
                name,
                timeout=grace_s + 30,
            )

    async def remove_container(self, name: str) -> None:
        """``podman rm -f``: the attempt has ended, whatever the way; a no-op when gone."""
        with contextlib.suppress(OSError, TimeoutError):
            code, out = await self._podman(
                "rm", "--force", "--ignore", "--time", "0", name, timeout=60
            )
            if code != 0:
                log.warning("cannot remove container %s: %s", name, out.strip())
