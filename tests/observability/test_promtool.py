"""promtool checks of deploy/prometheus: the config, the rules and the rules' unit tests."""

from __future__ import annotations

from prom_helpers import CONFIG, RULES, RULES_TEST, run_promtool


def test_promtool_check_config(promtool: str):
    result = run_promtool(promtool, "check", "config", CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules(promtool: str):
    result = run_promtool(promtool, "check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules(promtool: str):
    result = run_promtool(promtool, "test", "rules", RULES_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
