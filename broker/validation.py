"""Request validation: every field of every request, before anything changes.

Each ``check_*`` function returns clean core values or raises ``InvalidArgument``
with one ``FieldViolation`` per bad field (``google.rpc.BadRequest`` on the wire).
"""

from __future__ import annotations

import json
import math
import re

from broker.economics import FarmTerms, PowerPolicy, TariffWindow, floor_price
from broker.errors import FailedPrecondition, FieldViolation, InvalidArgument
from broker.model import GpuInfo, JobSpec, Tier
from broker.requirements import Requirements, RequirementsError, parse_requirements
from rigshift.units import format_usd
from rigshift.v1 import farm_pb2, job_pb2, worker_service_pb2

__all__ = [
    "LIMITS",
    "check_farm",
    "check_gpus",
    "check_image",
    "check_job_spec",
    "check_page",
    "check_registry_auth",
    "check_request_id",
    "parse_name",
]

LIMITS = {
    "command_args": 256,
    "arg_chars": 4096,
    "env_vars": 128,
    "env_chars": 8192,
    "gpu_count": 64,
    "max_attempts": 20,
    "string_chars": 256,
    "request_id_chars": 64,
    "page_size": 1000,
    "gpus_per_worker": 64,
    "price_micros_per_gpu_hour": 1_000_000_000,  # $1000 per GPU-hour
    "max_duration_seconds": 30 * 86400,
    "inputs": 16,
    "image_chars": 512,
    "registry_auth_bytes": 64 * 1024,
    # topology and score minimums: beyond these no rig could ever match (PCIe 6.0 x16
    # moves about 121 GB/s one way)
    "min_pcie_gbps": 256,
    "min_host_ram_gb_per_gpu": 4096,
    "min_cpu_cores_per_gpu": 1024,
    "min_score": 100_000,
}
ID_RE = _ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# OCI image references (distribution/reference): [registry[:port]/]path[:tag][@digest]
_DOMAIN_PART = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_REGISTRY = re.compile(rf"^{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]{{1,5}})?$")
_PATH_PART = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def _raise(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument.of(violations)


def parse_name(name: str, collection: str, field: str = "name") -> str:
    """``jobs/abc`` (or a bare ``abc``) -> ``abc``; InvalidArgument when malformed."""
    prefix = collection + "/"
    ident = name[len(prefix) :] if name.startswith(prefix) else name
    if not _ID.match(ident):
        raise InvalidArgument.of(
            [FieldViolation(field, f"must be {collection}/ID (got {name[:80]!r})")]
        )
    return ident


def check_request_id(request_id: str) -> str:
    """An optional idempotency key: printable, at most 64 characters."""
    if len(request_id) > LIMITS["request_id_chars"] or not request_id.isprintable():
        raise InvalidArgument.of(
            [FieldViolation("request_id", "must be at most 64 printable characters")]
        )
    return request_id


def _in_range(v: list[FieldViolation], field: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        v.append(FieldViolation(field, f"must be between {lo} and {hi} (got {value})"))


def _text(v: list[FieldViolation], field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        v.append(FieldViolation(field, f"must be at most {limit} characters (got {len(value)})"))
    elif "\x00" in value:
        v.append(FieldViolation(field, "must not contain NUL characters"))


def _decimal(v: list[FieldViolation], field: str, value: float, limit: int) -> int:
    """A non-negative finite decimal of at most ``limit``, in thousandths (0 when bad)."""
    if not math.isfinite(value) or not 0 <= value <= limit:
        v.append(FieldViolation(field, f"must be a number between 0 and {limit} (got {value})"))
        return 0
    return round(value * 1000)


def check_job_spec(spec: job_pb2.JobSpec, default_max_attempts: int) -> JobSpec:
    """Validate a JobSpec message and return the core JobSpec (defaults filled in)."""
    v: list[FieldViolation] = []
    command = list(spec.command)
    if not command or not command[0].strip():
        v.append(FieldViolation("spec.command", "must name a program to run"))
    if len(command) > LIMITS["command_args"]:
        v.append(FieldViolation("spec.command", f"at most {LIMITS['command_args']} arguments"))
    for i, arg in enumerate(command[: LIMITS["command_args"]]):
        _text(v, f"spec.command[{i}]", arg, LIMITS["arg_chars"])
    if len(spec.env) > LIMITS["env_vars"]:
        v.append(FieldViolation("spec.env", f"at most {LIMITS['env_vars']} variables"))
    for key, value in sorted(spec.env.items())[: LIMITS["env_vars"]]:
        if not _ENV_KEY.match(key) or len(key) > LIMITS["string_chars"]:
            v.append(FieldViolation(f"spec.env[{key[:40]!r}]", "not a valid variable name"))
        elif key.startswith("RIGSHIFT_"):
            v.append(FieldViolation(f"spec.env[{key!r}]", "RIGSHIFT_* is set by the agent"))
        _text(v, f"spec.env[{key[:40]!r}]", value, LIMITS["env_chars"])
    _in_range(v, "spec.gpu_count", spec.gpu_count, 1, LIMITS["gpu_count"])
    _text(v, "spec.gpu_model", spec.gpu_model, LIMITS["string_chars"])
    _in_range(v, "spec.min_vram_mb", spec.min_vram_mb, 0, 1 << 30)
    _in_range(
        v,
        "spec.max_price_micros_per_gpu_hour",
        spec.max_price_micros_per_gpu_hour,
        0,
        LIMITS["price_micros_per_gpu_hour"],
    )
    _in_range(
        v, "spec.max_duration_seconds", spec.max_duration_seconds, 0, LIMITS["max_duration_seconds"]
    )
    if spec.working_dir_sha256 and not _SHA256.match(spec.working_dir_sha256):
        v.append(FieldViolation("spec.working_dir_sha256", "must be 64 lowercase hex digits"))
    _in_range(v, "spec.max_attempts", spec.max_attempts, 0, LIMITS["max_attempts"])
    _text(v, "spec.display_name", spec.display_name, LIMITS["string_chars"])
    if spec.tier not in job_pb2.Tier.values():
        v.append(FieldViolation("spec.tier", f"unknown tier {spec.tier}"))
    image_problem = check_image(spec.environment.image)
    if image_problem:
        v.append(FieldViolation("spec.environment.image", image_problem))
    requirements = Requirements(())
    try:
        requirements = parse_requirements(spec.environment.python_requirements)
    except RequirementsError as err:
        v.append(FieldViolation("spec.environment.python_requirements", str(err)))
    if len(spec.inputs) > LIMITS["inputs"]:
        v.append(FieldViolation("spec.inputs", f"at most {LIMITS['inputs']} inputs"))
    for name, sha256 in sorted(spec.inputs.items())[: LIMITS["inputs"]]:
        if not _ID.match(name) or name in (".", ".."):
            v.append(
                FieldViolation(
                    f"spec.inputs[{name[:40]!r}]", "name must be 1-64 of letters, digits, `_.-`"
                )
            )
        if not _SHA256.match(sha256):
            v.append(FieldViolation(f"spec.inputs[{name[:40]!r}]", "must be 64 lowercase hex"))
    min_pcie_mbps = _decimal(v, "spec.min_pcie_gbps", spec.min_pcie_gbps, LIMITS["min_pcie_gbps"])
    min_cpu = _decimal(
        v, "spec.min_cpu_cores_per_gpu", spec.min_cpu_cores_per_gpu, LIMITS["min_cpu_cores_per_gpu"]
    )
    _in_range(
        v,
        "spec.min_host_ram_gb_per_gpu",
        spec.min_host_ram_gb_per_gpu,
        0,
        LIMITS["min_host_ram_gb_per_gpu"],
    )
    _in_range(v, "spec.min_score", spec.min_score, 0, LIMITS["min_score"])
    _raise(v)
    tier = Tier.SPOT if spec.tier == job_pb2.SPOT else Tier.GUARANTEED
    return JobSpec(
        command=tuple(command),
        env=tuple(sorted(spec.env.items())),
        gpu_count=spec.gpu_count,
        gpu_model=spec.gpu_model.strip(),
        min_vram_mb=spec.min_vram_mb,
        max_price_micros_per_gpu_hour=spec.max_price_micros_per_gpu_hour,
        max_duration_seconds=spec.max_duration_seconds,
        working_dir_sha256=spec.working_dir_sha256,
        max_attempts=spec.max_attempts or default_max_attempts,
        display_name=spec.display_name,
        tier=tier,
        python_requirements=requirements.text,
        requirements_sha256=requirements.sha256,
        inputs=tuple(sorted(spec.inputs.items())),
        image=spec.environment.image,
        min_pcie_mbps=min_pcie_mbps,
        min_host_ram_gb_per_gpu=spec.min_host_ram_gb_per_gpu,
        min_cpu_millicores_per_gpu=min_cpu,
        min_score=spec.min_score,
        allow_unverified=spec.allow_unverified,
    )


def check_image(ref: str) -> str:
    """What is wrong with an OCI image reference ``[registry[:port]/]path[:tag][@sha256:<hex>]``,
    or "" when nothing is (an empty reference means no image)."""
    if not ref:
        return ""
    if len(ref) > LIMITS["image_chars"]:
        return f"must be at most {LIMITS['image_chars']} characters (got {len(ref)})"
    if any(c.isspace() or not c.isprintable() for c in ref):
        return "must not contain whitespace or control characters"
    name, at, digest = ref.partition("@")
    if at and not _DIGEST.match(digest):
        return f"digest {digest[:80]!r} must be sha256: and 64 lowercase hex digits"
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.match(tag):
            return (
                f"tag {tag[:80]!r} must be 1-128 of letters, digits, `_.-`, "
                "not starting with `.` or `-`"
            )
    parts = name.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        if not _REGISTRY.match(first):
            return f"registry {first[:80]!r} must be a host name or address with an optional :port"
        parts = parts[1:]
    for part in parts:
        if not _PATH_PART.match(part):
            return (
                f"path component {part[:80]!r} must be lower-case letters and digits, "
                "separated by one `.`, one or two `_` or dashes"
            )
    if len(parts) == 1 and _SHA256.match(parts[0]):
        return "must not be 64 hex digits (that is an image id, not a reference)"
    return ""


def check_registry_auth(auth: bytes, image: str) -> None:
    """Registry credentials of CreateJob: only with an image, at most 64 KiB, a containers
    auth file (a JSON object with an ``auths`` object). Never quotes the content."""
    if not auth:
        return
    problem = ""
    limit = LIMITS["registry_auth_bytes"]
    if not image:
        problem = "is allowed only with spec.environment.image"
    elif len(auth) > limit:
        problem = f"must be at most {limit} bytes (got {len(auth)})"
    else:
        try:
            doc = json.loads(auth.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("auths"), dict):
            problem = 'must be a JSON object (UTF-8) with an "auths" object'
    if problem:
        raise InvalidArgument.of([FieldViolation("registry_auth", problem)])


FARM_FIELDS = (
    "display_name",
    "region",
    "tariff_micros_per_kwh",
    "pue_permille",
    "mining_micros_per_kwh",
    "ask_micros_per_gpu_hour",
    "broker_fee_permille",
    "margin_micros_per_gpu_hour",
    "tariff_windows",
    "power_policy",
    "max_slowdown_percent",
    "demand_response_micros_per_mwh",
)


def check_farm(farm: farm_pb2.Farm, fields: tuple[str, ...] = FARM_FIELDS) -> None:
    """Validate the given fields of a farm (all of them on create)."""
    v: list[FieldViolation] = []
    if "display_name" in fields:
        if not farm.display_name.strip():
            v.append(FieldViolation("farm.display_name", "is required"))
        _text(v, "farm.display_name", farm.display_name, 128)
    if "region" in fields:
        _text(v, "farm.region", farm.region, 64)
    if "tariff_micros_per_kwh" in fields:
        _in_range(v, "farm.tariff_micros_per_kwh", farm.tariff_micros_per_kwh, 0, 100_000_000)
    if "pue_permille" in fields and farm.pue_permille:
        _in_range(v, "farm.pue_permille", farm.pue_permille, 1000, 5000)
    if "broker_fee_permille" in fields:
        _in_range(v, "farm.broker_fee_permille", farm.broker_fee_permille, 0, 1000)
    if "margin_micros_per_gpu_hour" in fields:
        hi = LIMITS["price_micros_per_gpu_hour"]
        _in_range(v, "farm.margin_micros_per_gpu_hour", farm.margin_micros_per_gpu_hour, 0, hi)
    for name in ("mining_micros_per_kwh", "ask_micros_per_gpu_hour"):
        if name not in fields:
            continue
        table = getattr(farm, name)
        if len(table) > 64:
            v.append(FieldViolation(f"farm.{name}", "at most 64 GPU models"))
        for model, micros in sorted(table.items())[:64]:
            if not model.strip() or len(model) > 64:
                v.append(FieldViolation(f"farm.{name}[{model[:40]!r}]", "not a GPU model name"))
            _in_range(v, f"farm.{name}[{model!r}]", micros, 0, LIMITS["price_micros_per_gpu_hour"])
    if "tariff_windows" in fields:
        if len(farm.tariff_windows) > 24:
            v.append(FieldViolation("farm.tariff_windows", "at most 24 windows"))
        for i, w in enumerate(farm.tariff_windows[:24]):
            _in_range(v, f"farm.tariff_windows[{i}].start_hour", w.start_hour, 0, 23)
            _in_range(v, f"farm.tariff_windows[{i}].end_hour", w.end_hour, 1, 24)
            if w.start_hour == w.end_hour:
                v.append(FieldViolation(f"farm.tariff_windows[{i}]", "is empty (start == end)"))
            _in_range(v, f"farm.tariff_windows[{i}].micros_per_kwh", w.micros_per_kwh, 0, 10**8)
    _check_power(v, farm, fields)
    _raise(v)


def _check_power(v: list[FieldViolation], farm: farm_pb2.Farm, fields: tuple[str, ...]) -> None:
    """The power policy fields (issue 16): a known policy, a slowdown of 0-50 %, a
    demand-response price of at most $100,000 per MWh."""
    if "power_policy" in fields and farm.power_policy not in farm_pb2.PowerPolicy.values():
        v.append(FieldViolation("farm.power_policy", f"unknown policy {farm.power_policy}"))
    if "max_slowdown_percent" in fields:
        _in_range(v, "farm.max_slowdown_percent", farm.max_slowdown_percent, 0, 50)
    if "demand_response_micros_per_mwh" in fields:
        _in_range(
            v,
            "farm.demand_response_micros_per_mwh",
            farm.demand_response_micros_per_mwh,
            0,
            100_000 * 1_000_000,
        )


def terms_from(farm_id: str, farm: farm_pb2.Farm) -> FarmTerms:
    """FarmTerms from a (validated) Farm message."""
    return FarmTerms(
        farm_id=farm_id,
        tariff_micros_per_kwh=farm.tariff_micros_per_kwh,
        pue_permille=farm.pue_permille or 1000,
        broker_fee_permille=farm.broker_fee_permille,
        margin_micros_per_gpu_hour=farm.margin_micros_per_gpu_hour,
        mining_micros_per_kwh=tuple(sorted(farm.mining_micros_per_kwh.items())),
        ask_micros_per_gpu_hour=tuple(sorted(farm.ask_micros_per_gpu_hour.items())),
        tariff_windows=tuple(
            TariffWindow(w.start_hour, w.end_hour % 24, w.micros_per_kwh)
            for w in farm.tariff_windows
        ),
        power_policy=PowerPolicy.EFFICIENT
        if farm.power_policy == farm_pb2.POWER_POLICY_EFFICIENT
        else PowerPolicy.MAX,
        max_slowdown_percent=farm.max_slowdown_percent,
        demand_response_micros_per_mwh=farm.demand_response_micros_per_mwh,
    )


def check_asks(terms: FarmTerms, watts_by_model: dict[str, int]) -> None:
    """Refuse any ask under the floor price of its model, with the arithmetic."""
    v = []
    for model, ask in terms.ask_micros_per_gpu_hour:
        floor = floor_price(terms, model, watts_by_model.get(model))
        if ask < floor.floor_micros:
            v.append(
                FieldViolation(
                    f"farm.ask_micros_per_gpu_hour[{model!r}]",
                    f"ask {format_usd(ask)}/GPU-h is under the floor "
                    f"{format_usd(floor.floor_micros)} = max(energy "
                    f"{format_usd(floor.energy_cost_micros)}, mining "
                    f"{format_usd(floor.mining_micros)}) + margin "
                    f"{format_usd(terms.margin_micros_per_gpu_hour)} at {floor.watts} W",
                )
            )
    if v:
        raise FailedPrecondition(
            f"{v[0].field}: {v[0].description}", reason="ASK_UNDER_FLOOR", violations=v
        )


def check_gpus(gpus: list[worker_service_pb2.GpuInfo]) -> tuple[GpuInfo, ...]:
    """Validate the GPUs an agent registers with."""
    v: list[FieldViolation] = []
    if not gpus:
        v.append(FieldViolation("gpus", "at least one GPU is required"))
    if len(gpus) > LIMITS["gpus_per_worker"]:
        v.append(FieldViolation("gpus", f"at most {LIMITS['gpus_per_worker']} GPUs per worker"))
    seen: set[int] = set()
    for i, g in enumerate(gpus[: LIMITS["gpus_per_worker"]]):
        if g.index in seen:
            v.append(FieldViolation(f"gpus[{i}].index", f"duplicate index {g.index}"))
        seen.add(g.index)
        _in_range(v, f"gpus[{i}].index", g.index, 0, 255)
        if not g.model.strip():
            v.append(FieldViolation(f"gpus[{i}].model", "is required"))
        _text(v, f"gpus[{i}].model", g.model, 64)
        _text(v, f"gpus[{i}].uuid", g.uuid, 128)
        _in_range(v, f"gpus[{i}].vram_mb", g.vram_mb, 1, 1 << 30)
        _in_range(v, f"gpus[{i}].power_limit_watts", g.power_limit_watts, 0, 5000)
        _in_range(
            v,
            f"gpus[{i}].price_micros_per_gpu_hour",
            g.price_micros_per_gpu_hour,
            0,
            LIMITS["price_micros_per_gpu_hour"],
        )
        _in_range(v, f"gpus[{i}].pcie_link_width", g.pcie_link_width, 0, 32)
    _raise(v)
    return tuple(
        GpuInfo(
            g.index,
            g.uuid,
            g.model.strip(),
            g.vram_mb,
            g.power_limit_watts,
            g.price_micros_per_gpu_hour,
            g.pcie_link_width or 16,
        )
        for g in gpus
    )


def check_page(page_size: int, page_token: str) -> tuple[int, int]:
    """(limit, offset) from AIP-158 paging fields; tokens are opaque offsets."""
    v: list[FieldViolation] = []
    _in_range(v, "page_size", page_size, 0, LIMITS["page_size"])
    offset = 0
    if page_token:
        if not page_token.startswith("o") or not page_token[1:].isdigit():
            v.append(FieldViolation("page_token", "not a token this broker issued"))
        else:
            offset = int(page_token[1:])
    _raise(v)
    return page_size or 100, offset
