"""Shared fixtures: a real broker (real gRPC on 127.0.0.1:0, real SQLite) for integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_harness import ManualClock, RunningBroker, start_broker


@pytest.fixture(scope="session", autouse=True)
def rigshift_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep brokers' admin keys (written to $RIGSHIFT_HOME/credentials) out of the real home."""
    import os

    home = tmp_path_factory.mktemp("rigshift-home")
    old = os.environ.get("RIGSHIFT_HOME")
    os.environ["RIGSHIFT_HOME"] = str(home)
    os.environ.pop("RIGSHIFT_API_KEY", None)
    yield home
    if old is None:
        os.environ.pop("RIGSHIFT_HOME", None)
    else:
        os.environ["RIGSHIFT_HOME"] = old


@pytest.fixture
def running_broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A fresh broker per test (short lease so expiry tests run fast)."""
    rb = start_broker(tmp_path / "broker", lease_ttl_s=3.0, heartbeat_interval_s=0.5)
    yield rb
    rb.stop()


@pytest.fixture
def broker_clock(running_broker: RunningBroker) -> ManualClock:
    """The clock of ``running_broker``, from now on one that moves only when the test
    advances it (billing: exact GPU-milliseconds instead of a sleep)."""
    clock = ManualClock()
    assert running_broker.broker.service is not None
    running_broker.broker.service.clock = clock
    return clock


@pytest.fixture
def broker_address(running_broker: RunningBroker) -> str:
    """host:port of a fresh real broker."""
    return running_broker.address


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (Debian's postgresql) on a free loopback port.

    It runs as the `postgres` user (initdb refuses root). `.ci/run` installs the
    package; on a developer machine without it the PostgreSQL tests are skipped,
    in CI (CI set) they fail instead.
    """
    import glob
    import os
    import shutil
    import subprocess

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (`.ci/run` installs it)")
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql)")
    bindir = Path(bins[-1]).parent
    import tempfile

    # Not under pytest's tmp dir: its parents are 0700 root and postgres must get in.
    root = Path(tempfile.mkdtemp(prefix="rigshift-pg-"))
    data = root / "data"
    shutil.chown(root, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(
        [
            *as_pg,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "rigshift",
            "--auth=trust",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *as_pg,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(root / "log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [
                str(bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "rigshift",
                "rigshift",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg://rigshift@127.0.0.1:{port}/rigshift"
    finally:
        subprocess.run(
            [*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """A new, empty database in the shared cluster, dropped afterwards."""
    import uuid

    import sqlalchemy

    name = "t_" + uuid.uuid4().hex[:12]
    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield postgres_url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()
