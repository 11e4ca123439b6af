"""AgentConfig: units in names, refused combinations, the heartbeat rule, [environments]."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from worker_agent.config import (
    AgentConfig,
    ConfigError,
    EnvironmentsConfig,
    effective_heartbeat_s,
)
from worker_agent.config_file import read_config_file


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


def test_environments_table(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'broker_address = "b:1"\n'
        'enrollment_token = "t"\n'
        "[environments]\n"
        "max_cache_gb = 50\n"
        'index_url = "https://pypi.internal/simple"\n'
        'extra_index_urls = ["https://download.pytorch.org/whl/cpu"]\n'
        'find_links = ["/opt/wheels", "/srv/wheels"]\n'
        "max_setup_s = 1800.5\n"
    )
    cfg = AgentConfig(**read_config_file(path))  # type: ignore[arg-type]
    assert cfg.environments == EnvironmentsConfig(
        max_cache_gb=50,
        index_url="https://pypi.internal/simple",
        extra_index_urls=("https://download.pytorch.org/whl/cpu",),
        find_links=("/opt/wheels", "/srv/wheels"),
        max_setup_s=1800.5,
    )
    # without the table: the defaults
    assert make().environments == EnvironmentsConfig()
    assert (make().environments.max_cache_gb, make().environments.max_setup_s) == (20, 900)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ("max_cache_gb = 0", "environments.max_cache_gb must be a positive number of GB"),
        ("max_setup_s = -1", "environments.max_setup_s must be a positive number of seconds"),
        ('max_setup_s = "900"', "environments.max_setup_s must be a positive"),
        ("max_setup_s = true", "environments.max_setup_s must be a positive"),
        ("index_url = 1", "environments.index_url must be a string"),
        ('find_links = "/opt/wheels"', "environments.find_links must be a list of strings"),
        ("extra_index_urls = [1]", "environments.extra_index_urls must be a list of strings"),
        ("cache_gb = 3", r"unknown key environments.'cache_gb'; known: extra_index_urls, "),
    ],
)
def test_environments_table_refuses(tmp_path: Path, table: str, words: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[environments]\n{table}\n")
    with pytest.raises(ConfigError, match=words):
        read_config_file(path)


def test_environments_config_is_frozen_and_lists_become_tuples() -> None:
    cfg = EnvironmentsConfig(find_links=["/opt/wheels"])  # type: ignore[arg-type]
    assert cfg.find_links == ("/opt/wheels",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_cache_gb = 1  # type: ignore[misc]


def test_every_environments_field_is_documented() -> None:
    import inspect

    import worker_agent.config as module

    source = inspect.getsource(module.EnvironmentsConfig)
    for f in dataclasses.fields(EnvironmentsConfig):
        after = source.split(f"    {f.name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), f"{f.name} has no docstring"
