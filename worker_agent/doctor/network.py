"""The doctor's checks that talk to the broker: gRPC health, TLS, and the clock (skew
against the broker's, and the kernel's NTP state)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from worker_agent.doctor.findings import DoctorInput, Finding

__all__ = ["broker_clock_offset", "check_broker", "check_clock", "check_tls", "read_adjtimex"]


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
