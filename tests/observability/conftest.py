"""Fixtures of the observability tests: the Prometheus binaries (see prom_helpers.binary)."""

from __future__ import annotations

import pytest
from prom_helpers import binary


@pytest.fixture(scope="session")
def promtool() -> str:
    return binary("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return binary("prometheus")
