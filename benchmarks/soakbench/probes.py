"""What the soak reads from outside the broker process.

The broker's own count of finished jobs comes from its Prometheus endpoint
(``rigshift_jobs_completed``), so the soak needs no help from the load generator to know
how many lifecycles ended; the database size is the SQLite file (with its WAL) or
``pg_database_size``.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["completed_jobs", "database_bytes", "free_port", "wait_serving"]

_COMPLETED = re.compile(r"^rigshift_jobs_completed_total\{[^}]*\}\s+([0-9.eE+]+)$", re.M)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``--metrics-listen``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def completed_jobs(metrics_url: str, timeout_s: float = 10.0) -> int:
    """Jobs the broker saw reach a final state (any state, any tier) since it started."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
        text = resp.read().decode()
    return int(sum(float(v) for v in _COMPLETED.findall(text)))


def database_bytes(sqlite_path: Path | None, database_url: str) -> int:
    """Bytes the database takes: SQLite file + WAL + shared memory, or pg_database_size."""
    if sqlite_path is not None:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = sqlite_path.with_name(sqlite_path.name + suffix)
            if p.exists():
                total += p.stat().st_size
        return total
    import psycopg  # a dependency of the broker

    url = re.sub(r"^postgresql\+\w+://", "postgresql://", database_url)
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def wait_serving(address: str, timeout_s: float = 120.0) -> None:
    """Return once the broker's health check answers SERVING; raise after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=5.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"broker at {address} not SERVING after {timeout_s:.0f} s")
            time.sleep(0.02)
