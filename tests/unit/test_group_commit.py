"""Group commit in ``BrokerService.apply`` and the renewal path (issue 17), on a real SQLite
store behind a counting wrapper: calls made in one turn of the event loop are handled in
arrival order and saved in one transaction, each answered only after it committed; a
failed transaction fails every change in it (heartbeats are answered from memory);
renewals that change nothing stored write nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from broker.core import BrokerCore
from broker.errors import DatabaseUnavailable, NotFound
from broker.events import Heartbeat, JobSubmitted, Tick, WorkerRegistered
from broker.model import GpuInfo, JobSpec, WorkerState
from broker.service import BrokerService
from broker.store import FarmRow, Store
from harness.broker_fixtures import healthy

T0 = 1_000_000.0


class CountingStore:
    """A real Store that counts transactions and what each wrote; fails while ``down``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.saves: list[frozenset[str]] = []
        self.down: Exception | None = None
        self.answered_before_commit: list[str] = []

    def save(self, core: Any, writes: Any) -> None:
        if self.down is not None:
            raise self.down
        self.store.save(core, writes)
        self.saves.append(writes.job_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Store(f"sqlite:///{tmp_path / 'b.db'}")
    s.create_farm(FarmRow(id="f", display_name="farm", enrollment_token_sha256="x"))
    yield s
    s.close()


async def _service(store: Store) -> tuple[BrokerService, CountingStore]:
    counting = CountingStore(store)
    svc = BrokerService(BrokerCore(lease_ttl_s=10.0), counting, clock=lambda: T0)  # type: ignore[arg-type]
    gpus = (GpuInfo(0, "GPU-0", "RTX 3090", 24576, measurement=healthy()),)
    await svc.apply(WorkerRegistered(T0, "w", "f", "rig", "1", gpus))
    counting.saves.clear()
    return svc, counting


def _submit(i: int) -> JobSubmitted:
    return JobSubmitted(T0, f"j{i}", "alice", JobSpec(command=("x",)), f"r{i}")


def test_calls_of_one_loop_turn_share_one_transaction_in_arrival_order(store: Store):
    async def main() -> None:
        svc, counting = await _service(store)
        order: list[str] = []

        async def call(i: int) -> None:
            await svc.apply(_submit(i))
            # answered only once the transaction holding its job committed
            assert any(f"j{i}" in saved for saved in counting.saves)
            order.append(f"j{i}")

        await asyncio.gather(*(call(i) for i in range(20)))
        assert len(counting.saves) == 1  # twenty calls, one transaction
        assert counting.saves[0] == frozenset(f"j{i}" for i in range(20))
        assert list(svc.core.jobs) == [f"j{i}" for i in range(20)]  # handled in arrival order
        assert sorted(order) == sorted(f"j{i}" for i in range(20))

    asyncio.run(main())


def test_an_error_in_one_call_leaves_the_others_of_its_batch_alone(store: Store):
    async def main() -> None:
        svc, counting = await _service(store)
        results = await asyncio.gather(
            svc.apply(_submit(1)),
            svc.apply(Heartbeat(T0, "nobody")),  # the core refuses it: NotFound
            svc.apply(_submit(2)),
            return_exceptions=True,
        )
        assert isinstance(results[1], NotFound)
        assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
        assert counting.saves == [frozenset({"j1", "j2"})]

    asyncio.run(main())


def test_a_failed_transaction_fails_its_changes_and_answers_heartbeats_from_memory(
    store: Store,
):
    async def main() -> None:
        svc, counting = await _service(store)
        counting.down = DatabaseUnavailable("gone")
        results = await asyncio.gather(
            svc.apply(_submit(1)),
            svc.apply(Heartbeat(T0 + 1, "w")),
            return_exceptions=True,
        )
        assert isinstance(results[0], DatabaseUnavailable)
        assert "kept and written" in results[0].message
        assert results[1] == []  # the heartbeat: answered, from memory
        assert svc.core.workers["w"].lease_expires_at == T0 + 1 + 10.0
        assert svc.database_down_for() is not None
        with pytest.raises(DatabaseUnavailable):  # later changes: refused before the core
            await svc.apply(_submit(2))
        assert "j2" not in svc.core.jobs

    asyncio.run(main())


def test_a_renewal_that_changes_nothing_stored_writes_nothing_and_answers_at_once(
    store: Store,
):
    async def main() -> None:
        svc, counting = await _service(store)
        answers: list[BaseException | None] = []
        svc.renew("w", None, answers.append)
        assert answers == [None]  # synchronously: no queue, no future, no write
        assert counting.saves == []
        # Status changed: stored (the locality score reads it), answered after the commit.
        svc.renew("w", ("ab" * 32,), answers.append)
        assert answers == [None]
        await asyncio.sleep(0)  # one turn of the loop: the flush
        assert answers == [None, None] and counting.saves == [frozenset()]
        svc.renew("nobody", None, answers.append)
        assert isinstance(answers[-1], NotFound)

    asyncio.run(main())


def test_a_renewal_queued_behind_other_calls_keeps_arrival_order(store: Store):
    async def main() -> None:
        svc, _ = await _service(store)
        answers: list[BaseException | None] = []
        expiry = asyncio.ensure_future(svc.apply(Tick(T0 + 20)))  # past the lease: OFFLINE
        await asyncio.sleep(0)  # the Tick is queued, not yet handled
        svc.renew("w", None, answers.append)
        assert answers == []  # waits its turn behind the Tick
        await expiry
        assert answers == [None]
        # The Tick expired the lease; the renewal after it brought the worker back.
        assert svc.core.workers["w"].state == WorkerState.ONLINE

    asyncio.run(main())
