"""Shared fixtures: a real broker (real gRPC on 127.0.0.1:0, real SQLite) for integration tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.server import Broker, BrokerConfig


@dataclass
class RunningBroker:
    """A broker serving from a background thread with its own event loop."""

    broker: Broker
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def address(self) -> str:
        return self.broker.address

    def call(self, coro):  # type: ignore[no-untyped-def]
        """Run a coroutine on the broker's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        self.call(self.broker.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def start_broker(home: Path, **overrides) -> RunningBroker:  # type: ignore[no-untyped-def]
    """Start a real broker on a free port with a SQLite DB under ``home``."""
    config = BrokerConfig(listen="127.0.0.1:0", home=str(home), **overrides)
    broker = Broker(config)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name="broker", daemon=True)
    thread.start()
    ready.wait(10)
    running = RunningBroker(broker, loop, thread)
    running.call(broker.start())
    return running


@pytest.fixture
def running_broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A fresh broker per test (short lease so expiry tests run fast)."""
    rb = start_broker(tmp_path / "broker", lease_ttl_s=3.0, heartbeat_interval_s=0.5)
    yield rb
    rb.stop()


@pytest.fixture
def broker_address(running_broker: RunningBroker) -> str:
    """host:port of a fresh real broker."""
    return running_broker.address
