"""``--simulate-fault`` and the ``[health]`` table: clear refusals, the values taken."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from worker_agent.cli import agent_group
from worker_agent.config import AgentConfig, ConfigError
from worker_agent.config_file import read_config_file
from worker_agent.health import HealthConfig

RUN = ["run", "--broker", "127.0.0.1:1", "--token", "t"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--simulate", "RTX3090x2", "--simulate-fault", "1:melt:3"], "unknown fault kind 'melt'"),
        (["--simulate", "RTX3090x2", "--simulate-fault", "1:xid79"], "GPU:KIND:AFTER_S"),
        (["--simulate", "RTX3090x2", "--simulate-fault", "2:lost:0"], "the rig has 2"),
        (["--simulate-fault", "0:lost:0"], "needs --simulate SPEC"),
    ],
)
def test_run_refuses_a_bad_simulated_fault(args: list[str], message: str) -> None:
    result = CliRunner().invoke(agent_group, [*RUN, *args])
    assert result.exit_code == 2
    assert message in result.output


def test_the_health_table_and_faults_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'broker_address = "b:1"\nenrollment_token = "t"\nsimulate = "RTX3090x2"\n'
        'simulate_faults = ["1:xid79:30"]\n[health]\ninterval_s = 2\nprobation_s = 120\n'
    )
    values = read_config_file(path)
    config = AgentConfig(**values)
    assert config.health == HealthConfig(interval_s=2, probation_s=120)
    assert config.health.overheat_s == 30.0 and config.simulate_faults == ("1:xid79:30",)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[health]\nprobation = 3\n", "unknown key health.'probation'"),
        ("[health]\ninterval_s = 0\n", "health.interval_s must be a positive number"),
        ("health = 3\n", "health must be a table"),
    ],
)
def test_a_bad_health_table_is_refused(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(table)
    with pytest.raises(ConfigError, match=message):
        read_config_file(path)


def test_a_bad_fault_in_the_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown fault kind"):
        AgentConfig(broker_address="b:1", enrollment_token="t", simulate_faults=("0:boom:1",))
