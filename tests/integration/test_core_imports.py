"""Importing the pure core loads no transport, database or event loop (STYLE.md 1, 5).

A fresh interpreter imports ``broker.core`` (and with it the scheduler, the queue, the
records, settlement, events and errors) and must not have loaded grpc, SQLAlchemy,
SQLModel or asyncio.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_core_loads_no_transport_database_or_event_loop() -> None:
    code = (
        "import sys, broker.core; "
        "print(sorted(m for m in ('grpc', 'sqlalchemy', 'sqlmodel', 'asyncio') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
