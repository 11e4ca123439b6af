"""Hypothesis drives random event sequences into the core; the invariants hold after every step."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.core import BrokerCore
from broker.economics import FarmTerms
from broker.errors import FailedPrecondition
from broker.events import (
    Assign,
    AttemptCheckpointed,
    AttemptFinished,
    AttemptLog,
    AttemptStarted,
    CancelRequested,
    DrainRequested,
    FarmConfigured,
    GpuHealth,
    GpuHealthReported,
    Heartbeat,
    JobSubmitted,
    SchedulePass,
    Tick,
    WorkerRegistered,
)
from broker.invariants import validate_state
from broker.model import TERMINAL_JOB_STATES, GpuInfo, JobSpec, JobState, Tier
from harness.broker_fixtures import healthy

MODELS = ("RTX 3060", "RTX 3090")
TTL = 10.0


class CoreMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.core = BrokerCore(lease_ttl_s=TTL, start_deadline_s=5.0)
        self.now = 0.0
        self.n_jobs = 0
        self.assigned: list[tuple[str, str, int]] = []  # (worker, job, attempt) ever assigned
        self.seq: dict[tuple[str, int], int] = {}
        self.terminal: dict[str, JobState] = {}

    def _apply(self, event):
        cmds = self.core.handle(event)
        for c in cmds:
            if isinstance(c, Assign):
                self.assigned.append((c.worker_id, c.job_id, c.attempt))
        return cmds

    @rule(dt=st.floats(0.0, 6.0))
    def advance(self, dt: float) -> None:
        self.now += dt
        self._apply(Tick(self.now))

    @rule(
        n=st.integers(1, 4),
        model=st.sampled_from(MODELS),
        worker=st.sampled_from(["w1", "w2", "w3"]),
        runtime=st.sampled_from(["", "podman"]),
    )
    def register(self, n: int, model: str, worker: str, runtime: str) -> None:
        infos = tuple(
            GpuInfo(i, f"u{i}", model, 12288, 200, 100_000 + i, measurement=healthy(model))
            for i in range(n)
        )
        version = "4.3.1" if runtime else ""
        self._apply(
            WorkerRegistered(self.now, worker, "f", worker, "1", infos, "", runtime, version)
        )

    @precondition(lambda self: self.core.workers)
    @rule(data=st.data())
    def heartbeat(self, data) -> None:
        worker = data.draw(st.sampled_from(sorted(self.core.workers)))
        self._apply(Heartbeat(self.now, worker))

    @precondition(lambda self: self.core.workers)
    @rule(data=st.data(), strikes=st.integers(0, 3))
    def gpu_health(self, data, strikes: int) -> None:
        """The agent's whole health report: some GPUs quarantined (their attempts are lost),
        the rest healthy (returned)."""
        worker = data.draw(st.sampled_from(sorted(self.core.workers)))
        indices = sorted(self.core.workers[worker].gpus)
        out = data.draw(st.sets(st.sampled_from(indices)))
        health = tuple(
            GpuHealth(i, quarantined=True, reason="XID 79", reinstate_required=strikes == 3)
            for i in sorted(out)
        )
        self._apply(GpuHealthReported(self.now, worker, health))
        for i in out:
            assert self.core.workers[worker].gpus[i].holder is None

    @precondition(lambda self: self.core.workers)
    @rule(data=st.data())
    def drain(self, data) -> None:
        worker = data.draw(st.sampled_from(sorted(self.core.workers)))
        self._apply(DrainRequested(self.now, worker))

    @rule(fee=st.integers(0, 1000), ask=st.integers(0, 3_000_000))
    def configure_farm(self, fee: int, ask: int) -> None:
        terms = FarmTerms(
            "f", broker_fee_permille=fee, ask_micros_per_gpu_hour=(("RTX 3090", ask),)
        )
        self._apply(FarmConfigured(self.now, terms))

    @rule(
        gpus=st.integers(1, 4),
        model=st.sampled_from(("", *MODELS)),
        attempts=st.integers(1, 3),
        tier=st.sampled_from(Tier),
        image=st.sampled_from(["", "", "ghcr.io/org/train:1.4"]),
    )
    def submit(self, gpus: int, model: str, attempts: int, tier: Tier, image: str) -> None:
        self.n_jobs += 1
        spec = JobSpec(
            command=("x",),
            gpu_count=gpus,
            gpu_model=model,
            max_attempts=attempts,
            tier=tier,
            image=image,
        )
        self._apply(JobSubmitted(self.now, f"j{self.n_jobs}", "c", spec))

    @rule()
    def schedule(self) -> None:
        self._apply(SchedulePass(self.now))

    @precondition(lambda self: self.core.jobs)
    @rule(data=st.data())
    def cancel(self, data) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.core.jobs)))
        try:
            self._apply(CancelRequested(self.now, job_id))
        except FailedPrecondition:
            assert self.core.jobs[job_id].state in (JobState.SUCCEEDED, JobState.FAILED)

    @precondition(lambda self: self.assigned)
    @rule(
        data=st.data(),
        kind=st.sampled_from(["started", "log", "checkpoint", "finished"]),
        exit_code=st.sampled_from([0, 0, 1]),
        replay=st.booleans(),
    )
    def report(self, data, kind: str, exit_code: int, replay: bool) -> None:
        worker, job, attempt = data.draw(st.sampled_from(self.assigned))
        key = (job, attempt)
        if not replay or key not in self.seq:
            self.seq[key] = self.seq.get(key, 0) + 1
        base = (self.now, worker, job, attempt, self.seq[key])
        event = {
            "started": AttemptStarted(*base),
            "log": AttemptLog(*base, data="x"),
            "checkpoint": AttemptCheckpointed(*base, sha256="ab" * 32),
            "finished": AttemptFinished(*base, exit_code=exit_code),
        }[kind]
        before = self.core.jobs[job].state
        dup = self.core.is_duplicate(event)
        cmds = self._apply(event)
        if dup:
            assert cmds == []
            assert self.core.jobs[job].state == before

    @invariant()
    def invariants_hold(self) -> None:
        if hasattr(self, "core"):
            validate_state(self.core)

    @invariant()
    def final_states_are_final(self) -> None:
        if not hasattr(self, "core"):
            return
        for job_id, state in self.terminal.items():
            assert self.core.jobs[job_id].state == state
        for job in self.core.jobs.values():
            if job.state in TERMINAL_JOB_STATES:
                self.terminal[job.job_id] = job.state


CoreMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoreMachine = CoreMachine.TestCase


def test_ledger_of_a_random_run_settles_each_ended_attempt_once():
    """A concrete run (no Hypothesis): preemption, loss and completion all settle once."""
    core = BrokerCore(lease_ttl_s=TTL)
    core.handle(FarmConfigured(0.0, FarmTerms("f", broker_fee_permille=150)))
    core.handle(
        WorkerRegistered(
            0.0,
            "w",
            "f",
            "rig",
            "1",
            (GpuInfo(0, "u", "RTX 3090", 24576, 350, 1_000_000, measurement=healthy()),),
        )
    )
    core.handle(JobSubmitted(0.0, "spot", "c", JobSpec(command=("x",), tier=Tier.SPOT)))
    core.handle(SchedulePass(0.0))
    core.handle(AttemptStarted(1.0, "w", "spot", 1, 1))
    core.handle(Heartbeat(3.0, "w"))
    core.handle(JobSubmitted(3.0, "gold", "c", JobSpec(command=("x",))))
    core.handle(SchedulePass(3.6))  # preempts the spot job after 2.6 s of work
    validate_state(core)
    spot = core.jobs["spot"].attempts[0]
    # 2600 ms x $0.60/h (spot = 60% of $1.00) = 2600 x 600000 / 3.6e6 = 433.3 -> 433
    assert (spot.state, spot.charge_micros) == ("PREEMPTED", 433)
    legs = [e for e in core.ledger if e.txn == "settle:spot:1"]
    # fee 15% of 433 = 64 (rounded down), payout 369
    assert [(e.account, e.amount_micros) for e in legs] == [
        ("client:c", -433),
        ("farm:f", 369),
        ("broker:fees", 64),
    ]
    assert sum(e.amount_micros for e in core.ledger) == 0
