"""Network faults between a real agent and a real broker (issue 12).

The cut-off agent runs in a network namespace of its own (``ip netns exec``); the
broker and any other agent stay in the root namespace. Faults are nftables rules on the
namespace's end of its veth (see conftest.py). Lease TTL 6 s, heartbeat 1 s, as in
tests/e2e; jobs write start and heartbeat markers so their runs can be checked for
overlap. Each test prints what it measured (the figures of docs/reliability.md,
"Faults"); no assertion depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from netfaults import FaultFleet, NetNs, p99

from rigshift.defaults import BROKER_MIN_PING_INTERVAL_S
from rigshift.v1 import farm_pb2, job_pb2
from worker_agent.channel import channel_options
from worker_agent.config import AgentConfig

S = job_pb2.Job.State
A = job_pb2.Attempt.State
FINAL = (S.SUCCEEDED, S.FAILED, S.CANCELLED)
BROKER_RPC = "rigshift_grpc_request_duration_seconds"
AGENT_RPCS = r"^rigshift\.v1\.WorkerService/(Heartbeat|ReportJobEvents)$"
HEARTBEAT_RTT = "rigshift_agent_heartbeat_rtt_seconds"
LOSS_S = 30.0


def _workers(faults: FaultFleet) -> dict[str, str]:
    """hostname -> worker name."""
    return {w.hostname: w.name for w in faults.client().iter_workers()}


def _online(faults: FaultFleet, hostname: str) -> bool:
    return any(
        w.hostname == hostname and w.state == farm_pb2.Worker.ONLINE
        for w in faults.client().iter_workers()
    )


def _ts(t: Any) -> float:
    return float(t.seconds + t.nanos / 1e9)


def _never_drained(faults: FaultFleet, p: Any) -> None:
    assert p.proc.poll() is None, f"{p.name} exited:\n{p.log_tail()}"
    said = faults.log_lines(p, r"shutdown requested|draining|drained|agent task .* ended")
    assert not said, said


@pytest.mark.timeout(120)
def test_a_black_hole_longer_than_the_ttl(netns: NetNs, faults: FaultFleet) -> None:
    """rig-a's link drops everything for 14 s (TTL 6 s). The broker expires its lease on
    time and requeues its job on rig-b; rig-a stops its copy before that (never two live
    copies), stays up, and comes back into the market when the link heals."""
    faults.start_broker(host=netns.host_ip)
    token = faults.client().create_farm("faults").enrollment_token
    rig_a = faults.start_agent("rig-a", token, netns=netns)
    faults.fleet.wait_workers(1)
    job = faults.submit(12.0, max_attempts=3)
    faults.wait([job], lambda j: j.state == S.RUNNING, 60, "the job to run on rig-a")
    rig_b = faults.start_agent("rig-b", token)
    faults.fleet.wait_workers(2)
    time.sleep(1.0)

    cut = time.time()
    netns.blackhole()
    noticed = faults.wait_log(rig_a, r"broker unreachable", cut, 30) - cut
    fenced = faults.wait_log(rig_a, r"before the broker may requeue", cut, 30) - cut
    jobs = faults.wait(
        [job],
        lambda j: len(j.attempts) >= 2 and j.attempts[1].state == A.RUNNING,
        60,
        "the job to run again elsewhere",
    )
    while time.time() < cut + 14.0:
        time.sleep(0.2)
    healed = time.time()
    netns.heal()
    back = faults.wait_log(rig_a, r"broker reachable again", healed, 60) - healed
    while not _online(faults, "rig-a"):
        assert time.time() < healed + 60, "rig-a did not come back online"
        time.sleep(0.2)
    jobs = faults.wait([job], lambda j: j.state in FINAL, 60, "the job to end")

    names = _workers(faults)
    first, second = jobs[job].attempts[0], jobs[job].attempts[1]
    assert jobs[job].state == S.SUCCEEDED, jobs[job]
    assert len(jobs[job].attempts) == 2
    assert (first.worker, first.state) == (names["rig-a"], A.LOST)
    assert (second.worker, second.state) == (names["rig-b"], A.SUCCEEDED)
    assert faults.overlaps() == []
    runs = sorted(faults.runs()[job.split("/")[1]])
    old_end, new_start = runs[0][1], runs[1][0]
    requeued = next(
        _ts(h.time) for h in jobs[job].history if "lease expired" in h.reason
    )  # the broker's Tick that found the lease expired
    keepalive = faults.log_lines(rig_a, r"instruction stream broke \(UNAVAILABLE", cut)
    _never_drained(faults, rig_a)

    # rig-a is back in the market: of two jobs at once, one runs there.
    later = [faults.submit(2.0), faults.submit(2.0)]
    done = faults.wait(later, lambda j: j.state in FINAL, 60, "two jobs after the heal")
    assert all(j.state == S.SUCCEEDED for j in done.values())
    assert {j.attempts[-1].worker for j in done.values()} == {names["rig-a"], names["rig-b"]}
    ok, out = faults.verify_ledger()
    assert ok, out
    _never_drained(faults, rig_a)
    assert rig_b.proc.poll() is None

    print(
        f"\nblack hole 14 s, TTL 6 s, heartbeat 1 s:"
        f"\n  rig-a noticed (log 'broker unreachable')     {noticed:5.2f} s after the cut"
        f"\n  rig-a stopped its copy (log)                  {fenced:5.2f} s"
        f"\n  its job process's last heartbeat              {old_end - cut:5.2f} s"
        f"\n  broker expired the lease, requeued the job   {requeued - cut:5.2f} s"
        f"\n  the copy on rig-b began                       {new_start - cut:5.2f} s"
        f"\n  keepalive closed the half-open connection     "
        + (f"{keepalive[0][0] - cut:5.2f} s" if keepalive else "not within the cut")
        + f"\n  after the heal, heartbeats answered again      {back:5.2f} s"
    )


@pytest.mark.timeout(120)
def test_a_black_hole_shorter_than_the_ttl(netns: NetNs, faults: FaultFleet) -> None:
    """With the default lease (TTL 15 s, heartbeat 3 s) a 5 s black hole costs nothing:
    no requeue, the job's first attempt succeeds, the agent never drains."""
    lease = {"lease_ttl_s": 15, "heartbeat_interval_s": 3}
    faults.start_broker(host=netns.host_ip, **lease)
    token = faults.client().create_farm("faults").enrollment_token
    rig = faults.start_agent("rig-a", token, netns=netns, **lease)
    faults.fleet.wait_workers(1)
    job = faults.submit(14.0, max_attempts=3)
    faults.wait([job], lambda j: j.state == S.RUNNING, 60, "the job to run")
    time.sleep(1.0)

    cut = time.time()
    netns.blackhole()
    time.sleep(5.0)
    healed = time.time()
    netns.heal()
    jobs = faults.wait([job], lambda j: j.state in FINAL, 60, "the job to end")

    assert jobs[job].state == S.SUCCEEDED, jobs[job]
    assert len(jobs[job].attempts) == 1  # nothing was requeued
    assert len(faults.runs()[job.split("/")[1]]) == 1  # and nothing stopped or started twice
    assert faults.log_lines(rig, r"broker unreachable", cut), "the cut went unnoticed"
    back = faults.log_lines(rig, r"broker reachable again", cut)
    assert back
    assert not faults.log_lines(rig, r"before the broker may requeue")
    _never_drained(faults, rig)
    ok, out = faults.verify_ledger()
    assert ok, out
    print(
        f"\nblack hole 5 s, TTL 15 s, heartbeat 3 s: heartbeats answered again "
        f"{back[0][0] - healed:.2f} s after the heal; 1 attempt"
    )


@pytest.mark.timeout(120)
def test_twenty_percent_loss(netns: NetNs, faults: FaultFleet) -> None:
    """20 % of the packets between rig-a and the broker are lost, each way, for 30 s while
    short jobs run on rig-a (behind the lossy link) and rig-b: every job ends SUCCEEDED
    exactly once, no attempt is settled twice, nothing runs twice at once."""
    faults.start_broker(host=netns.host_ip)
    token = faults.client().create_farm("faults").enrollment_token
    rig_a = faults.start_agent(
        "rig-a", token, netns=netns, simulate="RTX3090x2", metrics_listen=f"{netns.ns_ip}:0"
    )
    rig_b = faults.start_agent("rig-b", token)
    faults.fleet.wait_workers(2)
    rig_a_metrics = faults.agent_metrics_address(rig_a)
    before = faults.histogram(BROKER_RPC, method_re=AGENT_RPCS)
    rtt_before = faults.histogram(HEARTBEAT_RTT, rig_a_metrics)
    start = time.time()
    netns.loss(20)
    jobs: list[str] = []
    while time.time() < start + LOSS_S:
        for _ in range(3):
            jobs.append(faults.submit(1.5, max_attempts=5))
        time.sleep(1.5)
    during = faults.histogram(BROKER_RPC, method_re=AGENT_RPCS)
    netns.heal()
    rtt_during = faults.histogram(HEARTBEAT_RTT, rig_a_metrics)
    done = faults.wait(jobs, lambda j: j.state in FINAL, 90, "every job to end")

    states = {n: S.Name(j.state) for n, j in done.items()}
    assert set(states.values()) == {"SUCCEEDED"}, states
    ran = faults.runs()
    assert sorted(ran) == sorted(n.split("/")[1] for n in jobs)
    assert faults.overlaps() == []
    ok, out = faults.verify_ledger()
    assert ok, out
    names = _workers(faults)
    on_a = sum(1 for j in done.values() if j.attempts[-1].worker == names["rig-a"])
    assert on_a > 0, "no job ran behind the lossy link"
    _never_drained(faults, rig_a)
    assert rig_b.proc.poll() is None
    retried = sum(1 for j in done.values() if len(j.attempts) > 1)
    broker_p99, rtt_p99 = p99(before, during), p99(rtt_before, rtt_during)
    unreachable = len(faults.log_lines(rig_a, r"broker unreachable", start))
    print(
        f"\n20 % loss each way for {LOSS_S:.0f} s, {len(jobs)} jobs of 1.5 s on 2 rigs "
        f"({on_a} behind the lossy link): all SUCCEEDED, {retried} needed a second attempt"
        f"\n  broker p99 of the agents' Heartbeat/ReportJobEvents (server side): {_ms(broker_p99)}"
        f"\n  rig-a's p99 heartbeat round trip (answered ones): {_ms(rtt_p99)}"
        f"\n  rig-a logged 'broker unreachable' {unreachable} time(s)"
    )


def _ms(seconds: float | None) -> str:
    return "no calls" if seconds is None else f"{seconds * 1000:.1f} ms"


@pytest.mark.timeout(60)
def test_keepalive_pings_stay_within_the_brokers_policy(faults: FaultFleet) -> None:
    """The broker permits a ping every BROKER_MIN_PING_INTERVAL_S: a client at that rate
    keeps an idle stream for 3 intervals; one pinging every second gets GOAWAY
    too_many_pings (the limit the agent's config enforces is real)."""
    address = faults.start_broker()
    config = AgentConfig(
        broker_address=address,
        enrollment_token="unused",
        keepalive_time_s=BROKER_MIN_PING_INTERVAL_S,
    )
    agent_options = channel_options(config)
    eager = [(k, 1000 if k == "grpc.keepalive_time_ms" else v) for k, v in agent_options]
    hold_s = 3 * BROKER_MIN_PING_INTERVAL_S + 1

    async def watch(options: list[tuple[str, int]]) -> str:
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            try:
                async with asyncio.timeout(hold_s):
                    async for _ in call:
                        pass
            except TimeoutError:
                return "held"
            except grpc.aio.AioRpcError as err:
                return f"{err.code().name}: {err.details()}"
            return "ended"

    async def both() -> list[str]:
        return list(await asyncio.gather(watch(agent_options), watch(eager)))

    polite, eager_result = asyncio.run(both())
    assert polite == "held"
    assert eager_result.startswith("UNAVAILABLE") and "ping" in eager_result.lower()
    print(
        f"\nkeepalive every {BROKER_MIN_PING_INTERVAL_S:g} s: {polite}; every 1 s: {eager_result}"
    )
