"""Earnings read from the store (``Store.settled``: settled attempts streamed, payouts summed
in SQL) equal earnings read from a pure core (``CoreSettled``) for the same history: every
grouping, period and farm, the energy saved under power caps and the curtailment lines
included. And the broker's core (``keep_ledger=False``) keeps no ledger while the SQL
verify-ledger finds it whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from history_cases import T0, figures, history, jobs, stored, troubles
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from broker.core import BrokerCore
from broker.earnings import earnings
from broker.events import (
    Persist,
    PostLedger,
)
from broker.invariants import validate_state
from broker.ledger import charges_of, ledger_problems, verify_ledger
from broker.metrics_tally import Tally
from broker.model import Tier
from broker.store import Store


@pytest.fixture
def db(tmp_path_factory: pytest.TempPathFactory):
    """store_of(core, cmds): one SQLite file for all examples, emptied for each."""
    path = tmp_path_factory.mktemp("earnings") / "broker.db"

    def store_of(core: BrokerCore, cmds: list) -> Store:
        return stored(core, cmds, f"sqlite:///{path}", create=not path.exists())

    return store_of


# Each example writes a database: few examples, and no long shrinking.
SLOW = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


@settings(SLOW, max_examples=25)
@given(plan=jobs, data=st.data())
def test_earnings_from_the_store_equal_earnings_from_the_core(db, plan, data):
    core = BrokerCore(lease_ttl_s=1e9)
    end, cmds = history(core, plan)
    validate_state(core)
    store = db(core, cmds)
    try:
        settled = sum(a.settled for j in core.jobs.values() for a in j.attempts)
        assert settled > 0 or not any(j.attempts for j in core.jobs.values())
        ends = sorted(a.end_time for j in core.jobs.values() for a in j.attempts if a.end_time)
        since = data.draw(st.sampled_from([0.0, T0, *ends]))
        now = data.draw(st.sampled_from([float("inf"), end + 5_000, end]))
        for group_by in ("farm", "worker", "gpu"):
            for farm_id in ("", "fa", "fb"):
                kw = dict(farm_id=farm_id, since=since, group_by=group_by, now=now)
                assert earnings(core, source=store, **kw) == earnings(core, **kw)
    finally:
        store.close()


def test_a_core_without_a_ledger_settles_the_same_and_the_store_verifies_it(tmp_path: Path):
    plan = [(2, Tier.GUARANTEED, 3600.0, 2_000_000, 0), (1, Tier.SPOT, 60.0, 10_000, 1)]
    kept = BrokerCore(lease_ttl_s=1e9)
    _, _kept_cmds = history(kept, plan)
    lean = BrokerCore(lease_ttl_s=1e9, keep_ledger=False)
    _, cmds = history(lean, plan)
    posted = [e for c in cmds if isinstance(c, PostLedger) for e in c.entries]
    assert posted == kept.ledger and len(posted) == 6  # the same legs are emitted ...
    assert lean.ledger == []  # ... and none kept
    validate_state(lean)  # (its ledger part is the store's to check)
    store = stored(lean, cmds, f"sqlite:///{tmp_path / 'broker.db'}", create=True)
    try:
        problems, summary = verify_ledger(store)
        assert problems == ledger_problems(kept.ledger, charges_of(kept.jobs.values())) == []
        assert summary["entries"] == 6 and summary["settled_attempts"] == 2
        assert earnings(lean, source=store) == earnings(kept)
        by_gpu = earnings(lean, source=store, group_by="gpu")
        assert by_gpu == earnings(kept, group_by="gpu")
        assert any(r.energy_saved_joules for r in by_gpu)  # w2's capped attempt
        assert any(r.curtailed.demand_response_micros for r in by_gpu)  # fa's window
        assert sum(r.revenue_micros for r in by_gpu) > 0
        assert store.balances(["broker:fees"])["broker:fees"] > 0
    finally:
        store.close()


# --- the metrics' running totals ------------------------------------------------------------


@settings(SLOW, max_examples=15)
@given(plan=jobs)
def test_metrics_start_from_the_stores_totals_as_from_the_core(db, plan):
    core = BrokerCore(lease_ttl_s=1e9)
    end, cmds = history(core, plan)
    cmds += troubles(core, end + 1)
    store = db(core, cmds)
    try:
        pure = Tally(core)  # what the core holds
        restored = Tally(core, store.history_totals())  # a restarted broker's start
        assert figures(restored) == figures(pure)
        resumed = Tally(core, figures=restored.figures())  # after a clean stop's snapshot
        assert figures(resumed) == figures(pure)
        assert resumed.figures() == pure.figures()
        assert pure.sla.get("curtailed") and pure.sla.get("lost_work")
        assert pure.curtailed and pure.finished and pure.ledger_sum == 0
    finally:
        store.close()


def test_a_tally_follows_the_commands_and_counts_each_change_once(tmp_path: Path):
    core = BrokerCore(lease_ttl_s=1e9, keep_ledger=False)
    tally = Tally(core)
    end, cmds = history(core, [(2, Tier.GUARANTEED, 3600.0, 2_000_000, 0)])
    tally.observe(cmds)
    more = troubles(core, end + 1)
    tally.observe(more)
    again = [c for c in more if isinstance(c, Persist)]
    assert again
    tally.observe(again)  # the same jobs named again: nothing new in them
    kept = BrokerCore(lease_ttl_s=1e9)
    end2, _ = history(kept, [(2, Tier.GUARANTEED, 3600.0, 2_000_000, 0)])
    troubles(kept, end2 + 1)
    assert figures(tally)[:6] == figures(Tally(kept))[:6]
    posted = [e for c in cmds + more if isinstance(c, PostLedger) for e in c.entries]
    assert tally.payouts == Tally(kept).payouts != {}
    assert tally.ledger_sum == sum(e.amount_micros for e in posted) == 0
