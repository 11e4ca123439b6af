"""``rigshift agent doctor``: is this rig ready to run the agent? One line per check.

Each check returns a :class:`Finding` (check, PASS/WARN/FAIL, what it found, the fix)
and never raises; :func:`run_checks` runs them in order::

    config   the TOML file loads as an AgentConfig, and only its owner can read it
    gpu      NVML answers (driver, GPUs), or says why not; --simulate is reported as such
    power    every GPU's power read twice, values plausible for its power limit
    broker   gRPC health check over the channel the agent would use (plaintext or TLS)
    tls      TLS handshake verified with --tls-ca, or which plaintext this is
    ray      Ray importable in this Python, its version, token authentication possible
    shm      free /dev/shm for Ray's object store
    clock    skew against the broker's clock, and the kernel's NTP state (adjtimex)
    disk     free space where the agent keeps working directories and checkpoints

A FAIL means the agent would not work (or would register fake GPUs); a WARN is
worth knowing but does not stop it. ``rigshift agent doctor`` exits 1 on any FAIL.

Clock: the broker sends its clock (``rigshift-server-time``) in the initial metadata
of every gRPC health check, which has no side effects (a Heartbeat would bring a
stopped agent's worker back online). The doctor takes the midpoint of the round trip
as "now" here; the skew must stay under a few seconds (leases are 15 s, TLS
certificates and logs need the right time). Without a reachable broker only the
kernel's NTP state is checked.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

__all__ = ["DoctorInput", "Finding", "format_finding", "run_checks"]

Status = Literal["PASS", "WARN", "FAIL"]

GIB = 1 << 30
#: Under this much free disk the agent cannot hold a working directory (≤ 512 MiB) next to
#: its archive, a checkpoint (≤ 256 MiB) and the artifact cache.
DISK_FAIL_BYTES = 2 * GIB
#: Under this much, a few cached archives and checkpoints fill the disk.
DISK_WARN_BYTES = 10 * GIB
#: Ray's default object store is 30 % of the memory; it goes to /tmp when /dev/shm is smaller.
SHM_SHARE_OF_MEMORY = 0.30
#: A GPU reading above its power limit by more than this share is implausible.
POWER_OVER_LIMIT = 1.25


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's outcome."""

    check: str
    """Short name: gpu, power, broker, tls, ray, shm, clock, disk, config."""
    status: Status
    """PASS, WARN or FAIL."""
    finding: str
    """What was found, in one line."""
    fix: str = ""
    """What to do about a WARN or FAIL; empty on PASS."""


@dataclass(frozen=True, slots=True)
class DoctorInput:
    """What the doctor checks: the agent's settings as ``agent run`` would see them."""

    broker_address: str = ""
    """Broker ``host:port``; empty fails the broker check."""
    simulate: str = ""
    """Simulated GPU SPEC, as the agent's ``--simulate``."""
    tls_ca: Path | None = None
    """CA file to verify the broker's certificate with; None checks plaintext."""
    state_dir: Path = Path(".rigshift/agent")
    """The agent's state directory (working directories and checkpoints); AgentConfig's default."""
    ray_address: str = ""
    """A Ray cluster the agent joins instead of starting a local head."""
    config_path: Path | None = None
    """The TOML file the settings came from, when one was given."""
    config_error: str = ""
    """Why that file did not load (the config check FAILs with it)."""
    timeout_s: float = 5.0
    """Per network check."""


def format_finding(f: Finding) -> str:
    """``PASS  gpu: …``, and on WARN/FAIL with a fix a second line ``      fix: …``."""
    line = f"{f.status}  {f.check}: {f.finding}"
    if f.fix and f.status != "PASS":
        line += f"\n      fix: {f.fix}"
    return line


def findings_json(findings: list[Finding]) -> str:
    """The findings as a JSON list of {check, status, finding, fix}."""
    return json.dumps([asdict(f) for f in findings], indent=2)


# -- config ------------------------------------------------------------------------------


def check_config(inp: DoctorInput) -> Finding:
    """The config file loads, and nobody but its owner can read the token in it."""
    path = inp.config_path
    assert path is not None
    if inp.config_error:
        return Finding(
            "config",
            "FAIL",
            inp.config_error,
            f"correct {path} (keys are AgentConfig fields, docs/agent.md), or write it again "
            "with `rigshift agent install --force`; run the doctor as root or the agent's user",
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return Finding(
            "config",
            "WARN",
            f"{path} loads but is mode {mode:04o}: others can read the enrollment token",
            f"chmod 600 {path}",
        )
    return Finding("config", "PASS", f"{path} loads (broker {inp.broker_address}, mode 0600)")


# -- gpu and power -----------------------------------------------------------------------


def _nvml_reason(err: Exception) -> str:
    name = type(err).__name__
    if "LibraryNotFound" in name:
        return "no NVIDIA driver (libnvidia-ml not found)"
    if "DriverNotLoaded" in name:
        return "NVIDIA driver not loaded (libnvidia-ml found, kernel module not)"
    if "NoPermission" in name:
        return "no permission to open /dev/nvidia* (not in the video group?)"
    return f"NVML failed: {err}"


def _open_nvml() -> Any:
    from worker_agent.gpu import NvmlBackend

    return NvmlBackend()


def check_gpu(inp: DoctorInput, open_nvml: Callable[[], Any] = _open_nvml) -> tuple[Finding, Any]:
    """NVML's view of the rig, and the backend the agent would use (None when it has none)."""
    from worker_agent.gpu import SimulatedBackend

    try:
        nvml = open_nvml()
    except Exception as err:  # pynvml raises NVMLError_* subclasses, RuntimeError for 0 GPUs
        reason = _nvml_reason(err)
        if inp.simulate:
            return (
                Finding(
                    "gpu",
                    "WARN",
                    f"{reason}; the simulated backend would be used: {inp.simulate}",
                    "fine for a test rig; on a GPU rig install the NVIDIA driver "
                    "(nvidia-smi must list the GPUs) and drop `simulate` from the config",
                ),
                SimulatedBackend(inp.simulate),
            )
        return (
            Finding(
                "gpu",
                "FAIL",
                f"{reason}; the agent would fall back to simulated GPUs and sell GPUs "
                "this rig does not have",
                "install the NVIDIA driver so that `nvidia-smi` lists the GPUs (and add the "
                'agent\'s user to the video group), or set `simulate = "RTX3090x4"` '
                "for a test rig",
            ),
            None,
        )
    gpus = nvml.gpus()
    models = ", ".join(f"{g.index}: {g.model}" for g in gpus)
    if inp.simulate:
        nvml.close()
        return (
            Finding(
                "gpu",
                "WARN",
                f"NVML sees {len(gpus)} GPU(s) ({models}) but simulate={inp.simulate!r} is set: "
                "the agent would simulate instead",
                "drop `simulate` (--simulate) to offer the real GPUs",
            ),
            SimulatedBackend(inp.simulate),
        )
    return Finding("gpu", "PASS", f"NVML: {len(gpus)} GPU(s): {models}"), nvml


def check_power(backend: Any, interval_s: float = 0.5) -> Finding:
    """Power of every GPU read twice; each reading must lie in (0, 1.25 times the limit]."""
    if backend is None:
        return Finding(
            "power",
            "FAIL",
            "no readings: there is no GPU backend (see gpu)",
            "fix the gpu check first",
        )
    gpus = backend.gpus()
    readings: dict[int, list[float]] = {g.index: [] for g in gpus}
    try:
        for n in range(2):
            if n:
                time.sleep(interval_s)
            for g in gpus:
                readings[g.index].append(float(backend.power_watts(g.index)))
    except Exception as err:
        return Finding(
            "power", "FAIL", f"reading power failed: {err}", "check `nvidia-smi -q -d POWER`"
        )
    bad = [
        f"GPU {g.index} read {', '.join(f'{w:.1f}' for w in readings[g.index])} W "
        f"(limit {g.power_limit_watts} W)"
        for g in gpus
        if not all(0 < w <= g.power_limit_watts * POWER_OVER_LIMIT for w in readings[g.index])
    ]
    simulated = backend.name != "nvml"
    values = [w for ws in readings.values() for w in ws]
    span = f"{min(values):.1f} to {max(values):.1f} W"
    if bad:
        return Finding(
            "power",
            "WARN",
            f"implausible readings: {'; '.join(bad)}",
            "energy would be metered wrongly: check `nvidia-smi -q -d POWER` and the driver; "
            "a riser or PSU fault can also show this",
        )
    counters = sum(backend.energy_millijoules(g.index) is not None for g in gpus)
    what = "simulated values (a model, not a measurement)" if simulated else "measured"
    return Finding(
        "power",
        "PASS",
        f"{len(gpus)} GPU(s) read twice {interval_s:g} s apart: {span}, {what}; "
        f"energy counter on {counters} of {len(gpus)}",
    )


# -- broker and TLS ----------------------------------------------------------------------


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _broker_channel(inp: DoctorInput) -> Any:
    """The channel the agent would open: TLS with ``tls_ca`` when given (OSError if it
    cannot be read), else plaintext."""
    import grpc

    if inp.tls_ca is None:
        return grpc.insecure_channel(inp.broker_address)
    creds = grpc.ssl_channel_credentials(root_certificates=inp.tls_ca.read_bytes())
    return grpc.secure_channel(inp.broker_address, creds)


def check_broker(inp: DoctorInput) -> Finding:
    """The standard gRPC health check, on the channel the agent would open."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = inp.broker_address
    if ":" not in address:
        return Finding(
            "broker",
            "FAIL",
            f"no broker address (got {address!r})" if address else "no broker address given",
            "pass --broker HOST:PORT or --config /etc/rigshift/agent.toml",
        )
    try:
        channel = _broker_channel(inp)
    except OSError as err:
        return Finding("broker", "FAIL", f"cannot read --tls-ca: {err}", "pass a CA file")
    transport = "TLS" if inp.tls_ca is not None else "plaintext"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        t0 = time.monotonic()
        try:
            overall = stub.Check(health_pb2.HealthCheckRequest(), timeout=inp.timeout_s)
            rtt_ms = (time.monotonic() - t0) * 1000
            worker = stub.Check(
                health_pb2.HealthCheckRequest(service="rigshift.v1.WorkerService"),
                timeout=inp.timeout_s,
            )
        except grpc.RpcError as err:
            return _broker_error(address, err, transport, inp.timeout_s)
    serving = health_pb2.HealthCheckResponse.SERVING
    if overall.status != serving or worker.status != serving:
        return Finding(
            "broker",
            "FAIL",
            f"{address} answers but WorkerService is "
            f"{health_pb2.HealthCheckResponse.ServingStatus.Name(worker.status)}",
            "the broker is starting or shutting down; check its log and try again",
        )
    return Finding(
        "broker",
        "PASS",
        f"{address} serving (gRPC health check over {transport}, {rtt_ms:.0f} ms round trip)",
    )


def _broker_error(address: str, err: Any, transport: str, timeout_s: float) -> Finding:
    import grpc

    code = err.code()
    details = (err.details() or "").strip()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Finding(
            "broker",
            "FAIL",
            f"{address} speaks gRPC but has no health service: not a Rigshift broker",
            "check the address and port (`rigshift broker serve` prints its listening address)",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        finding = f"no answer from {address} within {timeout_s:g} s ({transport})"
    else:
        finding = f"cannot reach {address} over {transport}: {code.name}: {details}"
    fix = (
        "check that the broker runs and listens on that address (`rigshift broker serve "
        "--listen 0.0.0.0:PORT`), that this rig can open outbound TCP to it (firewall, NAT), "
        "and that broker_address in the config is right"
    )
    if transport == "plaintext":
        fix += "; if the broker serves TLS, pass --tls-ca FILE"
    return Finding("broker", "FAIL", finding, fix)


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    import ipaddress

    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_tls(inp: DoctorInput) -> Finding:
    """A TLS handshake verified with --tls-ca; without one, say which plaintext this is."""
    if ":" not in inp.broker_address:
        return Finding("tls", "WARN", "skipped: no broker address", "pass --broker HOST:PORT")
    host, port = _split(inp.broker_address)
    if inp.tls_ca is None:
        if _is_loopback(host):
            return Finding("tls", "PASS", f"plaintext to {host} (loopback: nothing on the wire)")
        return Finding(
            "tls",
            "WARN",
            f"plaintext to {host}: the enrollment token, worker credential and job data "
            "cross the network unencrypted",
            "serve the broker with --tls-cert/--tls-key and give the agent its CA "
            "(tls_ca in agent.toml, --tls-ca here)",
        )
    context = ssl.create_default_context(cafile=None)
    try:
        context.load_verify_locations(cafile=str(inp.tls_ca))
    except (OSError, ssl.SSLError) as err:
        return Finding("tls", "FAIL", f"cannot load --tls-ca {inp.tls_ca}: {err}", "pass a PEM CA")
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=inp.timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            version = tls.version()
            cert = tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as err:
        return Finding(
            "tls",
            "FAIL",
            f"{host}:{port}'s certificate is not trusted by {inp.tls_ca}: {err.verify_message}",
            "pass the CA that signed the broker's certificate, and connect by a name the "
            "certificate lists",
        )
    except ssl.SSLError as err:
        return Finding(
            "tls",
            "FAIL",
            f"no TLS handshake with {host}:{port}: {err.reason or err}",
            "the broker serves plaintext: drop --tls-ca, or start it with --tls-cert/--tls-key",
        )
    except OSError as err:
        return Finding(
            "tls", "FAIL", f"cannot connect to {host}:{port}: {err}", "see the broker check"
        )
    not_after = cert.get("notAfter")
    days = ""
    if isinstance(not_after, str):
        left = ssl.cert_time_to_seconds(not_after) - time.time()
        days = f", certificate valid {left / 86400:.0f} more day(s)"
    found = f"{version} handshake with {host}:{port} verified with {inp.tls_ca}{days}"
    return Finding("tls", "PASS", found)


# -- ray and shm -------------------------------------------------------------------------

_RAY_PROBE = """
import json, sys
try:
    import ray
except Exception as err:
    print(json.dumps({"error": f"{type(err).__name__}: {err}"})); sys.exit(0)
out = {"version": ray.__version__}
try:
    from ray._private.authentication import authentication_utils as u
    out["token_auth"] = bool(u.is_token_auth_enabled())
except Exception as err:
    out["token_auth_error"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


def check_ray(inp: DoctorInput, python: str = sys.executable) -> Finding:
    """Ray in the agent's Python: importable, version, token authentication can be switched on.

    Probed in a child process with ``RAY_AUTH_MODE=token`` and a throwaway token file,
    the way the agent starts its local head; no Ray process is started.
    """
    fix_install = f"{python} -m pip install 'ray[default]>=2.40'"
    with tempfile.TemporaryDirectory() as tmp:
        token = Path(tmp) / "ray_auth_token"
        token.write_text("0" * 64)
        token.chmod(0o600)
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
        }
        env.pop("RAY_AUTH_TOKEN", None)
        try:
            out = subprocess.run(
                [python, "-c", _RAY_PROBE],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            probe = json.loads(out.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, OSError, ValueError, IndexError) as err:
            return Finding("ray", "FAIL", f"probing Ray failed: {err}", fix_install)
    if "error" in probe:
        return Finding("ray", "FAIL", f"Ray not importable: {probe['error']}", fix_install)
    version = probe["version"]
    where = f"joins {inp.ray_address} (not contacted)" if inp.ray_address else "local head"
    if not probe.get("token_auth"):
        why = probe.get("token_auth_error", "RAY_AUTH_MODE=token is not honoured")
        return Finding(
            "ray",
            "FAIL",
            f"ray {version}: token authentication cannot be enabled ({why})",
            f"upgrade Ray: {python} -m pip install -U 'ray[default]>=2.40'",
        )
    return Finding(
        "ray",
        "PASS",
        f"ray {version} importable; token authentication can be enabled; {where}",
    )


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_shm(shm: Path = Path("/dev/shm"), memory_bytes: int | None = None) -> Finding:
    """Ray's object store wants 30 % of the memory in /dev/shm (else it falls back to /tmp)."""
    memory = _memory_bytes() if memory_bytes is None else memory_bytes
    want = int(memory * SHM_SHARE_OF_MEMORY)
    try:
        free = shutil.disk_usage(shm).free
    except OSError as err:
        return Finding(
            "shm",
            "WARN",
            f"{shm} unusable ({err}): Ray would keep its object store in /tmp (slower)",
            "mount a tmpfs on /dev/shm",
        )
    found = f"{free / GIB:.1f} GiB free in {shm} (Ray's object store wants {want / GIB:.1f} GiB)"
    if free < want:
        return Finding(
            "shm",
            "WARN",
            found + ": Ray would fall back to /tmp (slower)",
            f"mount -o remount,size={max(1, -(-want // GIB))}G {shm} (in a container: --shm-size)",
        )
    return Finding("shm", "PASS", found)


# -- clock -------------------------------------------------------------------------------

_TIME_ERROR = 5
_STA_UNSYNC = 0x0040


def read_adjtimex() -> tuple[int, int, int, int]:
    """(state, status flags, max error µs, estimated error µs) from the kernel (read-only).

    ``struct timex`` on 64-bit Linux: ``modes`` (int, padded), then ``offset``,
    ``freq``, ``maxerror``, ``esterror`` (long), then ``status`` (int). ``modes = 0``
    only reads; no privilege needed.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(512)
    state = libc.adjtimex(buf)
    if state < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    _modes, _offset, _freq, maxerror, esterror, status = struct.unpack_from("=I4xqqqqi", buf.raw)
    return state, status, maxerror, esterror


#: Clock skew against the broker above which the clock check WARNs, and FAILs.
SKEW_WARN_S = 2.0
SKEW_FAIL_S = 30.0


def broker_clock_offset(inp: DoctorInput) -> float | None:
    """Broker clock minus this rig's, in seconds, from one health check; None if unknown."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ":" not in inp.broker_address:
        return None
    try:
        channel = _broker_channel(inp)
    except OSError:
        return None
    with channel:
        before = time.time()
        try:
            _, call = health_pb2_grpc.HealthStub(channel).Check.with_call(
                health_pb2.HealthCheckRequest(), timeout=inp.timeout_s
            )
        except grpc.RpcError:
            return None
        after = time.time()
    for key, value in call.initial_metadata() or ():
        if key == "rigshift-server-time":
            try:
                return float(value) - (before + after) / 2
            except ValueError:
                return None
    return None  # an older broker: it does not send its time


def check_clock(
    read: Callable[[], tuple[int, int, int, int]] = read_adjtimex,
    offset_s: float | None = None,
) -> Finding:
    """The broker's clock against this rig's (``offset_s``) and the kernel's NTP state."""
    fix = (
        "enable time synchronisation: `timedatectl set-ntp true` (systemd-timesyncd) "
        "or install chrony"
    )
    if offset_s is None:
        note = "broker clock not compared (broker not reachable)"
    else:
        note = f"broker clock {offset_s:+.3f} s from this rig's"
        if abs(offset_s) > SKEW_WARN_S:
            return Finding(
                "clock",
                "FAIL" if abs(offset_s) > SKEW_FAIL_S else "WARN",
                f"this rig's clock is {abs(offset_s):.1f} s "
                f"{'behind' if offset_s > 0 else 'ahead of'} the broker's",
                fix,
            )
    if sys.platform != "linux" or struct.calcsize("P") != 8:
        return Finding("clock", "WARN", f"cannot read the NTP state here; {note}", fix)
    try:
        state, status, maxerror, esterror = read()
    except (OSError, AttributeError) as err:
        return Finding("clock", "WARN", f"adjtimex failed ({err}); {note}", fix)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if state == _TIME_ERROR or status & _STA_UNSYNC:
        return Finding(
            "clock",
            "WARN",
            f"the kernel marks the clock unsynchronised (no NTP discipline; now {now}), so "
            f"its drift is unbounded; {note}",
            fix,
        )
    return Finding(
        "clock",
        "PASS",
        f"NTP-synchronised (estimated error {esterror / 1000:.1f} ms, "
        f"max {maxerror / 1000:.1f} ms; now {now}); {note}",
    )


# -- disk --------------------------------------------------------------------------------


def check_disk(state_dir: Path, usage: Callable[[Path], Any] = shutil.disk_usage) -> Finding:
    """Free space on the filesystem that holds (or will hold) the agent's state directory."""
    path = state_dir.absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = usage(probe).free
    except OSError as err:
        return Finding("disk", "FAIL", f"cannot stat {probe}: {err}", "check the filesystem")
    where = str(path) if probe == path else f"{path} (not created yet; {probe})"
    found = f"{free / GIB:.1f} GiB free for {where}"
    fix = (
        "free space there or point state_dir at a larger disk; attempts need up to 512 MiB "
        "of working directory and 256 MiB of checkpoint each"
    )
    if free < DISK_FAIL_BYTES:
        return Finding("disk", "FAIL", found + f" (< {DISK_FAIL_BYTES // GIB} GiB)", fix)
    if free < DISK_WARN_BYTES:
        return Finding("disk", "WARN", found + f" (< {DISK_WARN_BYTES // GIB} GiB)", fix)
    if probe == path and not os.access(path, os.W_OK):
        return Finding(
            "disk",
            "WARN",
            found + f"; not writable by uid {os.geteuid()} (fine if the agent runs as its owner)",
            f"run the doctor as the agent's user, or chown that user {path}",
        )
    return Finding("disk", "PASS", found)


# -- all ---------------------------------------------------------------------------------


def run_checks(
    inp: DoctorInput,
    *,
    open_nvml: Callable[[], Any] = _open_nvml,
    on_finding: Callable[[Finding], None] | None = None,
) -> list[Finding]:
    """Every check, in order; ``on_finding`` sees each as soon as it is known."""
    findings: list[Finding] = []

    def add(f: Finding) -> None:
        findings.append(f)
        if on_finding is not None:
            on_finding(f)

    if inp.config_path is not None:
        add(check_config(inp))
    gpu, backend = check_gpu(inp, open_nvml)
    add(gpu)
    try:
        add(check_power(backend))
    finally:
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.close()
    add(check_broker(inp))
    add(check_tls(inp))
    add(check_ray(inp))
    add(check_shm())
    add(check_clock(offset_s=broker_clock_offset(inp)))
    add(check_disk(inp.state_dir))
    return findings
