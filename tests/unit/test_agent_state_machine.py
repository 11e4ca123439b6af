"""The agent's decisions (``worker_agent/state_machine.py``): events in, the exact
instructions out. Pure: no broker, no process, no clock (times are on the events).

The lease of every test: TTL 10 s, grace 5 s, stop lead 2 s, renewed at 0, so the
attempts must stop at 8 (10 - 2) while the broker is silent, and at 15 (10 + 5) while
it refuses connections.
"""

from __future__ import annotations

from harness.agent_fixtures import make_assignment
from worker_agent.lease import Lease
from worker_agent.state_machine import (
    HANDED_BACK,
    LEASE_LOST,
    NOT_RECONCILED,
    AgentState,
    AskBrokerToDrain,
    Assigned,
    AttemptEnded,
    AttemptStarted,
    Cancelled,
    DrainGraceOver,
    DrainRequested,
    DropAttempt,
    FinishedReported,
    HeartbeatAnswered,
    HeartbeatFailed,
    LeaseCheck,
    MinersStopped,
    Reconcile,
    RefuseAttempt,
    Registered,
    ResetStream,
    RigUnhealthy,
    Stale,
    StartAttempt,
    StopAttempt,
    StopMiners,
    WriteFence,
)

NO_MINERS: frozenset[int] = frozenset()


def state() -> AgentState:
    return AgentState(Lease(ttl_s=10.0, grace_s=5.0, stop_lead_s=2.0, renewed_at=0.0))


def running(s: AgentState, *jobs: str, gpu: int = 0) -> list[tuple[str, int]]:
    """Start one attempt per job (on GPUs gpu, gpu+1, ...); their keys."""
    keys = []
    for i, job in enumerate(jobs):
        a = make_assignment(job, gpus=[gpu + i])
        assert s.handle(Assigned(a, NO_MINERS, 1.0)) == [StartAttempt(a)]
        keys.append((job, 1))
    return keys


# --- assignments ------------------------------------------------------------------------


def test_an_assignment_starts_an_attempt_that_holds_its_gpus_until_it_ends() -> None:
    s = state()
    a = make_assignment("jobs/a", gpus=[0, 2])
    assert s.handle(Assigned(a, NO_MINERS, 1.0)) == [StartAttempt(a)]
    assert s.busy_gpus() == {0, 2} and s.busy_gpus(started=True) == set()
    assert s.handle(AttemptStarted(("jobs/a", 1))) == []
    assert s.busy_gpus(started=True) == {0, 2}
    assert s.handle(Assigned(a, NO_MINERS, 2.0)) == []  # already here: once
    assert s.handle(AttemptEnded(("jobs/a", 1))) == []
    assert s.busy_gpus() == set() and s.running == {}


def test_an_assignment_on_a_mining_gpu_waits_for_the_miner_then_starts() -> None:
    s = state()
    a = make_assignment("jobs/a", gpus=[1])
    assert s.handle(Assigned(a, frozenset({1, 3}), 1.0)) == [StopMiners(a)]
    assert s.busy_gpus() == {1}  # no miner starts there again meanwhile
    assert s.handle(Assigned(a, frozenset({1}), 1.5)) == []  # already waiting
    assert s.handle(MinersStopped(("jobs/a", 1))) == [StartAttempt(a)]
    assert s.busy_gpus() == {1} and list(s.running) == [("jobs/a", 1)]


def test_a_miner_on_other_gpus_does_not_hold_an_assignment_back() -> None:
    s = state()
    a = make_assignment("jobs/a", gpus=[0])
    assert s.handle(Assigned(a, frozenset({1}), 1.0)) == [StartAttempt(a)]


def test_a_failed_miner_stop_drops_the_waiting_assignment_without_a_word() -> None:
    s = state()
    a = make_assignment("jobs/a", gpus=[1])
    s.handle(Assigned(a, frozenset({1}), 1.0))
    assert s.handle(MinersStopped(("jobs/a", 1), ok=False)) == []
    assert s.busy_gpus() == set() and s.waiting == {}


def test_an_attempt_whose_finish_the_broker_has_never_starts_again() -> None:
    s = state()
    a = make_assignment("jobs/a")
    assert s.handle(FinishedReported((("jobs/a", 1),))) == []
    assert s.handle(Assigned(a, NO_MINERS, 1.0)) == []
    assert s.handle(Reconcile((a,), NO_MINERS, 1.0)) == []


def test_only_the_newest_10000_finished_attempts_are_remembered() -> None:
    s = state()
    s.handle(FinishedReported(tuple((f"jobs/{i}", 1) for i in range(10_001))))
    oldest, newest = make_assignment("jobs/0"), make_assignment("jobs/10000")
    assert s.handle(Assigned(oldest, NO_MINERS, 1.0)) == [StartAttempt(oldest)]
    assert s.handle(Assigned(newest, NO_MINERS, 1.0)) == []


# --- cancellation and stale attempts ----------------------------------------------------


def test_a_cancellation_stops_a_running_attempt_once_with_a_report() -> None:
    s = state()
    [key] = running(s, "jobs/a")
    assert s.handle(Cancelled(key, "user asked")) == [
        StopAttempt(key, "cancelled: user asked", report=True)
    ]
    assert s.handle(Cancelled(key, "again")) == []  # already stopping
    assert s.busy_gpus() == {0}  # held until it has ended


def test_a_cancellation_of_an_unknown_attempt_does_nothing() -> None:
    s = state()
    running(s, "jobs/a")
    assert s.handle(Cancelled(("jobs/nope", 1), "user asked")) == []
    assert s.handle(Cancelled(("jobs/a", 2), "user asked")) == []


def test_a_cancellation_while_the_miners_stop_drops_the_assignment_once_they_are_gone() -> None:
    s = state()
    a = make_assignment("jobs/a", gpus=[0])
    s.handle(Assigned(a, frozenset({0}), 1.0))
    assert s.handle(Cancelled(("jobs/a", 1), "preempted")) == []
    assert s.handle(MinersStopped(("jobs/a", 1))) == [
        DropAttempt(("jobs/a", 1), "cancelled: preempted")
    ]
    assert s.busy_gpus() == set()


def test_a_stale_attempt_is_stopped_with_a_report() -> None:
    s = state()
    [key] = running(s, "jobs/a")
    assert s.handle(Stale(key, "requeued")) == [StopAttempt(key, "stale: requeued", report=True)]
    assert s.handle(Stale(("jobs/other", 1), "requeued")) == []


# --- reconcile --------------------------------------------------------------------------


def test_reconcile_stops_what_is_not_listed_and_starts_what_is_missing() -> None:
    s = state()
    unknown, kept = running(s, "jobs/unknown", "jobs/kept")
    missing = make_assignment("jobs/missing", gpus=[5])
    listed = (make_assignment("jobs/kept", gpus=[1]), missing)
    assert s.handle(Reconcile(listed, NO_MINERS, 2.0)) == [
        StopAttempt(unknown, NOT_RECONCILED, report=True),
        StartAttempt(missing),
    ]
    assert list(s.running) == [unknown, kept, ("jobs/missing", 1)]  # unknown: until it ends


def test_reconcile_with_a_duplicate_attempt_starts_it_once_as_last_listed() -> None:
    s = state()
    first = make_assignment("jobs/d", gpus=[0])
    second = make_assignment("jobs/d", gpus=[1])
    assert s.handle(Reconcile((first, second), NO_MINERS, 1.0)) == [StartAttempt(second)]


def test_reconcile_does_not_stop_an_attempt_twice() -> None:
    s = state()
    [key] = running(s, "jobs/a")
    s.handle(Cancelled(key, "user asked"))
    assert s.handle(Reconcile((), NO_MINERS, 2.0)) == []


def test_reconcile_drops_an_unlisted_assignment_waiting_for_miners() -> None:
    s = state()
    a = make_assignment("jobs/w", gpus=[2])
    assert s.handle(Assigned(a, frozenset({2}), 1.0)) == [StopMiners(a)]
    assert s.handle(Reconcile((), frozenset({2}), 1.5)) == []
    assert s.handle(MinersStopped(("jobs/w", 1))) == [DropAttempt(("jobs/w", 1), NOT_RECONCILED)]


def test_reconcile_of_an_empty_rig_with_nothing_listed_does_nothing() -> None:
    assert state().handle(Reconcile((), NO_MINERS, 1.0)) == []


# --- the lease --------------------------------------------------------------------------


def test_registration_starts_the_lease_and_writes_the_fence() -> None:
    s = state()
    assert s.handle(Registered(sent_at=5.0, lease_ttl_s=20.0)) == [WriteFence()]
    assert s.lease.ttl_s == 20.0 and s.lease.renewed_at == 5.0


def test_a_lost_lease_stops_every_attempt_once_without_a_report() -> None:
    s = state()
    a, b, c = running(s, "jobs/a", "jobs/b", "jobs/c")
    s.handle(Cancelled(b, "user asked"))
    assert s.handle(LeaseCheck(7.9)) == []
    assert s.handle(LeaseCheck(8.0)) == [
        StopAttempt(a, LEASE_LOST, report=False),
        StopAttempt(c, LEASE_LOST, report=False),
    ]
    assert s.handle(LeaseCheck(8.5)) == []


def test_an_assignment_while_the_lease_is_lost_is_not_started_and_asks_again() -> None:
    s = state()
    a = make_assignment("jobs/late")
    assert s.handle(Assigned(a, NO_MINERS, 8.0)) == []
    assert s.running == {} and s.resync
    assert s.handle(HeartbeatAnswered(9.0)) == [
        WriteFence(),
        ResetStream("the lease is renewed: reconcile"),
    ]


def test_after_a_lost_lease_the_stream_resets_once_the_stopped_attempts_are_gone() -> None:
    s = state()
    [key] = running(s, "jobs/a")
    s.handle(LeaseCheck(8.0))
    assert s.handle(HeartbeatAnswered(9.0)) == [WriteFence()]  # still stopping
    s.handle(AttemptEnded(key))
    assert s.handle(HeartbeatAnswered(10.0)) == [
        WriteFence(),
        ResetStream("the lease is renewed: reconcile"),
    ]
    assert s.handle(HeartbeatAnswered(11.0)) == [WriteFence()]


def test_the_first_heartbeat_failure_resets_the_stream() -> None:
    s = state()
    assert s.handle(HeartbeatFailed(1.0, "UNAVAILABLE")) == [ResetStream("heartbeat UNAVAILABLE")]
    assert s.handle(HeartbeatFailed(2.0, "DEADLINE_EXCEEDED")) == []
    assert s.handle(HeartbeatAnswered(2.5)) == [WriteFence()]
    assert s.handle(HeartbeatFailed(3.0, "UNAVAILABLE")) == [ResetStream("heartbeat UNAVAILABLE")]


def test_a_refusing_broker_moves_the_fence_by_the_grace() -> None:
    s = state()
    [key] = running(s, "jobs/a")
    assert s.handle(HeartbeatFailed(1.0, "UNAVAILABLE", refused=True)) == [
        WriteFence(),
        ResetStream("heartbeat UNAVAILABLE"),
    ]
    assert s.handle(HeartbeatFailed(2.0, "UNAVAILABLE", refused=True)) == []
    assert s.handle(LeaseCheck(14.9)) == []  # 10 + 5: nobody can expire the lease
    assert s.handle(HeartbeatFailed(3.0, "DEADLINE_EXCEEDED")) == [WriteFence()]  # silent again
    assert s.handle(LeaseCheck(8.0)) == [StopAttempt(key, LEASE_LOST, report=False)]


# --- unhealthy rig ----------------------------------------------------------------------


def test_an_unhealthy_rig_asks_for_a_drain_until_taken_and_refuses_new_work() -> None:
    s = state()
    [key] = running(s, "jobs/a")
    assert s.handle(RigUnhealthy("disk full")) == [AskBrokerToDrain("disk full", until_taken=True)]
    assert s.handle(RigUnhealthy("disk full again")) == []
    b = make_assignment("jobs/b", gpus=[1])
    refused = [RefuseAttempt(("jobs/b", 1), "rig unhealthy, takes no work: disk full")]
    assert s.handle(Assigned(b, NO_MINERS, 2.0)) == refused
    assert s.handle(Assigned(b, NO_MINERS, 2.5)) == refused  # not held: said again
    assert list(s.running) == [key]  # what runs goes on


def test_an_unhealthy_rig_still_stops_the_miners_first() -> None:
    s = state()
    s.handle(RigUnhealthy("disk full"))
    a = make_assignment("jobs/a", gpus=[0])
    assert s.handle(Assigned(a, frozenset({0}), 1.0)) == [StopMiners(a)]
    assert s.handle(MinersStopped(("jobs/a", 1))) == [
        RefuseAttempt(("jobs/a", 1), "rig unhealthy, takes no work: disk full")
    ]


# --- drain ------------------------------------------------------------------------------


def test_drain_without_running_work() -> None:
    s = state()
    assert s.handle(DrainRequested()) == [AskBrokerToDrain()]
    assert s.handle(DrainRequested()) == []
    assert s.handle(DrainGraceOver()) == []
    late = make_assignment("jobs/late")
    assert s.handle(Assigned(late, NO_MINERS, 1.0)) == []  # accepts nothing new
    assert s.handle(Assigned(late, frozenset({0}), 1.0)) == []  # nor stops miners for it


def test_drain_with_running_work_hands_back_what_outlives_the_grace() -> None:
    s = state()
    a, b, c = running(s, "jobs/a", "jobs/b", "jobs/c")
    s.handle(Cancelled(b, "user asked"))
    assert s.handle(DrainRequested()) == [AskBrokerToDrain()]
    s.handle(AttemptEnded(c))  # finished within the grace
    assert s.handle(DrainGraceOver()) == [StopAttempt(a, HANDED_BACK, report=False)]


def test_an_assignment_waiting_for_miners_when_the_drain_starts_is_not_started() -> None:
    s = state()
    w = make_assignment("jobs/w", gpus=[0])
    s.handle(Assigned(w, frozenset({0}), 1.0))
    s.handle(DrainRequested())
    assert s.handle(MinersStopped(("jobs/w", 1))) == []
    assert s.busy_gpus() == set()


def test_the_state_machine_imports_no_io() -> None:
    """Pure: it and what it imports from the agent use no event loop, transport, clock,
    process or file (read from their import statements)."""
    import ast
    import inspect
    from types import ModuleType

    import rigshift.scoring
    import worker_agent.events
    import worker_agent.lease
    import worker_agent.outbox
    import worker_agent.quarantine
    import worker_agent.state_machine

    def imports(module: ModuleType) -> set[str]:
        tree = ast.parse(inspect.getsource(module))
        names: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        return names

    seen = set().union(
        *(
            imports(m)
            for m in (
                worker_agent.state_machine,
                worker_agent.events,
                worker_agent.quarantine,
                rigshift.scoring,
                worker_agent.lease,
                worker_agent.outbox,
            )
        )
    )
    assert seen <= {
        "__future__",
        "collections",
        "collections.abc",
        "dataclasses",
        "enum",
        "logging",
        "math",
        "types",
        "typing",
        "google.protobuf.timestamp_pb2",
        "rigshift.catalogue",
        "rigshift.scoring",
        "rigshift.v1",
        "worker_agent.events",
        "worker_agent.lease",
        "worker_agent.outbox",
        "worker_agent.quarantine",
    }, seen
