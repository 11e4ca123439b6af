"""docs/ops.md covers what ops needs and points only at files that exist."""

from __future__ import annotations

import re

from deploy_helpers import OPS_DOC, ROOT

USER_FILES = {"deploy/.env"}
"""Files the doc tells the operator to create."""


def _text() -> str:
    return OPS_DOC.read_text()


def test_sections() -> None:
    headings = {line.lstrip("#").strip() for line in _text().splitlines() if line.startswith("#")}
    for wanted in (
        "Running the broker",
        "Container images",
        "Compose quick start",
        "Kubernetes",
        "Secrets",
        "Backups and restore",
        "Upgrades",
        "Prometheus and Grafana",
    ):
        assert wanted in headings, wanted


def test_key_facts_are_stated() -> None:
    text = _text()
    for fact in (
        "sqlite",
        "postgresql+psycopg://",
        "rigshift broker migrate",
        "pg_dump",
        "pg_restore",
        "artifacts",
        "kustomize build deploy/k8s/overlays/prod | kubectl apply -f -",
        "docker compose run --rm broker rigshift farm create",
        "enrollment_token",
        "not been built",
    ):
        assert fact.lower() in text.lower(), fact


def test_every_deploy_path_mentioned_exists() -> None:
    paths = set(re.findall(r"`(deploy/[^`\s]+)`", _text())) - USER_FILES
    assert paths
    for path in paths:
        for expanded in _expand_braces(path.rstrip("/")):
            assert (ROOT / expanded).exists(), expanded


def _expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [
        p
        for option in m.group(1).split(",")
        for p in _expand_braces(path[: m.start()] + option + path[m.end() :])
    ]
