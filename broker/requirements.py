"""A job's Python requirements: checked on submit, normalised, and named by their sha256.

The text is a pip requirements file restricted to what a rig can build for anyone:

- one PEP 508 requirement per line (``torch==2.13.0``, ``numpy>=1.26; python_version>"3.9"``,
  ``pkg @ https://…``), ``#`` comments, blank lines, ``\\`` line continuations;
- no options: ``-r``/``-c`` name files the rig does not have, ``-e`` installs a local
  path, and ``--index-url``/``--extra-index-url``/``--find-links`` would override the
  package sources, which are the rig operator's (``[environments]`` in the agent's config).

Normalising drops comments and blank lines, writes each requirement in packaging's
canonical form with its project name canonicalised (``Torch_Vision`` → ``torch-vision``),
removes duplicates and sorts the lines, so two files that ask for the same packages
name the same environment. Its identity on the broker is the sha256 of that text; the
agent adds its own Python version and platform (``worker_agent.environments``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

__all__ = ["MAX_REQUIREMENTS_BYTES", "Requirements", "RequirementsError", "parse_requirements"]

#: Largest requirements text a job may bring.
MAX_REQUIREMENTS_BYTES = 64 << 10

#: Most requirements (lines) in one file.
MAX_REQUIREMENTS = 500


class RequirementsError(ValueError):
    """A line is not a requirement; ``line`` is 1-based (0 for the text as a whole)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class Requirements:
    """Normalised requirements: ``text`` (sorted, one per line) and its ``sha256``."""

    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The normalised file, newline-terminated; empty when there are no requirements."""
        return "".join(f"{line}\n" for line in self.lines)

    @property
    def sha256(self) -> str:
        """Hex sha256 of :attr:`text`; empty when there are no requirements."""
        return hashlib.sha256(self.text.encode()).hexdigest() if self.lines else ""


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first physical line number, text) with ``\\`` continuations joined, comments cut."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw
        # pip's rule: `#` starts a comment at the line's start or after whitespace.
        if line.lstrip().startswith("#"):
            line = ""
        elif " #" in line or "\t#" in line:
            line = line[: min(i for i in (line.find(" #"), line.find("\t#")) if i >= 0)]
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        joined = (pending + line).strip()
        pending = ""
        if joined:
            out.append((start, joined))
    if pending.strip():
        out.append((start, pending.strip()))
    return out


def parse_requirements(text: str) -> Requirements:
    """Check and normalise a requirements file; RequirementsError names the first bad line."""
    if len(text.encode()) > MAX_REQUIREMENTS_BYTES:
        raise RequirementsError(0, f"must be at most {MAX_REQUIREMENTS_BYTES} bytes")
    if "\x00" in text:
        raise RequirementsError(0, "must not contain NUL characters")
    lines: set[str] = set()
    for number, line in _logical_lines(text):
        if line.startswith("-"):
            option = line.split()[0].split("=")[0]
            raise RequirementsError(
                number,
                f"option {option} is not allowed: give requirements only "
                "(package sources are set by each rig's operator)",
            )
        try:
            req = Requirement(line)
        except InvalidRequirement as err:
            raise RequirementsError(
                number, f"not a requirement: {line[:80]!r} ({str(err).splitlines()[0]})"
            ) from None
        req.name = canonicalize_name(req.name)
        lines.add(str(req))
    if len(lines) > MAX_REQUIREMENTS:
        raise RequirementsError(0, f"at most {MAX_REQUIREMENTS} requirements")
    return Requirements(tuple(sorted(lines)))
