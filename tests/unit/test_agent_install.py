"""``rigshift agent install``: the files it prints and writes, their modes, the unit's source.

Everything is written under tmp_path (``--config-dir``/``--unit-dir``); ``systemctl``
is a fake script on PATH that records its arguments, so the tests see that install did not
call it. ``--start`` (which runs it) and ``systemd-analyze verify`` of the written unit start
processes: they are in tests/integration/test_agent_install_systemd.py.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import agent_install_helpers
import pytest
from agent_install_helpers import TOKEN, install
from click.testing import CliRunner

from worker_agent.cli import agent_group
from worker_agent.config import AgentConfig
from worker_agent.config_file import read_config_file
from worker_agent.install import (
    DEFAULT_EXECUTABLE,
    InstallError,
    mask_token,
    plan_install,
    render_unit,
    unit_template,
)

systemctl_log = agent_install_helpers.systemctl_log  # the fixture, by name

REPO = Path(__file__).resolve().parents[2]
DEPLOY_UNIT = REPO / "deploy" / "systemd" / "rigshift-agent.service"
EXE = str(Path(sys.executable).parent / "rigshift")


def test_dry_run_prints_both_files_with_the_token_masked_and_writes_nothing(
    tmp_path: Path, systemctl_log: Path
) -> None:
    result = install(tmp_path, "--simulate", "RTX3090x4", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert TOKEN not in result.output
    assert 'enrollment_token = "rsft_********"' in out
    assert 'broker_address = "broker.example:50051"' in out
    assert 'simulate = "RTX3090x4"' in out
    assert f"# {tmp_path / 'etc' / 'agent.toml'} (mode 0600" in out
    assert f"ExecStart={EXE} agent run --config {tmp_path / 'etc' / 'agent.toml'}" in out
    assert "NoNewPrivileges=yes" in out and "[Install]" in out
    assert not (tmp_path / "etc").exists() and not (tmp_path / "units").exists()
    assert not systemctl_log.exists()


def test_writes_the_config_0600_and_the_unit_0644_and_does_not_call_systemctl(
    tmp_path: Path, systemctl_log: Path
) -> None:
    result = install(tmp_path, "--simulate", "RTX3090x4", "--metrics-listen", "127.0.0.1:9465")
    assert result.exit_code == 0, result.output
    config = tmp_path / "etc" / "agent.toml"
    unit = tmp_path / "units" / "rigshift-agent.service"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert not systemctl_log.exists(), "install must not run systemctl without --start"
    assert "systemctl daemon-reload && systemctl enable --now rigshift-agent" in result.stdout
    assert f"agent doctor --config {config}" in result.stdout
    assert TOKEN not in result.output
    # The written config is what `rigshift agent run --config` reads.
    values = read_config_file(config)
    assert values == {
        "broker_address": "broker.example:50051",
        "enrollment_token": TOKEN,
        "state_dir": Path("/var/lib/rigshift/agent"),
        "simulate": "RTX3090x4",
        "metrics_listen": "127.0.0.1:9465",
    }
    cfg = AgentConfig(**values)  # type: ignore[arg-type]
    assert cfg.state_dir == Path("/var/lib/rigshift/agent") and cfg.simulate == "RTX3090x4"
    run = agent_group.commands["run"].make_context("run", ["--config", str(config)])
    assert run.params["config_file"] == config
    assert f"ExecStart={EXE} agent run --config {config}\n" in unit.read_text()


def test_refuses_to_overwrite_an_existing_config_unless_forced(tmp_path: Path) -> None:
    assert install(tmp_path).exit_code == 0
    config = tmp_path / "etc" / "agent.toml"
    before = config.read_text()
    again = install(tmp_path, token="rsft_other")
    assert again.exit_code == 1
    assert "already exist" in again.output and "--force" in again.output
    assert config.read_text() == before
    forced = install(tmp_path, "--force", token="rsft_other")
    assert forced.exit_code == 0, forced.output
    assert read_config_file(config)["enrollment_token"] == "rsft_other"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_an_invalid_setting_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        agent_group,
        ["install", "--broker", "no-port", "--token", TOKEN, "--config-dir", str(tmp_path)],
    )
    assert result.exit_code == 1 and "broker_address must be host:port" in result.output
    result = install(tmp_path, "--simulate", "GTX1080x2")
    assert result.exit_code == 1 and "unknown GPU model 'GTX1080'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_tls_ca_goes_into_the_config(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    result = install(tmp_path, "--tls-ca", str(ca), "--dry-run")
    assert result.exit_code == 0, result.output
    assert f'tls_ca = "{ca}"' in result.stdout


def test_the_unit_is_the_deploy_file_with_three_lines_filled_in() -> None:
    """One unit text: the package resource is the deploy file, and install changes 3 lines."""
    deploy = DEPLOY_UNIT.read_text()
    assert unit_template() == deploy
    defaults = render_unit(
        deploy,
        executable=DEFAULT_EXECUTABLE,
        config_path=Path("/etc/rigshift/agent.toml"),
        user="rigshift",
    )
    assert defaults == deploy, "with the defaults install writes the deploy file unchanged"
    other = render_unit(
        deploy, executable="/usr/local/bin/rigshift", config_path=Path("/srv/a.toml"), user="gpu"
    )
    changed = [
        (a, b) for a, b in zip(deploy.splitlines(), other.splitlines(), strict=True) if a != b
    ]
    assert changed == [
        ("User=rigshift", "User=gpu"),
        ("Group=rigshift", "Group=gpu"),
        (
            "ExecStart=/opt/rigshift/bin/rigshift agent run --config /etc/rigshift/agent.toml",
            "ExecStart=/usr/local/bin/rigshift agent run --config /srv/a.toml",
        ),
    ]


def test_an_executable_the_service_cannot_see_is_warned_about() -> None:
    plan = plan_install(broker_address="b:1", token=TOKEN, executable="/home/op/.venv/bin/rigshift")
    assert len(plan.warnings) == 1 and "ProtectHome" in plan.warnings[0]
    assert "/home" in plan.warnings[0]
    assert (
        plan_install(broker_address="b:1", token=TOKEN, executable=DEFAULT_EXECUTABLE).warnings
        == ()
    )
    with pytest.raises(InstallError, match="absolute path"):
        plan_install(broker_address="b:1", token=TOKEN, executable="rigshift")
    with pytest.raises(InstallError, match="systemd would rewrite"):
        plan_install(broker_address="b:1", token=TOKEN, executable="/opt/my rig/rigshift")


def test_mask_token_keeps_only_the_prefix() -> None:
    assert mask_token("rsft_abcdef") == "rsft_********"
    assert mask_token("plainsecret") == "********"
    plan = plan_install(broker_address="b:1", token=TOKEN, executable=DEFAULT_EXECUTABLE)
    assert TOKEN in plan.config_text and TOKEN not in plan.masked_config_text


def test_operator_doc_lists_exactly_the_install_options() -> None:
    """docs/operator.md's install table names every option of the command, and no other."""
    import re

    doc = (REPO / "docs" / "operator.md").read_text()
    table = doc[doc.index("| `--broker HOST:PORT` | required |") :]
    table = table[: table.index("\n\n")]
    documented = set(re.findall(r"^\| `(--[a-z-]+)", table, re.MULTILINE))
    command = agent_group.commands["install"]
    options = {o for p in command.params for o in p.opts if o.startswith("--")} - {"--help"}
    assert documented == options


def test_containers_adds_the_podman_drop_in_and_enables_containers(tmp_path: Path) -> None:
    result = install(tmp_path, "--simulate", "RTX3090x4", "--containers")
    assert result.exit_code == 0, result.output
    dropin = tmp_path / "units" / "rigshift-agent.service.d" / "containers.conf"
    assert f"wrote {dropin}" in result.stdout
    assert stat.S_IMODE(dropin.stat().st_mode) == 0o644
    lines = dropin.read_text().splitlines()
    assert lines[lines.index("[Service]") + 1 :] == [
        "RestrictNamespaces=no",
        "NoNewPrivileges=no",
        "RestrictSUIDSGID=no",
        "CapabilityBoundingSet=CAP_SETUID CAP_SETGID",
    ]
    # The unit itself stays the hardened deploy file; the drop-in lifts what podman needs.
    assert "RestrictNamespaces=yes" in (tmp_path / "units" / "rigshift-agent.service").read_text()
    config = read_config_file(tmp_path / "etc" / "agent.toml")
    assert AgentConfig(**config).containers.enabled == "true"
    assert "usermod --add-subuids 100000-165535 --add-subgids 100000-165535 rigshift" in (
        result.stdout
    )


def test_without_containers_there_is_no_drop_in(tmp_path: Path) -> None:
    result = install(tmp_path, "--simulate", "RTX3090x4")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "units" / "rigshift-agent.service.d").exists()
    assert "[containers]" not in (tmp_path / "etc" / "agent.toml").read_text()
    assert "usermod" not in result.stdout


def test_dry_run_with_containers_prints_the_drop_in(tmp_path: Path) -> None:
    result = install(tmp_path, "--simulate", "RTX3090x4", "--containers", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "rigshift-agent.service.d/containers.conf (mode 0644)" in result.stdout
    assert "RestrictNamespaces=no" in result.stdout
    assert not (tmp_path / "units").exists()
