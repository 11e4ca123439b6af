"""The store against a PostgreSQL address nothing listens on: DATABASE_UNAVAILABLE."""

from __future__ import annotations

import socket

import pytest

from broker.errors import DatabaseUnavailable
from broker.store import Store


def test_an_unreachable_postgresql_is_database_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    store = Store(f"postgresql+psycopg://rigshift@127.0.0.1:{port}/rigshift", create=False)
    with pytest.raises(DatabaseUnavailable) as err:
        store.check_writable()
    assert err.value.reason == "DATABASE_UNAVAILABLE"
    assert "cannot be reached" in err.value.message
    with pytest.raises(DatabaseUnavailable):
        store.get_farm("f")
    store.close()
