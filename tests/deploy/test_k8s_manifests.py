"""deploy/k8s: kustomize base and overlays render, validate against the Kubernetes schemas and
agree with each other, with the CLI and with the images.

Each of base, dev and prod is rendered (deploy_helpers.build, cross-checked against
``kubectl kustomize`` where kubectl exists) and every object is validated with
``kubernetes-validate`` (the Kubernetes OpenAPI schemas it ships, strict: unknown fields are
errors) for the oldest and newest Kubernetes versions we support. The ServiceMonitor CRD is
not in those schemas; it is checked against a hand-written subset of the Prometheus Operator
API (unknown fields are errors there too).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from typing import Any

import jsonschema
import pytest
import yaml
from deploy_helpers import (
    K8S,
    K8S_BASE,
    OPS_DOC,
    OVERLAYS,
    ROOT,
    Resource,
    build,
    containers,
    effective_settings,
    kustomization,
    parse_with_cli,
    pod_specs,
    referenced_paths,
    require,
    resource_id,
    split_image,
)

TARGETS = {"base": K8S_BASE, **OVERLAYS}
K8S_VERSIONS = ("1.30", "1.37")
"""Oldest and newest Kubernetes versions the manifests are validated for."""

_INTERVAL = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    # Subset of monitoring.coreos.com/v1 ServiceMonitor (Prometheus Operator API reference):
    # the fields a Rigshift deployment may use; anything else is rejected so a typo is caught.
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _INTERVAL,
                            "scrapeTimeout": _INTERVAL,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Resource]]:
    return request.param, build(TARGETS[request.param])


def _by_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def _one(resources: list[Resource], kind: str, name: str) -> Resource:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, got {len(found)}"
    return found[0]


def _validate(resource: Resource, version: str) -> None:
    kv = require("kubernetes_validate", "kubernetes-validate")
    if resource["kind"] == "ServiceMonitor":
        jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).validate(resource)
        return
    kv.validate(resource, version, strict=True)


# -- structure ---------------------------------------------------------------------------------


def test_every_path_a_kustomization_names_exists() -> None:
    for directory in [K8S_BASE, *OVERLAYS.values()]:
        for path in referenced_paths(directory):
            assert path.exists(), f"{directory.relative_to(ROOT)} names missing {path}"


def test_every_manifest_file_is_used_by_a_kustomization() -> None:
    directories = [K8S_BASE, *OVERLAYS.values()]
    used = {p.resolve() for d in directories for p in referenced_paths(d)}
    used |= {(d / "kustomization.yaml").resolve() for d in directories}
    for path in K8S.rglob("*.yaml"):
        assert path.resolve() in used, f"{path.relative_to(ROOT)} is not in any kustomization"


def test_base_has_the_required_objects() -> None:
    resources = build(K8S_BASE)
    kinds = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for wanted in [
        ("Deployment", "rigshift-broker"),
        ("Service", "rigshift-broker"),
        ("ConfigMap", "rigshift-broker"),
        ("Secret", "rigshift-broker"),
        ("Secret", "rigshift-agent"),
        ("PodDisruptionBudget", "rigshift-broker"),
        ("Job", "rigshift-migrate"),
        ("ServiceMonitor", "rigshift-broker"),
        ("DaemonSet", "rigshift-agent"),
    ]:
        assert wanted in kinds


def test_overlays_set_replicas_resources_and_image_tags() -> None:
    dev, prod = build(OVERLAYS["dev"]), build(OVERLAYS["prod"])
    assert _one(dev, "Deployment", "rigshift-broker")["spec"]["replicas"] == 1
    assert _one(prod, "Deployment", "rigshift-broker")["spec"]["replicas"] >= 2
    for resources, tag in ((dev, "dev"), (prod, None)):
        for res in resources:
            for c in containers(res):
                name, image_tag = split_image(c["image"])
                assert image_tag and image_tag != "latest", c["image"]
                if tag and "rigshift" in name:
                    assert image_tag == tag
    base_broker = containers(_one(build(K8S_BASE), "Deployment", "rigshift-broker"))[0]
    prod_broker = containers(_one(prod, "Deployment", "rigshift-broker"))[0]
    assert prod_broker["resources"] != base_broker["resources"]
    assert {r["metadata"].get("namespace") for r in dev if r["kind"] != "Namespace"} == {
        "rigshift-dev"
    }
    assert {r["metadata"].get("namespace") for r in prod if r["kind"] != "Namespace"} == {
        "rigshift"
    }


# -- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_validate_against_kubernetes_schemas(
    rendered: tuple[str, list[Resource]], version: str
) -> None:
    name, resources = rendered
    for res in resources:
        try:
            _validate(res, version)
        except jsonschema.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{name}: {resource_id(res)} at {path}: {err.message}")


def test_validation_rejects_a_misspelled_field() -> None:
    """The strict schemas are not vacuous: an unknown field or a wrong type is an error."""
    deployment = _one(build(K8S_BASE), "Deployment", "rigshift-broker")
    typo = copy.deepcopy(deployment)
    containers(typo)[0]["readinessProbes"] = containers(typo)[0].pop("readinessProbe")
    with pytest.raises(jsonschema.ValidationError):
        _validate(typo, K8S_VERSIONS[-1])
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        _validate(wrong_type, K8S_VERSIONS[-1])
    monitor = _one(build(K8S_BASE), "ServiceMonitor", "rigshift-broker")
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad, K8S_VERSIONS[-1])


def test_kustomize_renders_the_same_objects_as_kubectl() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the renderer alone is used")
    for name, directory in TARGETS.items():
        out = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        theirs = sorted(
            ((resource_id(r), r) for r in yaml.safe_load_all(out) if r), key=lambda x: x[0]
        )
        mine = sorted(((resource_id(r), r) for r in build(directory)), key=lambda x: x[0])
        assert [i for i, _ in mine] == [i for i, _ in theirs], name
        for (rid, a), (_, b) in zip(mine, theirs, strict=True):
            assert a == b, f"{name}: {rid} differs from kubectl kustomize"


def test_kustomizations_are_kustomize_v1beta1() -> None:
    for directory in [K8S_BASE, *OVERLAYS.values()]:
        assert kustomization(directory)["kind"] == "Kustomization"


# -- references between objects ----------------------------------------------------------------


def _env_refs(container: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for env in container.get("env", []):
        source = env.get("valueFrom", {})
        for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            if field in source:
                out.append((kind, source[field]["name"], source[field]["key"]))
    return out


def _data_keys(res: Resource) -> set[str]:
    return set(res.get("data", {})) | set(res.get("stringData", {}))


def test_every_config_and_secret_reference_resolves(rendered: tuple[str, list[Resource]]) -> None:
    """ConfigMap keys always; Secrets either rendered or, where an overlay drops the
    placeholders (prod), documented in docs/ops.md with their keys."""
    name, resources = rendered
    ops = OPS_DOC.read_text()
    for res in resources:
        for c in containers(res):
            for source in c.get("envFrom", []):
                _one(resources, "ConfigMap", source["configMapRef"]["name"])
            for kind, ref, key in _env_refs(c):
                found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == ref]
                if found:
                    assert key in _data_keys(found[0]), f"{name}: {kind}/{ref} lacks {key}"
                else:
                    assert kind == "Secret", f"{name}: {res['kind']} needs missing {kind}/{ref}"
                    assert ref in ops and key in ops, f"docs/ops.md must say how to create {ref}"
        for ps in pod_specs(res):
            for vol in ps.get("volumes", []):
                if "persistentVolumeClaim" in vol:
                    claim = vol["persistentVolumeClaim"]["claimName"]
                    _one(resources, "PersistentVolumeClaim", claim)


def test_variable_references_in_commands_are_defined(rendered: tuple[str, list[Resource]]) -> None:
    """$(VAR) in command/args and env values expands only from env defined before it."""
    name, resources = rendered
    for res in resources:
        for c in containers(res):
            defined: set[str] = set()
            for env in c.get("env", []):
                for var in re.findall(r"\$\((\w+)\)", env.get("value", "")):
                    assert var in defined, f"{name}: env {env['name']} uses {var} before it is set"
                defined.add(env["name"])
            # envFrom only from ConfigMaps (whole settings), never expanded in $(VAR)s below.
            assert all(set(e) == {"configMapRef"} for e in c.get("envFrom", []))
            for word in c.get("command", []) + c.get("args", []):
                for var in re.findall(r"\$\((\w+)\)", word):
                    assert var in defined, f"{name}: {c['name']} uses undefined $({var})"


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_ports_and_probes_line_up(rendered: tuple[str, list[Resource]]) -> None:
    _, resources = rendered
    deployment = _one(resources, "Deployment", "rigshift-broker")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    broker = containers(deployment)[0]
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    assert ports == {"grpc": 50051, "grpc-internal": 50052, "metrics": 9464}
    for probe in ("startupProbe", "readinessProbe"):
        assert broker[probe]["grpc"]["port"] == 50051, probe
    assert broker["livenessProbe"]["tcpSocket"]["port"] == 50051
    # Replica mode: the core listens on the internal port and is advertised by pod IP.
    settings = effective_settings("broker", _container_env(resources, broker))
    assert settings["replica"] is True
    assert settings["internal_listen"].endswith(":50052")
    assert settings["advertise_host"] == "10.0.0.7"  # the sample pod IP
    assert settings["listen"].endswith(":50051")
    assert settings["metrics_listen"].endswith(f":{ports['metrics']}")
    service = _one(resources, "Service", "rigshift-broker")
    assert _matches(service["spec"]["selector"], pod_labels)
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports and ports[port["targetPort"]] == port["port"]
    pdb = _one(resources, "PodDisruptionBudget", "rigshift-broker")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    for monitor in _by_kind(resources, "ServiceMonitor"):
        assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
        # The alert rules and dashboards select job="rigshift-broker" (deploy/prometheus/).
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "rigshift-broker"
    daemonset = _one(resources, "DaemonSet", "rigshift-agent")
    assert _matches(
        daemonset["spec"]["selector"]["matchLabels"],
        daemonset["spec"]["template"]["metadata"]["labels"],
    )


def test_pods_run_as_non_root_without_privilege(rendered: tuple[str, list[Resource]]) -> None:
    name, resources = rendered
    for res in resources:
        for ps in pod_specs(res):
            assert ps["securityContext"]["runAsNonRoot"] is True, resource_id(res)
            assert ps["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            assert ps.get("automountServiceAccountToken") is False
            for c in ps["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert not sc.get("privileged")
        if res["kind"] == "Namespace":
            labels = res["metadata"]["labels"]
            assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_agent_daemonset_targets_gpu_nodes() -> None:
    for name in ("base", "prod"):
        agent = _one(build(TARGETS[name]), "DaemonSet", "rigshift-agent")
        spec = agent["spec"]["template"]["spec"]
        assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        limits = containers(agent)[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        if name == "prod":
            gpus = str(limits["nvidia.com/gpu"])
            assert spec["nodeSelector"]["nvidia.com/gpu.count"] == gpus
    dev_agent = containers(_one(build(OVERLAYS["dev"]), "DaemonSet", "rigshift-agent"))[0]
    assert "nvidia.com/gpu" not in str(dev_agent["resources"])
    assert {"name": "RIGSHIFT_AGENT_SIMULATE", "value": "RTX3090x4"} in dev_agent["env"]


def test_secrets_are_placeholders_and_prod_ships_none() -> None:
    for secret in _by_kind(build(K8S_BASE), "Secret"):
        assert secret["metadata"]["annotations"]["rigshift.io/placeholder"] == "true"
        assert all("CHANGE-ME" in v for v in secret["stringData"].values()), secret
    assert "PLACEHOLDER" in (K8S_BASE / "secret.yaml").read_text()
    assert _by_kind(build(OVERLAYS["prod"]), "Secret") == []
    for secret in _by_kind(build(OVERLAYS["dev"]), "Secret"):
        assert "CHANGE-ME" not in str(secret.get("stringData")), "dev needs working values"


# -- the commands are the CLI's ----------------------------------------------------------------


def _container_env(resources: list[Resource], container: dict[str, Any]) -> dict[str, str]:
    """The environment the container would get (a Secret the overlay leaves out: a sample)."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        values.update(_one(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
    for env in container.get("env", []):
        if "value" in env:
            values[env["name"]] = _expand(env["value"], values)
            continue
        source = env["valueFrom"]
        if "fieldRef" in source:
            values[env["name"]] = {"status.podIP": "10.0.0.7", "spec.nodeName": "gpu-node-1"}[
                source["fieldRef"]["fieldPath"]
            ]
            continue
        ((field, ref),) = source.items()
        kind = {"secretKeyRef": "Secret", "configMapKeyRef": "ConfigMap"}[field]
        found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == ref["name"]]
        data = {**found[0].get("data", {}), **found[0].get("stringData", {})} if found else {}
        key = ref["key"]
        values[env["name"]] = str(data[key] if key in data else SAMPLE_SECRETS[key])
    return values


SAMPLE_SECRETS = {
    "RIGSHIFT_DB_URL": "postgresql+psycopg://rigshift:pw@db:5432/rigshift",
    "RIGSHIFT_ENROLLMENT_TOKEN": "rsft_example",
}


def _expand(word: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], word)


def test_container_commands_parse_with_the_cli(rendered: tuple[str, list[Resource]]) -> None:
    name, resources = rendered
    checked = 0
    for res in resources:
        for c in containers(res):
            if c.get("command", [""])[0] != "rigshift":
                continue
            env = _container_env(resources, c)
            words = [_expand(w, env) for w in c["command"]]
            if words[1] == "agent":
                continue  # checked by test_agent_commands_parse_with_the_cli
            parse_with_cli(words, env).close()
            if words[1:3] == ["broker", "serve"]:
                settings = effective_settings("broker", env)
                assert settings["db_url"].startswith("postgresql+psycopg://"), name
            checked += 1
    assert checked == 2, name  # broker serve and broker migrate


def test_agent_commands_parse_with_the_cli() -> None:
    for directory in TARGETS.values():
        resources = build(directory)
        agent = containers(_one(resources, "DaemonSet", "rigshift-agent"))[0]
        env = _container_env(resources, agent)
        ctx = parse_with_cli([_expand(w, env) for w in agent["command"]], env)
        assert ctx.params["token"] == env["RIGSHIFT_ENROLLMENT_TOKEN"]
        ctx.close()
        settings = effective_settings("agent", env)
        assert settings["metrics_listen"] == "10.0.0.7:9465"
        assert settings["hostname"] == "gpu-node-1"
        assert settings["broker_address"] == "rigshift-broker:50051"
