"""The local credentials file: ``$RIGSHIFT_HOME/credentials`` (default ``~/.config/rigshift/``).

An INI file with one section per broker address and an optional ``[default]``::

    [127.0.0.1:50051]
    api_key = rsk_...

``rigshift broker serve`` writes the admin key it creates on first start
(:func:`save_api_key`); the CLI and SDK read it when ``RIGSHIFT_API_KEY`` is not set
(:func:`lookup_api_key`). The broker and the client share the file through this module.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path

__all__ = ["credentials_path", "lookup_api_key", "save_api_key"]


def credentials_path() -> Path:
    """``$RIGSHIFT_HOME/credentials``, or ``~/.config/rigshift/credentials``."""
    home = os.environ.get("RIGSHIFT_HOME") or Path.home() / ".config" / "rigshift"
    return Path(home) / "credentials"


def lookup_api_key(broker: str) -> str:
    """The key to use for ``broker``: RIGSHIFT_API_KEY, else the file's section, else default."""
    env = os.environ.get("RIGSHIFT_API_KEY", "").strip()
    if env:
        return env
    path = credentials_path()
    if not path.is_file():
        return ""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error:
        return ""
    for section in (broker, "default"):
        if parser.has_option(section, "api_key"):
            return parser.get(section, "api_key").strip()
    return ""


def save_api_key(broker: str, api_key: str, *, make_default: bool = True) -> Path:
    """Store a key for ``broker`` (and as the default when none is set); mode 0600."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    parser = configparser.ConfigParser(interpolation=None)
    if path.is_file():
        try:
            parser.read(path)
        except configparser.Error:
            parser = configparser.ConfigParser(interpolation=None)
    if not parser.has_section(broker):
        parser.add_section(broker)
    parser.set(broker, "api_key", api_key)
    if make_default:
        if not parser.has_section("default"):
            parser.add_section("default")
        parser.set("default", "api_key", api_key)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        parser.write(f)
    os.replace(tmp, path)
    return path
