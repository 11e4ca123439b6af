"""rigshift.defaults: the broker and the agent start from the same lease contract."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from broker.cli import broker_group
from broker.server import KEEPALIVE_OPTIONS, BrokerConfig
from rigshift.defaults import (
    BROKER_ADDRESS,
    BROKER_MIN_PING_INTERVAL_S,
    HEARTBEAT_INTERVAL_S,
    HEARTBEATS_PER_TTL,
    LEASE_TTL_S,
    max_heartbeat_interval_s,
)
from worker_agent.config import AgentConfig, ConfigError, effective_heartbeat_s


def _agent(**changes: float) -> AgentConfig:
    return AgentConfig(broker_address=BROKER_ADDRESS, enrollment_token="t", **changes)


def test_broker_and_agent_default_to_the_same_lease() -> None:
    broker = BrokerConfig()
    agent = _agent()
    assert (broker.lease_ttl_s, broker.heartbeat_interval_s) == (LEASE_TTL_S, HEARTBEAT_INTERVAL_S)
    assert (agent.lease_ttl_s, agent.heartbeat_interval_s) == (LEASE_TTL_S, HEARTBEAT_INTERVAL_S)
    assert broker.listen == BROKER_ADDRESS
    assert max_heartbeat_interval_s(LEASE_TTL_S) >= HEARTBEAT_INTERVAL_S


def test_the_broker_cli_shows_the_shared_defaults() -> None:
    text = CliRunner().invoke(broker_group, ["serve", "--help"]).output
    assert f"[default: {BROKER_ADDRESS}]" in text
    assert f"[default: {LEASE_TTL_S}]" in text and f"[default: {HEARTBEAT_INTERVAL_S}]" in text


@pytest.mark.parametrize(("interval", "ttl", "ok"), [(5.0, 15.0, True), (5.1, 15.0, False)])
def test_both_sides_refuse_fewer_heartbeats_per_ttl(interval: float, ttl: float, ok: bool) -> None:
    assert HEARTBEATS_PER_TTL == 3
    if ok:
        BrokerConfig(lease_ttl_s=ttl, heartbeat_interval_s=interval)
        AgentConfig(
            broker_address="b:1",
            enrollment_token="t",
            lease_ttl_s=ttl,
            heartbeat_interval_s=interval,
        )
        return
    with pytest.raises(ValueError, match="/ 3"):
        BrokerConfig(lease_ttl_s=ttl, heartbeat_interval_s=interval)
    with pytest.raises(ConfigError, match="at least 3 heartbeats"):
        AgentConfig(
            broker_address="b:1",
            enrollment_token="t",
            lease_ttl_s=ttl,
            heartbeat_interval_s=interval,
        )


def test_the_agent_heartbeats_within_a_shorter_broker_ttl() -> None:
    agent = _agent()
    assert effective_heartbeat_s(agent, 0.0, 6.0) == max_heartbeat_interval_s(6.0) == 2.0


def test_the_broker_accepts_the_pings_the_agent_may_send() -> None:
    assert dict(KEEPALIVE_OPTIONS)["grpc.http2.min_ping_interval_without_data_ms"] == 5_000
    assert BROKER_MIN_PING_INTERVAL_S == 5.0
    with pytest.raises(ConfigError, match="minimum ping"):
        _agent(keepalive_time_s=4.9)
