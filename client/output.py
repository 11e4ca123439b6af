"""Rendering of API messages for the terminal: aligned tables, descriptions and JSON.

Pure functions from proto messages to strings; the CLI prints what they return.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from google.protobuf import json_format, message

from client.render import Style, format_time, render_table
from rigshift.units import (
    format_permille_percent,
    format_price_per_gpu_hour,
    format_usd,
    joules_to_kwh,
)
from rigshift.v1 import farm_pb2, job_pb2, job_service_pb2

__all__ = [
    "MINING_PAID_MORE",
    "describe_farm",
    "describe_job",
    "earnings_table",
    "floors_table",
    "format_time",
    "gpu_summary",
    "job_line",
    "job_table",
    "outputs_json",
    "outputs_table",
    "quote_summary",
    "render_table",
    "runtime_text",
    "to_json",
    "worker_table",
]

_COMMAND_WIDTH = 40


def to_json(msg: message.Message, *, one_line: bool = False, defaults: bool = False) -> str:
    """The message as JSON with proto field names (``one_line`` for JSON Lines).

    ``defaults`` also prints fields at their zero value (e.g. ``"margin_micros": "0"``),
    for reports whose columns a script should always find.
    """
    return json_format.MessageToJson(
        msg,
        preserving_proto_field_name=True,
        indent=None if one_line else 2,
        always_print_fields_with_no_presence=defaults,
    )


def _state_name(enum_type: object, value: int) -> str:
    """The enum value's name; ``-`` for STATE_UNSPECIFIED (e.g. before a job's first state)."""
    if value == 0:
        return "-"
    try:
        return enum_type.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return str(value)


def _gpus_wanted(spec: job_pb2.JobSpec) -> str:
    text = f"{spec.gpu_count or 1}x {spec.gpu_model or 'any'}"
    if spec.min_vram_mb:
        text += f" (>= {spec.min_vram_mb} MiB)"
    return text


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def job_table(jobs: Iterable[job_pb2.Job], *, wide: bool = False, style: Style = "plain") -> str:
    """One row per job: id, state, GPUs, price cap, attempts, creation time, name or command
    (cut at 40 characters). ``wide`` adds the tier, the cost so far and the owner, and
    prints the name or command whole."""
    rows = []
    for job in jobs:
        spec = job.spec
        label = spec.display_name or shlex.join(spec.command)
        cap = spec.max_price_micros_per_gpu_hour
        rows.append(
            [
                job.name,
                _state_name(job_pb2.Job.State, job.state),
                _gpus_wanted(spec),
                format_price_per_gpu_hour(cap) if cap else "no cap",
                str(job.attempt_count),
                format_time(job.create_time),
            ]
        )
        if wide:
            rows[-1] += [_tier_name(spec.tier), format_usd(job.cost_micros), job.owner or "-"]
        rows[-1].append(label if wide else _shorten(label, _COMMAND_WIDTH))
    headers = ["JOB", "STATE", "GPUS", "MAX PRICE", "ATTEMPTS", "CREATED"]
    if wide:
        headers += ["TIER", "COST", "OWNER"]
    return render_table([*headers, "NAME/COMMAND"], rows, style)


def job_line(job: job_pb2.Job) -> str:
    """One line per update for ``job watch``: time, name, state, attempt and why."""
    parts = [
        format_time(job.update_time),
        job.name,
        _state_name(job_pb2.Job.State, job.state),
        f"attempt={job.attempt_count}",
    ]
    if job.state == job_pb2.Job.PENDING and job.pending_reasons:
        parts.append("waiting: " + "; ".join(r.message for r in job.pending_reasons))
    elif job.status_message:
        parts.append(job.status_message)
    return " ".join(parts)


def _attempt_rows(job: job_pb2.Job) -> list[list[str]]:
    rows = []
    for a in job.attempts:
        exited = a.state in (job_pb2.Attempt.SUCCEEDED, job_pb2.Attempt.FAILED)
        rows.append(
            [
                str(a.number),
                a.worker or "-",
                ",".join(str(i) for i in a.gpu_indices) or "-",
                _state_name(job_pb2.Attempt.State, a.state),
                f"{a.setup_milliseconds // 1000}.{a.setup_milliseconds % 1000:03d}",
                format_time(a.start_time),
                format_time(a.end_time),
                str(a.exit_code) if exited else "-",
                f"{a.energy_joules} J ({joules_to_kwh(a.energy_joules)} kWh)",
                f"{a.gpu_milliseconds // 1000}.{a.gpu_milliseconds % 1000:03d}",
                format_price_per_gpu_hour(a.price_micros_per_gpu_hour),
                format_usd(a.charge_micros) if a.charge_micros or a.end_time.seconds else "-",
            ]
        )
    return rows


def _tier_name(tier: int) -> str:
    """``SPOT`` or ``GUARANTEED``; unset is GUARANTEED, as the broker treats it."""
    return _state_name(job_pb2.Tier, tier or job_pb2.GUARANTEED)


def _checkpoint(job: job_pb2.Job) -> str:
    if not job.checkpoint_sha256:
        return "none yet"
    return f"sha256:{job.checkpoint_sha256[:12]} at {format_time(job.checkpoint_time)}"


def _sla_rows(job: job_pb2.Job) -> list[list[str]]:
    return [
        [
            format_time(e.time),
            _state_name(job_pb2.SlaEvent.Kind, e.kind),
            str(e.attempt) if e.attempt else "-",
            f"{e.seconds} s",
            format_usd(e.credit_micros),
            e.detail,
        ]
        for e in job.sla_events
    ]


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def describe_job(job: job_pb2.Job) -> str:
    """Everything about one job for ``job get``: spec, state, why pending, attempts, history."""
    spec = job.spec
    fields: list[tuple[str, str]] = [
        ("job", job.name),
        ("state", _state_name(job_pb2.Job.State, job.state)),
    ]
    if spec.display_name:
        fields.append(("name", spec.display_name))
    fields += [
        ("command", shlex.join(spec.command)),
        ("tier", _tier_name(spec.tier)),
        ("gpus", _gpus_wanted(spec)),
        (
            "max price",
            format_price_per_gpu_hour(spec.max_price_micros_per_gpu_hour)
            if spec.max_price_micros_per_gpu_hour
            else "no cap",
        ),
        (
            "max duration",
            f"{spec.max_duration_seconds} s" if spec.max_duration_seconds else "broker default",
        ),
        ("max attempts", str(spec.max_attempts) if spec.max_attempts else "broker default"),
        ("working dir", f"sha256:{spec.working_dir_sha256}" if spec.working_dir_sha256 else "-"),
    ]
    if spec.environment.image:
        fields.append(("image", spec.environment.image))
    if spec.environment.python_requirements:
        reqs = spec.environment.python_requirements.splitlines()
        shown = ", ".join(reqs[:5]) + (f", … ({len(reqs)} in all)" if len(reqs) > 5 else "")
        sha = spec.environment.requirements_sha256[:12]
        fields.append(("requirements", f"{shown} (sha256:{sha}…)"))
    if spec.inputs:
        fields.append(
            ("inputs", " ".join(f"{k}=sha256:{v[:12]}…" for k, v in sorted(spec.inputs.items())))
        )
    if spec.env:
        fields.append(("env", " ".join(f"{k}={v}" for k, v in sorted(spec.env.items()))))
    if job.owner:
        fields.append(("owner", job.owner))
    if job.request_id:
        fields.append(("request id", job.request_id))
    fields += [
        ("created", format_time(job.create_time)),
        ("updated", format_time(job.update_time)),
        ("attempts", str(job.attempt_count)),
        ("cost so far", format_usd(job.cost_micros)),
        ("credits", format_usd(job.credit_micros)),
        ("checkpoint", _checkpoint(job)),
    ]
    if job.status_message:
        fields.append(("status", job.status_message))
    if job.state in (job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED):
        fields.append(("exit code", str(job.exit_code)))
    if job.attempts:
        energy = sum(a.energy_joules for a in job.attempts)
        gpu_ms = sum(a.gpu_milliseconds for a in job.attempts)
        fields += [
            ("energy", f"{energy} J ({joules_to_kwh(energy)} kWh)"),
            ("gpu-seconds", f"{gpu_ms // 1000}.{gpu_ms % 1000:03d}"),
        ]
    if job.state == job_pb2.Job.PENDING:
        for reason in job.pending_reasons:
            fields.append(("waiting", reason.message or f"{reason.resource}: {reason.requested}"))
        if not job.pending_reasons:
            fields.append(("waiting", "not considered by the scheduler yet"))

    width = max(len(k) for k, _ in fields) + 1
    lines = [f"{(k + ':').ljust(width)}  {v}" for k, v in fields]
    if job.attempts:
        headers = ["#", "WORKER", "GPUS", "STATE", "SETUP-S", "STARTED", "ENDED", "EXIT", "ENERGY"]
        headers += ["GPU-SECONDS", "PRICE", "CHARGE"]
        lines += ["", "attempts:", _indent(render_table(headers, _attempt_rows(job)))]
    if job.sla_events:
        headers = ["TIME", "KIND", "ATTEMPT", "SECONDS", "CREDIT", "DETAIL"]
        lines += ["", "sla events:", _indent(render_table(headers, _sla_rows(job)))]
    if job.history:
        rows = [
            [
                format_time(t.time),
                _state_name(job_pb2.Job.State, t.from_state),
                _state_name(job_pb2.Job.State, t.to_state),
                t.reason,
            ]
            for t in job.history
        ]
        lines += ["", "history:", _indent(render_table(["TIME", "FROM", "TO", "REASON"], rows))]
    return "\n".join(lines)


def _per_kwh(micros: int) -> str:
    return f"{format_usd(micros)}/kWh"


def _by_model(prices: Mapping[str, int], unit: Callable[[int], str]) -> str:
    return ", ".join(f"{model} {unit(prices[model])}" for model in sorted(prices)) or "-"


def floors_table(farm: farm_pb2.Farm) -> str:
    """The farm's floor price per GPU model, how it is made up, and the ask."""
    rows = [
        [
            f.gpu_model,
            f"{f.watts} W",
            format_price_per_gpu_hour(f.energy_cost_micros_per_gpu_hour),
            format_price_per_gpu_hour(f.mining_micros_per_gpu_hour),
            format_price_per_gpu_hour(f.floor_micros_per_gpu_hour),
            format_price_per_gpu_hour(farm.ask_micros_per_gpu_hour[f.gpu_model])
            if f.gpu_model in farm.ask_micros_per_gpu_hour
            else "agent's",
        ]
        for f in sorted(farm.floors, key=lambda f: f.gpu_model)
    ]
    headers = ["MODEL", "WATTS", "ENERGY COST", "MINING", "FLOOR", "ASK"]
    return render_table(headers, rows)


def describe_farm(farm: farm_pb2.Farm) -> str:
    """One farm for ``farm get``: region, tariff, PUE, mining, asks, fee, margin and floors."""
    pue = farm.pue_permille or 1000
    tariff = _per_kwh(farm.tariff_micros_per_kwh)
    if farm.tariff_windows:
        tariff += " outside the time-of-use windows"
    fields = [
        ("farm", farm.name),
        ("name", farm.display_name),
        ("region", farm.region or "-"),
        ("tariff", tariff),
    ]
    if farm.tariff_windows:
        windows = [
            f"{w.start_hour:02d}-{w.end_hour:02d} UTC {_per_kwh(w.micros_per_kwh)}"
            for w in farm.tariff_windows
        ]
        fields.append(("time of use", "; ".join(windows)))
    fields += [
        ("pue", f"{pue // 1000}.{pue % 1000:03d}"),
        ("mining", _by_model(farm.mining_micros_per_kwh, _per_kwh)),
        ("asks", _by_model(farm.ask_micros_per_gpu_hour, format_price_per_gpu_hour)),
        ("margin", format_price_per_gpu_hour(farm.margin_micros_per_gpu_hour)),
        (
            "broker fee",
            format_permille_percent(farm.broker_fee_permille)
            if farm.broker_fee_permille
            else "broker default",
        ),
        ("power policy", power_policy_text(farm)),
        ("created", format_time(farm.create_time)),
    ]
    if farm.demand_response_micros_per_mwh:
        fields.insert(
            -1, ("demand resp.", f"{format_usd(farm.demand_response_micros_per_mwh)}/MWh")
        )
    width = max(len(k) for k, _ in fields) + 1
    lines = [f"{(k + ':').ljust(width)}  {v}" for k, v in fields]
    lines.append("")
    if farm.floors:
        lines += ["floor prices (max(energy cost, mining) + margin):", _indent(floors_table(farm))]
    else:
        lines.append("floor prices: none yet (no GPUs registered)")
    return "\n".join(lines)


def power_policy_text(farm: farm_pb2.Farm) -> str:
    """``max (board limits)`` or ``efficient (at most 10% slower per GPU)``."""
    if farm.power_policy == farm_pb2.POWER_POLICY_EFFICIENT:
        return f"efficient (at most {farm.max_slowdown_percent}% slower per GPU)"
    return "max (board limits)"


def gpu_summary(worker: farm_pb2.Worker) -> str:
    """A rig's GPUs in one cell: ``4x RTX 3090 (2 leased)``; mixed rigs list each model."""
    if not worker.gpus:
        return "-"
    by_model = Counter(g.model or "unknown" for g in worker.gpus)
    text = ", ".join(f"{n}x {model}" for model, n in sorted(by_model.items()))
    states = Counter(g.state for g in worker.gpus)
    notes = [
        f"{states[s]} {label}"
        for s, label in (
            (farm_pb2.Gpu.LEASED, "leased"),
            (farm_pb2.Gpu.MINING, "mining"),
            (farm_pb2.Gpu.QUARANTINED, "quarantined"),
        )
        if states[s]
    ]
    return f"{text} ({', '.join(notes)})" if notes else text


def worker_table(
    workers: Iterable[farm_pb2.Worker], *, wide: bool = False, style: Style = "plain"
) -> str:
    """One row per worker: worker, farm, hostname, state, GPUs, reliability, container
    runtime (``podman 4.3.1``, or ``-``), last heartbeat. ``wide`` adds the agent's
    version, the rig's host RAM and CPU cores, and its metrics address."""
    rows = [
        [
            w.name,
            w.farm,
            w.hostname,
            _state_name(farm_pb2.Worker.State, w.state),
            gpu_summary(w),
            format_permille_percent(w.reliability_permille) if w.reliability_permille else "-",
            runtime_text(w.container_runtime),
            format_time(w.last_heartbeat_time),
            *(_worker_wide(w) if wide else []),
        ]
        for w in workers
    ]
    headers = [
        "WORKER",
        "FARM",
        "HOSTNAME",
        "STATE",
        "GPUS",
        "RELIABILITY",
        "RUNTIME",
        "LAST HEARTBEAT",
    ]
    if wide:
        headers += ["AGENT", "RAM", "CORES", "METRICS"]
    return render_table(headers, rows, style)


def _worker_wide(w: farm_pb2.Worker) -> list[str]:
    return [
        w.agent_version or "-",
        f"{w.host.ram_mb // 1024} GiB" if w.host.ram_mb else "-",
        str(w.host.cpu_cores) if w.host.cpu_cores else "-",
        w.metrics_address or "-",
    ]


def gpu_state_text(gpu: farm_pb2.Gpu) -> str:
    """A GPU's state; a quarantined one with its reason (and whether the operator must
    reinstate it): ``QUARANTINED (XID 79: …; reinstate required)``."""
    name = _state_name(farm_pb2.Gpu.State, gpu.state)
    if gpu.state != farm_pb2.Gpu.QUARANTINED:
        return name
    notes = [gpu.quarantine_reason or "no reason given"]
    if gpu.reinstate_required:
        notes.append("reinstate required: rigshift farm gpu reinstate")
    return f"{name} ({'; '.join(notes)})"


def verification_text(gpu: farm_pb2.Gpu) -> str:
    """``VERIFIED``, or ``UNVERIFIED: why`` / ``PENDING: why``; ``-`` when the broker says
    nothing (an older broker)."""
    name = _state_name(farm_pb2.Gpu.Verification, gpu.verification)
    if gpu.verification == farm_pb2.Gpu.VERIFIED or not gpu.verification_reason:
        return name
    return f"{name}: {gpu.verification_reason}"


def pcie_text(gpu: farm_pb2.Gpu) -> str:
    """The GPU's link and its measured host-to-device bandwidth: ``gen3 x1, 0.8 GB/s``."""
    link = f"x{gpu.pcie_link_width}" if gpu.pcie_link_width else "-"
    if gpu.pcie_generation:
        link = f"gen{gpu.pcie_generation} {link}"
    if gpu.measurement.h2d_mbps:
        return f"{link}, {gpu.measurement.h2d_mbps / 1000:.1f} GB/s"
    return link


def gpu_table(
    workers: Iterable[farm_pb2.Worker], *, wide: bool = False, style: Style = "plain"
) -> str:
    """One row per GPU: worker, index, model, score (an RTX 3090 = 100; ``-`` before a
    self-test), PCIe link, state (a quarantined GPU with its reason), verification (with
    the reason when not VERIFIED). ``wide`` adds the usable VRAM and the measured
    FP16/FP32 throughput."""
    rows = [
        [
            w.name,
            str(g.index),
            g.model,
            score_text(g),
            pcie_text(g),
            gpu_state_text(g),
            verification_text(g),
            *(_gpu_wide(g) if wide else []),
        ]
        for w in workers
        for g in w.gpus
    ]
    headers = ["WORKER", "GPU", "MODEL", "SCORE", "PCIE", "STATE", "VERIFICATION"]
    if wide:
        headers += ["USABLE VRAM", "FP16 GFLOPS", "FP32 GFLOPS"]
    return render_table(headers, rows, style)


def _gpu_wide(g: farm_pb2.Gpu) -> list[str]:
    m = g.measurement
    return [
        f"{m.usable_vram_mb} MiB" if m.usable_vram_mb else "-",
        str(m.fp16_gflops) if m.fp16_gflops else "-",
        str(m.fp32_gflops) if m.fp32_gflops else "-",
    ]


def score_text(gpu: farm_pb2.Gpu) -> str:
    """The GPU's score, with the power cap it is measured at: ``96 at 280 W``."""
    if not gpu.score:
        return "-"
    cap = f" at {gpu.ai_power_limit_watts} W" if gpu.ai_power_limit_watts else ""
    return f"{gpu.score}{cap}"


def runtime_text(runtime: farm_pb2.ContainerRuntime) -> str:
    """A worker's container runtime as ``name version``; ``-`` when it runs none."""
    return f"{runtime.name} {runtime.version}".strip() if runtime.name else "-"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def quote_summary(quote: job_service_pb2.QuoteJobResponse) -> str:
    """``job quote``: matching GPUs, how many are free, price range, and why not placeable."""
    if quote.matching_gpus:
        low, high = quote.min_price_micros_per_gpu_hour, quote.max_price_micros_per_gpu_hour
        price = f"{format_usd(low)}\N{EN DASH}{format_usd(high)}/GPU-h for this tier"
    else:
        price = "no price for this tier"
    lines = [
        f"{_plural(quote.matching_gpus, 'matching GPU')} ({quote.free_matching_gpus} free now), "
        f"{price}; placeable now: {'yes' if quote.placeable_now else 'no'}"
    ]
    if not quote.placeable_now:
        for reason in quote.reasons:
            lines.append(f"  - {reason.message or f'{reason.resource}: {reason.requested}'}")
    if quote.groups:
        lines.append("")
        lines.append(quote_groups_table(quote.groups))
    return "\n".join(lines)


def _decimal(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0") if value else "-"


def quote_groups_table(groups: Iterable[job_service_pb2.QuoteGroup]) -> str:
    """The matching GPU groups of a quote: model, ask, score, verification, link, host."""
    rows = [
        [
            g.gpu_model,
            f"{g.vram_mb // 1024} GiB",
            format_usd(g.ask_micros_per_gpu_hour),
            f"{g.free_gpus}/{g.gpus}",
            str(g.score) if g.score else "-",
            "verified" if g.verified else "UNVERIFIED",
            _decimal(g.pcie_gbps),
            str(g.host_ram_gb_per_gpu) if g.host_ram_gb_per_gpu else "-",
            _decimal(g.cpu_cores_per_gpu),
        ]
        for g in groups
    ]
    headers = ["MODEL", "VRAM", "ASK/GPU-H", "FREE", "SCORE", "VERIFIED", "PCIE GB/S"]
    return render_table([*headers, "RAM GB/GPU", "CORES/GPU"], rows)


# The earnings and outputs reports live in their own module (issue 18: size).
from client.output_reports import (  # noqa: E402
    MINING_PAID_MORE,
    earnings_table,
    outputs_json,
    outputs_table,
)
