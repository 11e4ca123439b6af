"""deploy/compose.yml: valid under the Compose Specification and consistent with the rest of
deploy/ (no container engine needed; none runs on the development machine).

The schema is the Compose Specification's JSON schema as vendored by the ``check-jsonschema``
package (``check_jsonschema/builtin_schemas/vendor/compose-spec.json``). Like ``docker
compose config``, variables are interpolated before validation (here with their defaults,
as on a machine with no .env).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml
from deploy_helpers import (
    COMPOSE_FILE,
    DEPLOY,
    OPS_DOC,
    ROOT,
    command_words,
    effective_settings,
    parse_with_cli,
    require,
)

VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def _raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose interpolation of ${VAR}, ${VAR:-default}, ${VAR-default}; $$ is a literal $."""
    if isinstance(node, dict):
        return {k: _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name)
        if (op == ":-" and not value) or (op == "-" and value is None):
            return default
        if op in (":?", "?") and not value:
            raise AssertionError(f"${{{name}}} is required: {default}")
        return value or ""

    return VARIABLE.sub(one, node.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _interpolate(_raw(), {})


def _schema() -> dict[str, Any]:
    require("check_jsonschema", "check-jsonschema")
    dist = importlib.metadata.distribution("check-jsonschema")
    path = Path(str(dist.locate_file("check_jsonschema/builtin_schemas/vendor/compose-spec.json")))
    return json.loads(path.read_text())


def test_compose_file_is_valid_under_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = _schema()
    assert schema["title"] == "Compose Specification"
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_validation_rejects_a_mistake(compose: dict[str, Any]) -> None:
    """The schema is not vacuous: an unknown service key and a bad depends_on condition fail."""
    validator = jsonschema.Draft202012Validator(_schema())
    bad = json.loads(json.dumps(compose))
    bad["services"]["broker"]["helthcheck"] = {"test": ["CMD", "true"]}
    assert list(validator.iter_errors(bad))
    bad = json.loads(json.dumps(compose))
    bad["services"]["broker"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert list(validator.iter_errors(bad))


def test_services_are_the_ones_the_stack_needs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "migrate", "broker", "prometheus", "grafana"} <= set(services)
    agents = {n: s for n, s in services.items() if "agent" in command_words(s.get("command", []))}
    simulated = sorted(s["environment"]["RIGSHIFT_AGENT_SIMULATE"] for s in agents.values())
    assert simulated == ["RTX3060x6", "RTX3090x4"]
    assert "healthcheck" in services["postgres"] and "pgdata" in str(services["postgres"])
    assert services["broker"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert command_words(services["migrate"]["command"])[:3] == ["rigshift", "broker", "migrate"]
    for agent in agents.values():
        assert agent["depends_on"]["broker"]["condition"] == "service_healthy"


def test_dependencies_and_volumes_are_declared(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], set(compose.get("volumes") or {})
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind source {source} is missing"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"


def test_build_contexts_and_dockerfiles_exist(compose: dict[str, Any]) -> None:
    built = 0
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            continue
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT, f"{name}: images build from the repository root"
        assert (context / build["dockerfile"]).is_file(), name
        built += 1
    assert built >= 3


def test_prometheus_and_grafana_wiring_matches_deploy_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["prometheus"]["volumes"]}
    config_dir = DEPLOY / mounts["/etc/prometheus"]
    assert config_dir == DEPLOY / "prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    config = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    for rules in config.get("rule_files", []):
        assert (config_dir / rules).is_file()
    metrics_listen = services["broker"]["environment"]["RIGSHIFT_BROKER_METRICS_LISTEN"]
    metrics_port = metrics_listen.rsplit(":", 1)[1]
    jobs = config["scrape_configs"]
    targets = [t for job in jobs for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert f"broker:{metrics_port}" in targets
    sd_urls = [sd["url"] for job in jobs for sd in job.get("http_sd_configs", [])]
    assert f"http://broker:{metrics_port}/sd" in sd_urls
    assert "9090:9090" in services["prometheus"]["ports"]

    grafana = {m.split(":")[1]: m.split(":")[0] for m in services["grafana"]["volumes"]}
    datasources = DEPLOY / grafana["/etc/grafana/provisioning/datasources/rigshift.yml"]
    (datasource,) = yaml.safe_load(datasources.read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    providers = DEPLOY / grafana["/etc/grafana/provisioning/dashboards/rigshift.yml"]
    (provider,) = yaml.safe_load(providers.read_text())["providers"]
    dashboards_dir = DEPLOY / grafana[provider["options"]["path"]]
    assert list(dashboards_dir.glob("*.json")), "no dashboards to provision"


def test_agents_report_a_reachable_metrics_address(compose: dict[str, Any]) -> None:
    """The agent reports its metrics_listen to the broker's /sd: a name Prometheus resolves,
    and the one the image's HEALTHCHECK probes."""
    services = compose["services"]
    for name, service in services.items():
        words = command_words(service.get("command", []))
        if "agent" not in words:
            continue
        env = {k: str(v) for k, v in service["environment"].items()}
        settings = effective_settings("agent", {**env, "RIGSHIFT_ENROLLMENT_TOKEN": "rsft_x"})
        address = settings["metrics_listen"]
        assert address.split(":")[0] in (name, service.get("hostname")), name
        assert env["RIGSHIFT_AGENT_METRICS_ADDR"] == address
        assert settings["broker_address"] == "broker:50051"
        assert service.get("shm_size"), "Ray needs more than Docker's 64 MB /dev/shm"
        assert service["stop_grace_period"] == "90s", "longer than the agent's 60 s drain"


def test_variables_have_defaults_and_are_documented() -> None:
    """Every ${VAR} has a default (so `docker compose` works before .env exists) and ops.md
    says what it is."""
    text = COMPOSE_FILE.read_text()
    ops = OPS_DOC.read_text()
    names = set()
    for m in VARIABLE.finditer(text):
        assert m.group(2) in (":-", "-"), f"${{{m.group(1)}}} needs a default"
        names.add(m.group(1))
    assert "RIGSHIFT_ENROLLMENT_TOKEN" in names
    for name in names:
        assert name in ops, f"docs/ops.md does not mention {name}"


def test_commands_parse_with_the_cli(compose: dict[str, Any]) -> None:
    env = {"RIGSHIFT_ENROLLMENT_TOKEN": "rsft_example"}
    services = _interpolate(_raw(), env)["services"]
    for name in ("migrate", "broker"):
        parse_with_cli(command_words(services[name]["command"])).close()
    broker_env = {k: str(v) for k, v in services["broker"]["environment"].items()}
    broker = effective_settings("broker", broker_env)
    assert broker["listen"] == "0.0.0.0:50051" and broker["home"] == "/var/lib/rigshift"
    assert broker["db_url"] == "postgresql+psycopg://rigshift:rigshift@postgres:5432/rigshift"
    for service in services.values():
        words = command_words(service.get("command", []))
        if "agent" in words:
            env = {k: str(v) for k, v in service["environment"].items()}
            ctx = parse_with_cli(words, env)
            assert ctx.params["token"] == "rsft_example"
            ctx.close()
            agent = effective_settings("agent", env)
            assert agent["enrollment_token"] == "rsft_example"
            assert str(agent["state_dir"]) == "/var/lib/rigshift/agent"


def test_agents_without_a_token_stop_with_a_clear_error(compose: dict[str, Any]) -> None:
    """Before .env has the token the variable is empty: the CLI must refuse, not start."""
    for service in compose["services"].values():
        words = command_words(service.get("command", []))
        if "agent" in words:
            assert service["environment"]["RIGSHIFT_ENROLLMENT_TOKEN"] == ""
            with pytest.raises(click.MissingParameter, match="token"):
                parse_with_cli(words, {k: str(v) for k, v in service["environment"].items()})
