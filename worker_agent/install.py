"""``rigshift agent install``: write the agent's config file and its systemd unit on a rig.

Two files, nothing else::

    /etc/rigshift/agent.toml                    AgentConfig fields (what `agent run --config`
                                                reads), mode 0600: it holds the enrollment token
    /etc/systemd/system/rigshift-agent.service  deploy/systemd/rigshift-agent.service with
                                                ExecStart, User and Group filled in

The unit text lives in one place, ``deploy/systemd/rigshift-agent.service``;
``worker_agent/rigshift-agent.service`` is a link to it so that it can be read as
a package resource. :func:`render_unit` changes only the ``ExecStart=``, ``User=``
and ``Group=`` lines, so with the defaults (``/opt/rigshift/bin/rigshift``, user
``rigshift``) the written unit is byte for byte the deploy file.

:func:`plan_install` is pure (text in, text out); :func:`write_install` is the
only function that touches the filesystem, and nothing here runs ``systemctl``:
the CLI does that only when asked (``--start``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = [
    "DEFAULT_CONFIG_DIR",
    "DEFAULT_EXECUTABLE",
    "DEFAULT_UNIT_DIR",
    "DEFAULT_USER",
    "UNIT_NAME",
    "InstallError",
    "InstallPlan",
    "find_executable",
    "mask_token",
    "plan_install",
    "render_unit",
    "unit_template",
    "write_install",
]

UNIT_NAME = "rigshift-agent.service"
CONFIG_NAME = "agent.toml"
DEFAULT_CONFIG_DIR = Path("/etc/rigshift")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_USER = "rigshift"
#: Where the deploy unit expects the installed CLI (a venv in /opt/rigshift).
DEFAULT_EXECUTABLE = "/opt/rigshift/bin/rigshift"

#: Paths a unit with ProtectHome=yes / PrivateTmp=yes cannot see the real contents of.
_HIDDEN_FROM_SERVICE = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")


class InstallError(Exception):
    """The install cannot go ahead as asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class InstallPlan:
    """What ``rigshift agent install`` writes, fully rendered, before anything is written."""

    config_path: Path
    """The agent's TOML config (holds the enrollment token: written 0600)."""
    config_text: str
    """Its contents, token in clear."""
    token: str
    """The enrollment token, to mask it when the config is printed."""
    unit_path: Path
    """The systemd unit file."""
    unit_text: str
    """Its contents."""
    user: str
    """The service's ``User=``; the config file is handed to this user when run as root."""
    executable: str
    """The ``rigshift`` executable ``ExecStart=`` runs."""
    warnings: tuple[str, ...] = ()
    """Problems that do not stop the install (e.g. an executable the service cannot see)."""
    dropin_path: Path | None = None
    """With ``--containers``: the unit's drop-in that lets the service run podman."""
    dropin_text: str = ""
    """Its contents."""

    @property
    def masked_config_text(self) -> str:
        """The config with the token hidden, for printing."""
        return self.config_text.replace(self.token, mask_token(self.token))


def mask_token(token: str) -> str:
    """``rsft_AbC…`` → ``rsft_********``: the prefix says what it is, the secret stays hidden."""
    prefix = token.split("_", 1)[0] + "_" if "_" in token[:8] else ""
    return prefix + "*" * 8


def unit_template() -> str:
    """The unit text: deploy/systemd/rigshift-agent.service, read as a package resource."""
    # Next to this module (not importlib.resources: Python 3.11's reader fails on
    # setuptools' editable installs).
    try:
        return Path(__file__).with_name(UNIT_NAME).read_text()
    except OSError as err:
        raise InstallError(
            f"the systemd unit template is missing from this installation ({err}); "
            "reinstall rigshift from a checkout or wheel that includes it"
        ) from err


def _replace_line(text: str, key: str, value: str) -> str:
    pattern = re.compile(rf"^{key}=.*$", re.MULTILINE)
    new, count = pattern.subn(lambda _m: f"{key}={value}", text)
    if count != 1:
        raise InstallError(f"the unit template has {count} {key}= lines, expected exactly 1")
    return new


def _unit_value(text: str, key: str) -> str:
    match = re.search(rf"^{key}=(.*)$", text, re.MULTILINE)
    if match is None:
        raise InstallError(f"the unit template has no {key}= line")
    return match.group(1).strip()


def render_unit(template: str, *, executable: str, config_path: Path, user: str) -> str:
    """The template with ExecStart, User and Group set; every other line unchanged."""
    for what, value in (("executable", executable), ("config path", str(config_path))):
        if re.search(r"[\s\"'\\%$]", value):
            raise InstallError(f"the {what} {value!r} contains characters systemd would rewrite")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", user):
        raise InstallError(f"--user {user!r} is not a valid system user name")
    text = _replace_line(template, "ExecStart", f"{executable} agent run --config {config_path}")
    text = _replace_line(text, "User", user)
    return _replace_line(text, "Group", user)


def state_dir_of(unit_text: str) -> Path:
    """The agent's state directory inside the unit's ``StateDirectory=`` (/var/lib/rigshift)."""
    name = _unit_value(unit_text, "StateDirectory").split()[0]
    return Path("/var/lib") / name / "agent"


def find_executable() -> str:
    """The installed ``rigshift`` to put in ExecStart (absolute path).

    The command running now when it is ``rigshift`` itself (``sys.argv[0]``), else
    the ``rigshift`` next to this Python (the same virtualenv), else the one on PATH.
    """
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    candidates = []
    if argv0 is not None and argv0.name == "rigshift":
        candidates.append(argv0)
    candidates.append(Path(sys.executable).parent / "rigshift")
    on_path = shutil.which("rigshift")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate.absolute())
    raise InstallError(
        "cannot find the installed `rigshift` executable; install rigshift into "
        "/opt/rigshift (python3.11 -m venv /opt/rigshift && /opt/rigshift/bin/pip install "
        "rigshift) and run /opt/rigshift/bin/rigshift agent install"
    )


CONTAINERS_DROPIN = """\
# Written by `rigshift agent install --containers`: the shipped unit is hardened for
# process jobs and forbids what podman needs. Rootless podman (the service's User=)
# creates user namespaces and maps ids through the set-uid newuidmap/newgidmap, which
# need the subordinate ids of `usermod --add-subuids ... --add-subgids ...`.
[Service]
RestrictNamespaces=no
NoNewPrivileges=no
RestrictSUIDSGID=no
CapabilityBoundingSet=CAP_SETUID CAP_SETGID
"""
"""The drop-in ``agent install --containers`` writes beside the unit (``containers.conf``)."""


def _toml_string(value: str) -> str:
    # A JSON string (ASCII, \" \\ \uXXXX escapes) is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def render_config(
    *,
    broker_address: str,
    token: str,
    state_dir: Path,
    simulate: str = "",
    metrics_listen: str = "",
    tls_ca: Path | None = None,
    containers: bool = False,
) -> str:
    """The TOML file `rigshift agent run --config` reads (AgentConfig field names)."""
    lines = [
        "# Rigshift worker agent: written by `rigshift agent install`.",
        "# Keys are AgentConfig fields (docs/agent.md); `rigshift agent doctor` checks this file.",
        f"broker_address = {_toml_string(broker_address)}",
        f"enrollment_token = {_toml_string(token)}",
        f"state_dir = {_toml_string(str(state_dir))}",
    ]
    if simulate:
        lines.append(f"simulate = {_toml_string(simulate)}")
    if metrics_listen:
        lines.append(f"metrics_listen = {_toml_string(metrics_listen)}")
    if tls_ca is not None:
        lines.append(f"tls_ca = {_toml_string(str(tls_ca))}")
    if containers:  # a rig meant for image jobs: the agent refuses to start without podman
        lines += ["", "[containers]", 'enabled = "true"']
    return "\n".join(lines) + "\n"


def plan_install(
    *,
    broker_address: str,
    token: str,
    executable: str,
    simulate: str = "",
    tls_ca: Path | None = None,
    metrics_listen: str = "",
    config_dir: Path = DEFAULT_CONFIG_DIR,
    unit_dir: Path = DEFAULT_UNIT_DIR,
    user: str = DEFAULT_USER,
    template: str | None = None,
    containers: bool = False,
) -> InstallPlan:
    """Render both files and check them the way ``agent run`` will; writes nothing."""
    from worker_agent.config import AgentConfig, ConfigError
    from worker_agent.gpu import parse_spec

    if not token:
        raise InstallError("--token is required (`rigshift farm create` prints the farm's token)")
    if not executable.startswith("/"):
        raise InstallError(f"ExecStart needs an absolute path, got {executable!r}")
    config_path = config_dir / CONFIG_NAME
    unit_text = render_unit(
        unit_template() if template is None else template,
        executable=executable,
        config_path=config_path,
        user=user,
    )
    state_dir = state_dir_of(unit_text)
    try:
        if simulate:
            parse_spec(simulate)
        AgentConfig(
            broker_address=broker_address,
            enrollment_token=token,
            state_dir=state_dir,
            simulate=simulate,
            metrics_listen=metrics_listen,
        )
    except (ConfigError, ValueError) as err:
        raise InstallError(str(err)) from err
    config_text = render_config(
        broker_address=broker_address,
        token=token,
        state_dir=state_dir,
        simulate=simulate,
        metrics_listen=metrics_listen,
        tls_ca=tls_ca.absolute() if tls_ca is not None else None,
        containers=containers,
    )
    warnings = []
    exe = PurePosixPath(executable)
    hidden = [p for p in _HIDDEN_FROM_SERVICE if exe.is_relative_to(p)]
    if hidden:
        warnings.append(
            f"ExecStart runs {executable}, but the unit's ProtectHome=yes/PrivateTmp=yes hide "
            f"{hidden[0]} from the service, so it would not start: install rigshift into "
            "/opt/rigshift (python3.11 -m venv /opt/rigshift && /opt/rigshift/bin/pip install "
            "rigshift) and run /opt/rigshift/bin/rigshift agent install"
        )
    return InstallPlan(
        config_path=config_path,
        config_text=config_text,
        token=token,
        unit_path=unit_dir / UNIT_NAME,
        unit_text=unit_text,
        user=user,
        executable=executable,
        warnings=tuple(warnings),
        dropin_path=unit_dir / f"{UNIT_NAME}.d" / "containers.conf" if containers else None,
        dropin_text=CONTAINERS_DROPIN if containers else "",
    )


def _write_atomic(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it; never widen beyond `mode`
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class InstallResult:
    """What :func:`write_install` did."""

    written: tuple[Path, ...]
    """The files written, config first."""
    config_owner: str | None
    """The user the config file was handed to, or None when it was left to the caller."""


def write_install(plan: InstallPlan, *, force: bool = False) -> InstallResult:
    """Write the config (0600) and the unit (0644); refuse to replace either unless ``force``.

    Run as root with an existing ``plan.user``, the config file is handed to that user
    (the service reads it after dropping to ``User=``).
    """
    paths = (plan.config_path, plan.unit_path, plan.dropin_path)
    existing = [p for p in paths if p is not None and p.exists()]
    if existing and not force:
        names = " and ".join(str(p) for p in existing)
        raise InstallError(
            f"{names} already exist{'s' if len(existing) == 1 else ''}; "
            "pass --force to replace (the old files are overwritten, not merged)"
        )
    _write_atomic(plan.config_path, plan.config_text, 0o600)
    owner = None
    if os.geteuid() == 0:
        import pwd

        try:
            entry = pwd.getpwnam(plan.user)
        except KeyError:
            pass
        else:
            os.chown(plan.config_path, entry.pw_uid, entry.pw_gid)
            owner = plan.user
    _write_atomic(plan.unit_path, plan.unit_text, 0o644)
    written = [plan.config_path, plan.unit_path]
    if plan.dropin_path is not None:
        _write_atomic(plan.dropin_path, plan.dropin_text, 0o644)
        written.append(plan.dropin_path)
    return InstallResult(written=tuple(written), config_owner=owner)


def user_exists(user: str) -> bool:
    """Whether the system knows this user name."""
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def next_steps(plan: InstallPlan, result: InstallResult | None) -> list[str]:
    """The commands an operator runs after the files are written, in order."""
    unit = plan.unit_path.name.removesuffix(".service")
    steps = []
    if not user_exists(plan.user):
        steps.append(
            f"useradd --system --home-dir /var/lib/rigshift --shell /usr/sbin/nologin {plan.user}"
        )
    if result is None or result.config_owner is None:
        steps.append(f"chown {plan.user}: {plan.config_path}")
    if plan.dropin_path is not None:  # rootless podman maps the container's ids to these
        steps.append(
            f"grep -q '^{plan.user}:' /etc/subuid || usermod --add-subuids 100000-165535 "
            f"--add-subgids 100000-165535 {plan.user}"
        )
    steps += [
        f"{plan.executable} agent doctor --config {plan.config_path}",
        f"systemctl daemon-reload && systemctl enable --now {unit}",
        f"journalctl -u {unit} -f",
    ]
    return steps
