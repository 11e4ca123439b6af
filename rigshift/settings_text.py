"""What ``rigshift broker config show`` and ``rigshift agent config show`` print.

Both processes load their settings with pydantic-settings (``broker/settings.py``,
``worker_agent/settings.py``); this module only renders the effective values, with
secrets masked, as TOML (a file either process reads back) or JSON. The standard
library reads TOML but does not write it; the values here are flat scalars, lists and
tables of them, so the few lines below do instead of another dependency.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MASK", "mask_url_password", "render_settings", "validation_message"]

#: What a secret is replaced with.
MASK = "***"

_URL_PASSWORD = re.compile(r"^(?P<head>[a-zA-Z][\w+.-]*://[^:/@]*:)(?P<password>[^@]*)(?=@)")


def mask_url_password(url: str) -> str:
    """``postgresql+psycopg://u:secret@db/x`` → ``postgresql+psycopg://u:***@db/x``."""
    return _URL_PASSWORD.sub(lambda m: m["head"] + MASK, url)


def _plain(value: Any) -> Any:
    """Paths as strings, tuples as lists, None dropped (TOML has no null)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_lines(table: Mapping[str, Any], prefix: str) -> list[str]:
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)
    ]
    for key, sub in table.items():
        if isinstance(sub, dict):
            name = f"{prefix}{_toml_key(key)}"
            lines += ["", f"[{name}]", *_toml_lines(sub, f"{name}.")]
    return lines


def render_settings(values: Mapping[str, Any], *, as_json: bool) -> str:
    """``values`` (already masked) as a TOML document or one JSON object."""
    plain = _plain(values)
    if as_json:
        return json.dumps(plain, indent=2, sort_keys=True)
    return "\n".join(_toml_lines(plain, "")).strip() + "\n"


def validation_message(err: Any, what: str) -> str:
    """A pydantic ``ValidationError`` as one line: ``invalid WHAT: field: problem; ...``."""
    problems = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "settings"
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown key {field!r}")
        elif e["type"] == "value_error":  # a check of the model's own: its message as is
            problems.append(str(e["ctx"]["error"]))
        else:
            problems.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid {what}: " + "; ".join(problems)
