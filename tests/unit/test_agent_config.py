"""AgentConfig: units in names, refused combinations, the heartbeat rule."""

from __future__ import annotations

import dataclasses

import pytest

from worker_agent.config import AgentConfig, ConfigError, effective_heartbeat_s


def make(**kw) -> AgentConfig:  # type: ignore[no-untyped-def]
    return AgentConfig(broker_address="127.0.0.1:1", enrollment_token="tok", **kw)


def test_defaults_are_valid_and_frozen() -> None:
    cfg = make()
    assert cfg.heartbeat_interval_s * 3 <= cfg.lease_ttl_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lease_ttl_s = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("interval", "ttl", "ok"),
    [
        (3.0, 15.0, True),
        (5.0, 15.0, True),  # exactly TTL/3
        (5.1, 15.0, False),
        (10.0, 15.0, False),
        (15.0, 15.0, False),
    ],
)
def test_heartbeat_must_be_well_under_the_ttl(interval: float, ttl: float, ok: bool) -> None:
    if ok:
        make(heartbeat_interval_s=interval, lease_ttl_s=ttl)
        return
    with pytest.raises(ConfigError) as err:
        make(heartbeat_interval_s=interval, lease_ttl_s=ttl)
    message = str(err.value)
    assert "not well under" in message and f"at most {ttl / 3:g} s" in message


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("broker_address", "nohostport", "host:port"),
        ("enrollment_token", "", "enrollment_token is required"),
        ("drain_grace_s", 0, "positive number of seconds"),
        ("price_micros_per_gpu_hour", -1, "must not be negative"),
        ("cancel_grace_s", 4.5, "within 5 s"),
    ],
)
def test_refused_values(field: str, value: object, words: str) -> None:
    kw = {"broker_address": "127.0.0.1:1", "enrollment_token": "tok", field: value}
    with pytest.raises(ConfigError, match=words):
        AgentConfig(**kw)  # type: ignore[arg-type]


def test_every_field_is_documented() -> None:
    import inspect

    import worker_agent.config as module

    source = inspect.getsource(module.AgentConfig)
    for f in dataclasses.fields(AgentConfig):
        after = source.split(f"    {f.name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), f"{f.name} has no docstring"


def test_effective_heartbeat_takes_the_strictest() -> None:
    cfg = make(heartbeat_interval_s=3.0, lease_ttl_s=15.0)
    assert effective_heartbeat_s(cfg, broker_interval_s=3, broker_ttl_s=15) == 3.0
    assert effective_heartbeat_s(cfg, broker_interval_s=1, broker_ttl_s=15) == 1.0
    # a broker with a 4.5 s lease: at most 1.5 s between heartbeats
    assert effective_heartbeat_s(cfg, broker_interval_s=3, broker_ttl_s=4.5) == 1.5
