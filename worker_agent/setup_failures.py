"""Why preparing an attempt failed, and whose fault it was.

A failed setup ends the attempt before its process starts. The broker needs to know
whose fault it was: the **client's** (the job's requirements name a version no index
has, conflict, or fail to build) fails the job at once, since another rig would fail
the same way; the **rig's** (disk full, index unreachable, a build past its time
limit, uv missing) requeues the job elsewhere. :func:`classify_failure` reads uv's
output for that; :class:`SetupError` carries the verdict to ``attempts.py``.
"""

from __future__ import annotations

import re

__all__ = ["SetupError", "classify_failure"]


class SetupError(Exception):
    """Preparing an attempt failed.

    ``cause`` is ``"client"`` (the job's spec: a requirement no index has, a
    conflict) or ``"rig"`` (disk full, index unreachable, timeout, uv missing).
    """

    def __init__(self, message: str, cause: str) -> None:
        if cause not in ("client", "rig"):
            raise ValueError(f"cause must be 'client' or 'rig', got {cause!r}")
        super().__init__(message)
        self.message = message
        self.cause = cause

    def __repr__(self) -> str:
        return f"SetupError({self.message!r}, {self.cause!r})"


_DISK_FULL = ("no space left on device", "disk quota exceeded")
_NETWORK = (
    "failed to fetch",
    "error sending request",
    "dns error",
    "connection refused",
    "connection reset",
    "timed out",
    "could not connect",
    "network is unreachable",
)
_OFFLINE = ("network was disabled", "was not found in the cache")
_PARSE = re.compile(r"couldn't parse requirement|failed to parse", re.IGNORECASE)
# uv's decorations in front of an error and its causes, old (0.5) and new style.
_MARKERS = re.compile("^(?:error:|cause:|caused by:|\u00d7|╰─▶|├─▶|[│ ]+)\\s*", re.IGNORECASE)


def classify_failure(output: str) -> tuple[str, str]:
    """``(cause, readable message)`` from uv's output of a failed install.

    ``cause`` is ``"client"`` when the job's requirements are at fault: no version
    of a requirement in the package index (``"no version of `torch==9.9` in the
    package index"``), requirements that conflict, a package whose build backend
    fails, an unparsable requirements file. It is ``"rig"`` for a full disk
    (``"disk full: ..."``), an unreachable index (``"package index unreachable:
    ..."``), a package missing from the offline cache, and for anything not
    recognised (uv's last error line). Understands uv's output from 0.5 (boxed,
    wrapped) to 0.13 (``error:`` / ``cause:`` lines).
    """
    lines = [_clean(line) for line in output.splitlines()]
    lines = [line for line in lines if line]
    flat = " ".join(output.split())  # old uv wraps long sentences over several lines
    lower = flat.lower()

    disk = next((line for line in lines if any(m in line.lower() for m in _DISK_FULL)), None)
    if disk is not None:
        return "rig", f"disk full: {disk}"
    if any(m in lower for m in _NETWORK):
        url = re.search(r"failed to fetch:?\s*`?([^\s`]+?)`?(?:\s|$)", flat, re.IGNORECASE)
        detail = _last_cause(lines)
        where = f"{url.group(1)} ({detail})" if url else detail
        return "rig", f"package index unreachable: {where}"
    if any(m in lower for m in _OFFLINE):
        name = re.search(r"Because (\S+?) was not found in the cache", flat)
        what = f"`{name.group(1)}` is not in uv's cache" if name else _last_cause(lines)
        return "rig", f"package not available offline: {what}"
    built = re.search(r"Failed to (?:download and )?build `([^`]+)`", flat)
    if built and "no solution found when resolving:" in lower:
        # The build's own requirements (setuptools, ...) are missing from the rig's sources.
        return "rig", f"build requirements of `{built.group(1)}` unavailable: {_last_cause(lines)}"
    if built:
        return "client", f"`{built.group(1)}` failed to build: {_last_cause(lines)}"
    if "no solution found when resolving" in lower:
        return "client", _resolution(flat) or _last_cause(lines)
    at = next((i for i, line in enumerate(lines) if _PARSE.search(line)), None)
    if at is not None:
        return "client", "invalid requirements: " + ": ".join(lines[at : at + 2])
    return "rig", _last_cause(lines)


def _clean(line: str) -> str:
    """A line of uv output without its error/cause decorations."""
    line = line.strip()
    while True:
        stripped = _MARKERS.sub("", line, count=1)
        if stripped == line:
            return line
        line = stripped


def _resolution(flat: str) -> str | None:
    """A readable sentence from uv's explanation of an unsatisfiable resolution."""
    missing = re.search(r"Because there is no version of (\S+?) and", flat) or re.search(
        r"Because (\S+?) was not found in the (?:package registry|provided package locations)",
        flat,
    )
    if missing:
        return f"no version of `{missing.group(1)}` in the package index"
    only = re.search(r"Because only (\S+?) (?:is|are) available and you require (\S+?),", flat)
    if only:
        return (
            f"no version of `{only.group(2)}` in the package index (only {only.group(1)} is there)"
        )
    why = re.search(r"(Because .*?)(?: hint:|$)", flat)
    if why:
        return f"conflicting requirements: {why.group(1)}"
    return None


def _last_cause(lines: list[str]) -> str:
    """The innermost cause uv printed (the last line that is no hint or banner)."""
    meaningful = [line for line in lines if not _noise(line)]
    return meaningful[-1] if meaningful else "the installer failed without saying why"


def _noise(line: str) -> bool:
    lower = line.lower()
    return lower.startswith(
        ("hint:", "warning:", "using python", "using cpython", "activate with", "creating virtual")
    )
