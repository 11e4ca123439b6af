"""A real broker (real gRPC on 127.0.0.1:0, real SQLite or PostgreSQL) for tests.

Import it as ``from broker_harness import start_broker`` (tests/ is on sys.path).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.server import Broker, BrokerConfig

__all__ = ["ManualClock", "RunningBroker", "start_broker"]


class ManualClock:
    """A broker clock (Unix seconds) that moves only when the test advances it.

    It starts a minute behind the wall clock, so that what a test advances stays in the
    past of a client's own "now" (``--since 0s`` sees nothing the broker stamped).
    Leases expire only when it is advanced past their deadline (on the broker's next tick).
    """

    def __init__(self, start: float | None = None) -> None:
        self.t = time.time() - 60.0 if start is None else start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


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

    def scheduled(self) -> None:
        """Wait for a completed scheduling pass that saw every change made before the call
        (e.g. a job that must still be PENDING after one): instead of sleeping."""
        assert self.broker.service is not None, "the broker is not started"
        self.call(self.broker.service.scheduled())

    def stop(self) -> None:
        """Stop the broker and its loop; safe to call twice (a test may stop it early)."""
        if not self.thread.is_alive():
            return
        self.call(self.broker.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


_ADMIN_KEYS: dict[Path, str] = {}  # broker home -> the admin key its first start created


def _remember_admin_key(home: Path, address: str, created: str) -> None:
    """A restarted broker listens on a new port, and the key its first start saved is filed
    under the old address; file it under the new one too. Otherwise the lookup by address
    finds the default key, or the key of an earlier test's broker that had this port."""
    from rigshift.credentials import save_api_key

    home = home.resolve()
    if created:
        _ADMIN_KEYS[home] = created
    elif home in _ADMIN_KEYS:
        save_api_key(address, _ADMIN_KEYS[home], make_default=False)


def start_broker(home: Path, clock: ManualClock | None = None, **overrides: Any) -> RunningBroker:
    """Start a real broker on a free port with a SQLite DB under ``home``.

    With ``clock`` the broker stamps every event with it from the first request on (billing
    tests advance it instead of sleeping); without, the broker's own clock.
    """
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
    _remember_admin_key(home, running.address, broker.admin_key)
    if clock is not None:
        assert broker.service is not None
        broker.service.clock = clock
    return running
