"""The broker's and the agent's settings (``broker/settings.py``, ``worker_agent/settings.py``):
options > ``RIGSHIFT_*`` environment > ``--config`` TOML file > defaults, the consistency
checks refused with their messages whichever layer a value came from, secrets masked in
``config show``."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import broker_group
from broker.settings import BrokerSettings, SettingsError, load_broker_settings
from worker_agent.cli import agent_group
from worker_agent.config import AgentConfig, ConfigError
from worker_agent.settings import AgentSettings, load_agent_config


@pytest.fixture(autouse=True)
def _no_rigshift_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own RIGSHIFT_* variables must not leak into these tables."""
    for name in list(os.environ):
        if name.startswith("RIGSHIFT_"):
            monkeypatch.delenv(name)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


# Which layer wins: (file, env, flag) -> the value used. None: the layer does not set it.
PRECEDENCE = [
    (None, None, None, "default"),
    ("file", None, None, "file"),
    (None, "env", None, "env"),
    ("file", "env", None, "env"),
    ("file", None, "flag", "flag"),
    (None, "env", "flag", "flag"),
    ("file", "env", "flag", "flag"),
]
# The values each layer gives (all consistent with the default heartbeat of 3 s).
BROKER_TTL = {"default": 15.0, "file": 30.0, "env": 21.0, "flag": 45.0}
AGENT_DRAIN = {"default": 60.0, "file": 90.0, "env": 70.0, "flag": 120.0}


@pytest.mark.parametrize(("file", "env", "flag", "wins"), PRECEDENCE)
def test_broker_precedence(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    file: str | None,
    env: str | None,
    flag: str | None,
    wins: str,
) -> None:
    path = _toml(tmp_path, f"lease_ttl_s = {BROKER_TTL['file']}\n") if file else None
    if env:
        monkeypatch.setenv("RIGSHIFT_BROKER_LEASE_TTL_S", str(BROKER_TTL["env"]))
    flags = {"lease_ttl_s": BROKER_TTL["flag"]} if flag else {}
    settings = load_broker_settings(path, flags)
    assert settings.lease_ttl_s == BROKER_TTL[wins]
    assert settings.broker_config().lease_ttl_s == BROKER_TTL[wins]


@pytest.mark.parametrize(("file", "env", "flag", "wins"), PRECEDENCE)
def test_agent_precedence(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    file: str | None,
    env: str | None,
    flag: str | None,
    wins: str,
) -> None:
    text = 'broker_address = "b:1"\nenrollment_token = "rsft_file"\n'
    if file:
        text += f"drain_grace_s = {AGENT_DRAIN['file']}\n"
    if env:
        monkeypatch.setenv("RIGSHIFT_AGENT_DRAIN_GRACE_S", str(AGENT_DRAIN["env"]))
    flags = {"drain_grace_s": AGENT_DRAIN["flag"]} if flag else {}
    config = load_agent_config(_toml(tmp_path, text), flags)
    assert config.drain_grace_s == AGENT_DRAIN[wins]


@pytest.mark.parametrize(
    ("variable", "flag", "wins"),
    [
        ("RIGSHIFT_ENROLLMENT_TOKEN", None, "env"),  # the name the agent always read
        ("RIGSHIFT_AGENT_ENROLLMENT_TOKEN", None, "env"),
        ("RIGSHIFT_ENROLLMENT_TOKEN", "flag", "flag"),
    ],
)
def test_the_enrollment_token_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, flag: str | None, wins: str
) -> None:
    path = _toml(tmp_path, 'broker_address = "b:1"\nenrollment_token = "rsft_file"\n')
    monkeypatch.setenv(variable, "rsft_env")
    flags = {"enrollment_token": "rsft_flag"} if flag else {}
    assert load_agent_config(path, flags).enrollment_token == f"rsft_{wins}"


def test_the_agent_runs_on_variables_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIGSHIFT_AGENT_BROKER_ADDRESS", "broker:50051")
    monkeypatch.setenv("RIGSHIFT_ENROLLMENT_TOKEN", "rsft_env")
    monkeypatch.setenv("RIGSHIFT_AGENT_SIMULATE_FAULTS", '["0:xid79:30"]')
    monkeypatch.setenv("RIGSHIFT_AGENT_STATE_DIR", "/var/lib/rigshift/agent")
    config = load_agent_config()
    assert config.broker_address == "broker:50051"
    assert config.simulate_faults == ("0:xid79:30",)
    assert config.state_dir == Path("/var/lib/rigshift/agent")
    # and the CLI does not ask for --broker / --token then
    ctx = agent_group.commands["run"].make_context("run", [])
    assert ctx.params["broker_address"] is None
    ctx.close()


def test_settings_defaults_are_the_configs() -> None:
    """The settings models start where the configs they build do (no second set of defaults)."""
    settings = AgentSettings(broker_address="b:1", enrollment_token="t")
    for f in fields(AgentConfig):
        if f.name in AgentSettings.model_fields and f.default is not MISSING:
            assert getattr(settings, f.name) == f.default, f.name
    from broker.server import BrokerConfig

    broker = load_broker_settings().broker_config()
    assert broker == BrokerConfig()


def test_every_field_has_a_description() -> None:
    for model in (BrokerSettings, AgentSettings):
        missing = [n for n, f in model.model_fields.items() if not f.description]
        assert missing == [], model.__name__


# The checks that existed before the settings models, refused with their messages whichever
# layer the value came from.
BROKER_REFUSALS = [
    ("heartbeat_interval_s = 6\n", {}, "heartbeat_interval_s (6.0) must be at most lease_ttl_s"),
    ("lease_ttl_s = 6\n", {"heartbeat_interval_s": 3.0}, "at most lease_ttl_s (6.0) / 3"),
    ('queue_policy = "random"\n', {}, "queue_policy: Input should be 'fifo' or 'short-first'"),
    ("db_outage_unhealthy_s = -1\n", {}, "db_outage_unhealthy_s: Input should be greater than"),
    ('tls_cert = "c.pem"\n', {}, "--tls-cert and --tls-key go together"),
    ("replica = true\n", {}, "--replica needs a PostgreSQL --db"),
    ("max_attempts = 50\n", {}, "max_attempts: Input should be less than or equal to 20"),
    ("lease_ttl = 15\n", {}, "unknown key 'lease_ttl'"),
]


@pytest.mark.parametrize(("text", "flags", "message"), BROKER_REFUSALS)
def test_broker_refusals(tmp_path: Path, text: str, flags: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=_literal(message)):
        load_broker_settings(_toml(tmp_path, text), flags)


def test_broker_serve_refuses_with_the_message(tmp_path: Path) -> None:
    path = _toml(tmp_path, "lease_ttl_s = 30\n")
    # the message shows the flag's heartbeat (not the default 3) and the environment's TTL
    # (not the file's 30): the layers as documented, through the real command
    result = CliRunner().invoke(
        broker_group,
        ["serve", "--config", str(path), "--heartbeat-interval-s", "11"],
        env={"RIGSHIFT_BROKER_LEASE_TTL_S": "32"},
    )
    assert result.exit_code == 2
    assert "heartbeat_interval_s (11.0) must be at most lease_ttl_s (32.0) / 3" in result.output


AGENT_REFUSALS = [
    ("heartbeat_interval_s = 10\n", "heartbeat_interval_s=10 is not well under lease_ttl_s=15"),
    ("cancel_grace_s = 4.5\n", "cancel_grace_s must be at most 4 s"),
    ("keepalive_time_s = 1\n", "keepalive_time_s=1 is under the broker's minimum ping"),
    ("reconnect_min_s = 20\n", "reconnect_min_s must not exceed reconnect_max_s"),
    ('sandbox = "docker"\n', "sandbox must be auto, bwrap or none, got 'docker'"),
    ('tls_cert = "c.pem"\n', "tls_cert and tls_key go together"),
    ("drain_grace_s = 0\n", "drain_grace_s must be a positive number of seconds, got 0"),
    ('broker_address = "nohost"\n', "broker_address must be host:port, got 'nohost'"),
    ("price_usd_per_gpu_hour = 0.25\n", "as a string"),
    ("heartbeat_interval = 3\n", "unknown key 'heartbeat_interval'; known: "),
    ("[mining]\nstop_grace_s = 5\n", "mining.stop_grace_s must be at most 4 s"),
    ('[containers]\nenabled = "maybe"\n', "containers.enabled must be auto, true or false"),
]


@pytest.mark.parametrize(("text", "message"), AGENT_REFUSALS)
def test_agent_refusals(tmp_path: Path, text: str, message: str) -> None:
    head = 'broker_address = "b:1"\nenrollment_token = "t"\n'
    if text.startswith("broker_address"):
        head = 'enrollment_token = "t"\n'
    path = _toml(tmp_path, head + text)
    with pytest.raises(ConfigError, match=_literal(message)):
        load_agent_config(path)


def test_an_agent_variable_of_the_wrong_type_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIGSHIFT_AGENT_HEARTBEAT_INTERVAL_S", "three")
    with pytest.raises(ConfigError, match="heartbeat_interval_s: Input should be a valid number"):
        load_agent_config(None, {"broker_address": "b:1", "enrollment_token": "t"})


def test_a_missing_broker_address_names_every_layer() -> None:
    with pytest.raises(ConfigError, match=_literal("$RIGSHIFT_AGENT_BROKER_ADDRESS) is required")):
        load_agent_config(None, {"enrollment_token": "t"})


def _literal(text: str) -> str:
    import re

    return re.escape(text)


# -- config show --------------------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
def test_broker_config_show_masks_the_database_password(tmp_path: Path, as_json: bool) -> None:
    path = _toml(tmp_path, 'listen = "0.0.0.0:6000"\n')
    url = "postgresql+psycopg://rigshift:s3cr3t-pw@db:5432/rigshift"
    args = ["config", "show", "--config", str(path), *(["--json"] if as_json else [])]
    result = CliRunner().invoke(broker_group, args, env={"RIGSHIFT_BROKER_DB_URL": url})
    assert result.exit_code == 0, result.output
    assert "s3cr3t-pw" not in result.output
    shown = json.loads(result.output) if as_json else tomllib.loads(result.output)
    assert shown["db_url"] == "postgresql+psycopg://rigshift:***@db:5432/rigshift"
    assert shown["listen"] == "0.0.0.0:6000"
    # the TOML printed is a file `broker serve --config` reads back (password aside)
    if not as_json:
        again = load_broker_settings(_toml(tmp_path, result.output))
        assert again.model_dump(exclude={"db_url"}) == json.loads(
            json.dumps(load_broker_settings(path).model_dump(exclude={"db_url"}))
        )


@pytest.mark.parametrize("as_json", [False, True])
def test_agent_config_show_masks_the_token(tmp_path: Path, as_json: bool) -> None:
    path = _toml(
        tmp_path,
        'broker_address = "b:1"\nenrollment_token = "rsft_do_not_print"\n'
        '[mining]\ncommand = ["t-rex", "-w", "rig-{gpu}"]\n'
        '[mining.models."RTX 3090"]\nrevenue_usd_per_kwh = "0.1"\n',
    )
    args = ["config", "show", "--config", str(path), *(["--json"] if as_json else [])]
    result = CliRunner().invoke(agent_group, args, env={"RIGSHIFT_AGENT_DRAIN_GRACE_S": "75"})
    assert result.exit_code == 0, result.output
    assert "rsft_do_not_print" not in result.output
    shown = json.loads(result.output) if as_json else tomllib.loads(result.output)
    assert shown["enrollment_token"] == "***"
    assert shown["drain_grace_s"] == 75.0
    assert shown["mining"]["models"]["RTX 3090"]["revenue_micros_per_kwh"] == 100_000
    assert shown["health"]["interval_s"] > 0


def test_config_show_refuses_what_run_would(tmp_path: Path) -> None:
    path = _toml(tmp_path, "heartbeat_interval_s = 6\n")
    result = CliRunner().invoke(broker_group, ["config", "show", "--config", str(path)])
    assert result.exit_code == 2 and "must be at most lease_ttl_s" in result.output


def test_a_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


def test_the_session_protocol_is_set_by_the_file_the_environment_or_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = 'broker_address = "b:1"\nenrollment_token = "t"\n'
    assert load_agent_config(_toml(tmp_path, base)).session_protocol is True  # the default
    off = base + "session_protocol = false\n"
    assert load_agent_config(_toml(tmp_path, off)).session_protocol is False
    monkeypatch.setenv("RIGSHIFT_AGENT_SESSION_PROTOCOL", "true")
    assert load_agent_config(_toml(tmp_path, off)).session_protocol is True
    monkeypatch.setenv("RIGSHIFT_AGENT_SESSION_PROTOCOL", "false")
    assert load_agent_config(_toml(tmp_path, base)).session_protocol is False
    monkeypatch.delenv("RIGSHIFT_AGENT_SESSION_PROTOCOL")
    monkeypatch.setenv("RIGSHIFT_AGENT_BROKER_ADDRESS", "b:1")
    monkeypatch.setenv("RIGSHIFT_ENROLLMENT_TOKEN", "t")
    ctx = agent_group.commands["run"].make_context("run", ["--session"])
    assert ctx.params["session_protocol"] is True
    ctx.close()
    ctx = agent_group.commands["run"].make_context("run", ["--no-session"])
    assert ctx.params["session_protocol"] is False
    ctx.close()
