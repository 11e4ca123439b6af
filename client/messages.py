"""Request messages built from Python values: pure functions, no I/O.

Resource names (``"abc"`` or ``"jobs/abc"``), tiers, the earnings grouping, the
JobSpec, a requirements file's text, the UpdateFarm request with its field mask,
and input names. Each raises :class:`client.errors.InvalidArgument` (with a
reason and field violations) for a value the broker would refuse anyway.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from google.protobuf import field_mask_pb2

from client.errors import InvalidArgument
from rigshift.v1 import farm_pb2, farm_service_pb2, job_pb2

__all__ = [
    "UPDATABLE_FARM_FIELDS",
    "build_update_farm_request",
    "check_input_name",
    "group_by_value",
    "job_spec",
    "requirements_text",
    "resource_name",
    "tariff_window_messages",
    "tier_value",
]

_INPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def resource_name(collection: str, value: str, what: str) -> str:
    """``"abc"`` or ``"jobs/abc"`` → ``"jobs/abc"``; anything else is an InvalidArgument."""
    value = value.strip()
    prefix = f"{collection}/"
    if value.startswith(prefix) and "/" not in value[len(prefix) :] and value != prefix:
        return value
    if value and "/" not in value:
        return prefix + value
    raise InvalidArgument(
        f"{what}: expected an id or '{collection}/{{id}}', got {value!r}",
        reason="INVALID_RESOURCE_NAME",
        field_violations=[(what, f"expected an id or '{collection}/{{id}}'")],
    )


def tier_value(tier: str | int) -> int:
    """``"guaranteed"``/``"spot"`` (any case) or a ``Tier`` value → the ``Tier`` value."""
    if isinstance(tier, int) and not isinstance(tier, bool):
        if tier in job_pb2.Tier.values():
            return tier
    elif isinstance(tier, str) and tier.strip().upper() in ("GUARANTEED", "SPOT"):
        return job_pb2.Tier.Value(tier.strip().upper())
    raise InvalidArgument(
        f"tier: expected 'guaranteed' or 'spot', got {tier!r}",
        reason="INVALID_TIER",
        field_violations=[("spec.tier", "expected 'guaranteed' or 'spot'")],
    )


_GROUP_BY = {
    "farm": farm_service_pb2.GetEarningsRequest.FARM,
    "worker": farm_service_pb2.GetEarningsRequest.WORKER,
    "gpu": farm_service_pb2.GetEarningsRequest.GPU,
}


def group_by_value(group_by: str) -> int:
    """``"farm"``, ``"worker"`` or ``"gpu"`` (any case) → ``GetEarningsRequest.GroupBy``."""
    value = _GROUP_BY.get(group_by.strip().lower()) if isinstance(group_by, str) else None
    if value is None:
        raise InvalidArgument(
            f"group_by: expected 'farm', 'worker' or 'gpu', got {group_by!r}",
            reason="INVALID_GROUP_BY",
            field_violations=[("group_by", "expected 'farm', 'worker' or 'gpu'")],
        )
    return value


def job_spec(
    command: Sequence[str],
    *,
    gpu_count: int = 1,
    gpu_model: str = "",
    min_vram_mb: int = 0,
    max_price_micros_per_gpu_hour: int = 0,
    env: Mapping[str, str] | None = None,
    working_dir_sha256: str = "",
    max_duration_seconds: int = 0,
    max_attempts: int = 0,
    display_name: str = "",
    tier: str | int = "guaranteed",
    inputs: Mapping[str, str] | None = None,
    python_requirements: str = "",
    image: str = "",
    min_pcie_gbps: float = 0.0,
    min_host_ram_gb_per_gpu: int = 0,
    min_cpu_cores_per_gpu: float = 0.0,
    min_score: int = 0,
    allow_unverified: bool = False,
) -> job_pb2.JobSpec:
    if isinstance(command, str):
        raise TypeError("command is an argv list, e.g. ['python', 'train.py'], not a str")
    return job_pb2.JobSpec(
        command=list(command),
        env=dict(env or {}),
        gpu_count=gpu_count,
        gpu_model=gpu_model,
        min_vram_mb=min_vram_mb,
        max_price_micros_per_gpu_hour=max_price_micros_per_gpu_hour,
        max_duration_seconds=max_duration_seconds,
        working_dir_sha256=working_dir_sha256,
        max_attempts=max_attempts,
        display_name=display_name,
        tier=cast(Any, tier_value(tier)),
        inputs=dict(inputs or {}),
        environment=job_pb2.Environment(python_requirements=python_requirements, image=image)
        if python_requirements or image
        else None,
        min_pcie_gbps=min_pcie_gbps,
        min_host_ram_gb_per_gpu=min_host_ram_gb_per_gpu,
        min_cpu_cores_per_gpu=min_cpu_cores_per_gpu,
        min_score=min_score,
        allow_unverified=allow_unverified,
    )


def registry_auth_bytes(auth: bytes | str | os.PathLike[str]) -> bytes:
    """Registry credentials for CreateJob: ``bytes`` are the auth file's content, a ``str`` or
    path names the file (e.g. ``${XDG_RUNTIME_DIR}/containers/auth.json`` after ``podman
    login``). The content is never put into an error."""
    if isinstance(auth, bytes):
        return auth
    try:
        return Path(auth).read_bytes()
    except OSError as err:
        raise InvalidArgument(
            f"registry auth: cannot read {str(auth)!r}: {err.strerror or err}",
            reason="BAD_REGISTRY_AUTH_FILE",
            field_violations=[("registry_auth", f"cannot read {str(auth)!r}")],
        ) from None


def requirements_text(
    requirements_file: str | os.PathLike[str] | None = None, pip: Sequence[str] = ()
) -> str:
    """A requirements file's text plus one line per extra spec (``--pip numpy==2.1``)."""
    text = ""
    if requirements_file is not None:
        try:
            text = Path(requirements_file).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidArgument(
                f"requirements: cannot read {str(requirements_file)!r}: {err}",
                reason="BAD_REQUIREMENTS_FILE",
                field_violations=[("spec.environment.python_requirements", str(err))],
            ) from None
        if text and not text.endswith("\n"):
            text += "\n"
    return text + "".join(f"{spec}\n" for spec in pip)


def tariff_window_messages(windows: Sequence[tuple[int, int, int]]) -> list[farm_pb2.TariffWindow]:
    return [
        farm_pb2.TariffWindow(start_hour=start, end_hour=end, micros_per_kwh=price)
        for start, end, price in windows
    ]


#: The Farm fields :meth:`Client.update_farm` can change, in mask order.
UPDATABLE_FARM_FIELDS = (
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


def build_update_farm_request(
    farm: str,
    *,
    region: str | None = None,
    tariff_micros_per_kwh: int | None = None,
    pue_permille: int | None = None,
    mining_micros_per_kwh: Mapping[str, int] | None = None,
    ask_micros_per_gpu_hour: Mapping[str, int] | None = None,
    broker_fee_permille: int | None = None,
    margin_micros_per_gpu_hour: int | None = None,
    tariff_windows: Sequence[tuple[int, int, int]] | None = None,
    power_policy: int | None = None,
    max_slowdown_percent: int | None = None,
    demand_response_micros_per_mwh: int | None = None,
) -> farm_service_pb2.UpdateFarmRequest:
    """The UpdateFarm request for ``farm``: its ``update_mask`` names exactly the fields not None.

    A field passed as ``0``, ``{}`` or ``()`` is in the mask, so the broker
    clears it; a map or the window list is replaced whole. Raises
    InvalidArgument when no field is given (an empty mask would mean "every
    set field" to the broker, which is never what a caller of this means).
    """
    values: dict[str, Any] = {
        "region": region,
        "tariff_micros_per_kwh": tariff_micros_per_kwh,
        "pue_permille": pue_permille,
        "mining_micros_per_kwh": mining_micros_per_kwh,
        "ask_micros_per_gpu_hour": ask_micros_per_gpu_hour,
        "broker_fee_permille": broker_fee_permille,
        "margin_micros_per_gpu_hour": margin_micros_per_gpu_hour,
        "tariff_windows": tariff_windows,
        "power_policy": power_policy,  # a rigshift.v1.PowerPolicy value
        "max_slowdown_percent": max_slowdown_percent,
        "demand_response_micros_per_mwh": demand_response_micros_per_mwh,
    }
    paths = [field for field in UPDATABLE_FARM_FIELDS if values[field] is not None]
    if not paths:
        raise InvalidArgument(
            "update_farm: nothing to update; pass at least one field",
            reason="EMPTY_UPDATE",
            field_violations=[("update_mask", "names no field")],
        )
    msg = farm_pb2.Farm(name=resource_name("farms", farm, "farm"))
    for field in paths:
        value = values[field]
        if field in ("mining_micros_per_kwh", "ask_micros_per_gpu_hour"):
            getattr(msg, field).update(dict(value))
        elif field == "tariff_windows":
            msg.tariff_windows.extend(tariff_window_messages(value))
        else:
            setattr(msg, field, value)
    return farm_service_pb2.UpdateFarmRequest(
        farm=msg, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )


def check_input_name(name: str) -> str:
    """The name if it is 1-64 of letters, digits, ``_.-`` (starting with a letter or digit)."""
    if not isinstance(name, str) or not _INPUT_NAME.match(name):
        raise InvalidArgument(
            f"input name {name!r}: must be 1-64 of letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)",
            reason="INVALID_INPUT_NAME",
            field_violations=[("spec.inputs", "name must be 1-64 of letters, digits, `_.-`")],
        )
    return name
