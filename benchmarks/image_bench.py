"""Container images for ``env_bench.py --images``: pulls and starts with podman, and what a
warm image adds to submit -> process start through a real broker and agent.

Everything runs against a ``docker-registry`` on a loopback port with podman configured
for this machine (:class:`harness.containers.ContainerKit`). Two images are built here
from static busybox and pushed: ``small`` (busybox and a script, about 2 MB) and
``large`` (the same plus ``--large-mb`` MiB of random bytes in its one layer, which
gzip cannot shrink). For each, ``--image-repeat`` times:

* ``cold pull``: ``podman pull`` with the image removed from podman's storage (the
  registry is on loopback, so this is decompression and storage, not the network);
* ``warm pull``: ``podman pull`` again (the manifest and config are fetched, no layer);
* ``warm start``: ``podman run --rm --network none IMAGE true`` with the image present;
* ``host true``: ``/bin/true`` as a plain process, the floor ``warm start`` is compared to.

End to end (``--e2e``): a real broker and one agent (``RTX3090x2`` simulated, heartbeat
1 s), the fleet's environment carrying podman's configuration. One cold image job pulls
``small``; then ``--e2e-jobs`` pairs, alternately a process job (``sh -c 'cat
/proc/uptime'`` on the rig) and an image job (the same command in ``small``, warm), each
submitted once the previous one has finished. Per job: submit -> process start as the
broker records it (the attempt's ``start_time`` minus the job's ``create_time``: for an
image job the start of ``podman run``, which the agent launches), submit -> the job's
first instruction (the ``/proc/uptime`` it prints, the same clock inside a container,
turned into wall time; 10 ms resolution), and ``setup_milliseconds``. The differences of
the medians are what a warm image adds; the goal is under 1.5 s for the second (the
job's own code running), which includes podman starting the container.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.containers import ContainerKit

#: Seconds a warm image may add to submit -> process start.
GOAL_WARM_IMAGE_S = 1.5

#: What the small image's ``/opt/run.sh`` does (the cold end-to-end job).
RUN_SH = "#!/bin/sh\necho image job\n"

#: The end-to-end jobs, on the rig and in the image: print the seconds since boot.
UPTIME = ["/bin/sh", "-c", "cat /proc/uptime"]


def _boot_epoch() -> float:
    """Wall-clock time of the boot, to turn ``/proc/uptime`` readings into wall time."""
    with open("/proc/uptime") as f:
        return time.time() - float(f.read().split()[0])


def _seen_ms(got: dict[str, Any], boot: float) -> float:
    """Submit -> the job's first instruction, from the uptime it printed."""
    found = re.search(r"^(\d+\.\d+) \d+\.\d+$", got["logs"], re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no /proc/uptime line in the job's logs:\n{got['logs']}")
    up = float(found.group(1))
    return round((boot + up) * 1000 - got["create_ms"], 1)


def _timed(kit: ContainerKit, *args: str) -> float:
    t0 = time.perf_counter()
    kit.podman(*args)
    return time.perf_counter() - t0


def _host_true() -> float:
    t0 = time.perf_counter()
    subprocess.run(["/bin/true"], check=True)
    return time.perf_counter() - t0


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def measure_image(kit: ContainerKit, ref: str, repeat: int) -> dict[str, Any]:
    """Cold pull, warm pull and warm start of ``ref``, ``repeat`` times each."""
    cold, warm_pull, warm_start = [], [], []
    for i in range(repeat):
        kit.remove_local(ref)
        cold.append(_timed(kit, "pull", "-q", ref))
        warm_pull.append(_timed(kit, "pull", "-q", ref))
        warm_start.append(_timed(kit, "run", "--rm", "--network", "none", ref, "true"))
        print(
            f"  {ref.rsplit('/', 1)[1]} #{i + 1}: cold pull {cold[-1]:.2f} s, "
            f"warm start {warm_start[-1]:.3f} s",
            file=sys.stderr,
            flush=True,
        )
    size = kit.podman("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip()
    return {
        "ref": ref,
        "size_bytes": int(size),
        "cold_pull_s": _median(cold),
        "warm_pull_s": _median(warm_pull),
        "warm_start_s": _median(warm_start),
        "runs_cold_pull_s": [round(t, 3) for t in cold],
        "runs_warm_start_s": [round(t, 3) for t in warm_start],
    }


def run_e2e(kit: ContainerKit, ref: str, jobs: int) -> dict[str, Any]:
    """A real broker and one agent: what a warm image adds to submit -> process start."""
    from env_bench import _kind_summary, e2e_job, pct

    from harness.fleet import LocalFleet

    root = Path(tempfile.mkdtemp(prefix="image_bench-e2e-"))
    fleet = LocalFleet(root, env=kit.env)
    left: list[int] = []
    kit.remove_local(ref)
    try:
        client = fleet.start_one_rig("image")
        cold = e2e_job(client, ["/opt/run.sh"], "", timeout_s=300, image=ref)
        print(f"  e2e cold image: {cold['start_ms']:.0f} ms to start", file=sys.stderr)
        runs: dict[str, list[dict[str, Any]]] = {"process": [], "image": []}
        seen: dict[str, list[float]] = {"process": [], "image": []}
        boot = _boot_epoch()
        for i in range(jobs):
            for kind, spec in (("process", {}), ("image", {"image": ref})):
                time.sleep(0.2)  # a quiet queue and rig before each submission
                got = e2e_job(client, UPTIME, "", timeout_s=120, **spec)
                runs[kind].append(got)
                seen[kind].append(_seen_ms(got, boot))
                print(
                    f"  e2e {kind} #{i + 1}: {got['start_ms']:.0f} ms to start, "
                    f"{seen[kind][-1]:.0f} ms to the job's code, setup {got['setup_ms']} ms",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        fleet.stop()
        left = fleet.leftovers()
        shutil.rmtree(root, ignore_errors=True)
    if left:
        raise RuntimeError(f"processes of the fleet left running: {left}")
    process, image = _kind_summary(runs["process"]), _kind_summary(runs["image"])
    for kind, summary in (("process", process), ("image", image)):
        summary["seen_p50_ms"] = round(statistics.median(seen[kind]), 1)
        summary["seen_p90_ms"] = round(pct(seen[kind], 90), 1)
        summary["runs_seen_ms"] = seen[kind]
    return {
        "jobs_per_kind": jobs,
        "cold": {"start_ms": cold["start_ms"], "setup_ms": cold["setup_ms"]},
        "process": process,
        "image": image,
        "image_adds_p50_ms": round(image["start_p50_ms"] - process["start_p50_ms"], 1),
        "image_adds_p90_ms": round(image["start_p90_ms"] - process["start_p90_ms"], 1),
        "image_adds_seen_p50_ms": round(image["seen_p50_ms"] - process["seen_p50_ms"], 1),
        "image_adds_seen_p90_ms": round(image["seen_p90_ms"] - process["seen_p90_ms"], 1),
    }


def run(repeat: int, large_mb: int, e2e: bool, e2e_jobs: int) -> dict[str, Any]:
    """Build and push both images, measure them, then (with ``e2e``) the fleet."""
    root = Path(tempfile.mkdtemp(prefix="image_bench-"))
    try:
        with ContainerKit.start(root / "kit") as kit:
            t0 = time.perf_counter()
            small = kit.build_image("bench-small", {"opt/run.sh": RUN_SH})
            built_small = time.perf_counter() - t0
            t0 = time.perf_counter()
            large = kit.build_image("bench-large", {"opt/run.sh": RUN_SH}, random_mb=large_mb)
            built_large = time.perf_counter() - t0
            print(
                f"  built and pushed: small {built_small:.1f} s, large {built_large:.1f} s",
                file=sys.stderr,
            )
            report: dict[str, Any] = {
                "podman": kit.podman("--version").stdout.strip(),
                "repeat": repeat,
                "host_true_s": round(statistics.median(_host_true() for _ in range(5)), 4),
                "small": {
                    **measure_image(kit, small, repeat),
                    "build_push_s": round(built_small, 3),
                },
                "large": {
                    **measure_image(kit, large, repeat),
                    "build_push_s": round(built_large, 3),
                },
            }
            kit.remove_local(large)
            if e2e:
                try:
                    report["e2e"] = run_e2e(kit, small, e2e_jobs)
                except Exception as e:  # keep the figures measured so far
                    report["e2e_error"] = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report


def table(report: dict[str, Any]) -> str:
    """The images report as text."""
    rows = [
        f"images ({report['podman']}, local registry on loopback), "
        f"median of {report['repeat']}, s:",
        f"{'image':<7} {'MB':>7} {'cold pull':>10} {'warm pull':>10} {'warm start':>11}",
    ]
    for name in ("small", "large"):
        r = report[name]
        rows.append(
            f"{name:<7} {r['size_bytes'] / 1e6:>7.1f} {r['cold_pull_s']:>10.3f} "
            f"{r['warm_pull_s']:>10.3f} {r['warm_start_s']:>11.3f}"
        )
    rows.append(f"host /bin/true as a process: {report['host_true_s']:.4f} s")
    e2e = report.get("e2e")
    if e2e:
        rows += [
            "",
            f"end to end (broker + one agent), {e2e['jobs_per_kind']} jobs of each kind, ms:",
            f"{'job':<22} {'start p50':>10} {'start p90':>10} {'code p50':>10} {'code p90':>10} "
            f"{'setup p50':>10} {'setup p90':>10}",
        ]
        cold = e2e["cold"]
        rows.append(
            f"{'cold image (pulls)':<22} {cold['start_ms']:>10.0f} {'':>32} {cold['setup_ms']:>10}"
        )
        for kind, label in (("process", "process (no image)"), ("image", "warm image")):
            k = e2e[kind]
            rows.append(
                f"{label:<22} {k['start_p50_ms']:>10.1f} {k['start_p90_ms']:>10.1f} "
                f"{k['seen_p50_ms']:>10.1f} {k['seen_p90_ms']:>10.1f} "
                f"{k['setup_p50_ms']:>10.1f} {k['setup_p90_ms']:>10.1f}"
            )
        adds = e2e["image_adds_seen_p50_ms"]
        verdict = "met" if adds < GOAL_WARM_IMAGE_S * 1000 else "MISSED"
        rows += [
            "(start: the broker's start_time, for an image podman run's; code: the job's first "
            "instruction, from /proc/uptime)",
            f"a warm image adds {e2e['image_adds_p50_ms']:.1f} ms to submit -> start and "
            f"{adds:.1f} ms to submit -> the job's code (differences of the medians; of the "
            f"p90s {e2e['image_adds_seen_p90_ms']:.1f} ms) (goal < {GOAL_WARM_IMAGE_S:g} s: "
            f"{verdict})",
        ]
    elif "e2e_error" in report:
        rows.append(f"end to end not measured: {report['e2e_error']}")
    return "\n".join(rows)
