"""A real broker (real gRPC on 127.0.0.1:0, real SQLite or PostgreSQL) for tests.

Import it as ``from broker_harness import start_broker`` (tests/ is on sys.path).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

from broker.server import Broker, BrokerConfig

__all__ = ["RunningBroker", "start_broker"]


@dataclass
class RunningBroker:
    """A broker serving from a background thread with its own event loop."""

    broker: Broker
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def address(self) -> str:
        return self.broker.address

    @property
    def admin_key(self) -> str:
        """The admin key the broker wrote to $RIGSHIFT_HOME/credentials."""
        from rigshift.credentials import lookup_api_key

        return self.broker.admin_key or lookup_api_key(self.address)

    def call(self, coro):  # type: ignore[no-untyped-def]
        """Run a coroutine on the broker's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        """Stop the broker and its loop; safe to call twice (a test may stop it early)."""
        if not self.thread.is_alive():
            return
        self.call(self.broker.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def start_broker(home: Path, **overrides) -> RunningBroker:  # type: ignore[no-untyped-def]
    """Start a real broker on a free port with a SQLite DB under ``home``."""
    overrides.setdefault("listen", "127.0.0.1:0")
    config = BrokerConfig(home=str(home), **overrides)
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
