"""``rigshift agent …``: clear refusals, GPU listing, config files (that importing it is
cheap is tests/integration/test_agent_cli_imports.py: it needs a fresh interpreter)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from worker_agent.cli import agent_group


def test_run_refuses_a_heartbeat_not_well_under_the_lease() -> None:
    result = CliRunner().invoke(
        agent_group,
        ["run", "--broker", "127.0.0.1:1", "--token", "t", "--heartbeat-interval-s", "10"],
    )
    assert result.exit_code == 2
    assert "heartbeat_interval_s=10 is not well under lease_ttl_s=15" in result.output
    assert "at most 5 s" in result.output


def test_run_refuses_an_unknown_gpu_model() -> None:
    result = CliRunner().invoke(
        agent_group, ["run", "--broker", "127.0.0.1:1", "--token", "t", "--simulate", "GTX1080x2"]
    )
    assert result.exit_code == 2 and "unknown GPU model 'GTX1080'" in result.output


def test_run_refuses_a_float_price_it_cannot_represent() -> None:
    args = ["run", "--broker", "127.0.0.1:1", "--token", "t", "--price-usd-per-gpu-hour"]
    result = CliRunner().invoke(agent_group, [*args, "0.1234567"])
    assert result.exit_code == 2


def test_gpus_lists_a_simulated_rig() -> None:
    result = CliRunner().invoke(agent_group, ["gpus", "--simulate", "RTX3080x2,A4000", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["model"] for r in rows] == ["RTX 3080", "RTX 3080", "A4000"]
    assert rows[2]["pcie_link_width"] == 16 and rows[0]["power_watts"] == 20.0


def test_config_file_fields_with_options_and_env_on_top(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from worker_agent.config import AgentConfig, ConfigError
    from worker_agent.config_file import read_config_file

    path = tmp_path / "agent.toml"
    path.write_text(
        'broker_address = "broker.example:50051"\n'
        'enrollment_token = "rsft_file"\n'
        'state_dir = "/var/lib/rigshift/agent"\n'
        'price_usd_per_gpu_hour = "0.25"\n'
        "drain_grace_s = 90\n"
    )
    values = read_config_file(path)
    assert values["state_dir"] == Path("/var/lib/rigshift/agent")
    assert values["price_micros_per_gpu_hour"] == 250_000
    assert AgentConfig(**values).drain_grace_s == 90  # type: ignore[arg-type]
    # the file alone is enough to pass the CLI's required options
    ctx = agent_group.commands["run"].make_context("run", ["--config", str(path)])
    assert ctx.params["token"] is None and ctx.params["config_file"] == path
    path.write_text("price_usd_per_gpu_hour = 0.25\n")
    with pytest.raises(ConfigError, match="as a string"):
        read_config_file(path)
    path.write_text("heartbeat_interval = 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'heartbeat_interval'; known: .*heartbeat_interval_s"
    ):
        read_config_file(path)


def test_a_missing_token_is_refused_at_parse_time() -> None:
    import click

    with pytest.raises(click.MissingParameter, match="token"):
        agent_group.commands["run"].make_context("run", ["--broker", "b:1"])
