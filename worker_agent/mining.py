"""Mining fallback: what a GPU without AI work does, decided by a pure policy, done by a shell.

::

    decide(policy, now, current, assigned=, can_mine=, ai=, mining=)   pure: no clock, no I/O
        -> the GPU's next Arbitration (state ai | mining | idle, and which side pays better)
    MiningSupervisor                                                   the shell
        tick(busy)        every check_interval_s: decide for each GPU, start or stop miners
        release(indices)  before an assignment starts: stop those GPUs' miners and wait
        rows()            what ``rigshift agent gpus`` shows; mining() for the metrics

The broker decides AI work; this module decides only what an *idle* GPU does.
Two things, each held for at least ``min_dwell_s`` so a GPU does not flap:

* **Preference** (the revenue arbitration): AI revenue per kWh is the GPU's ask
  per GPU-hour over its power limit; mining revenue per kWh is the operator's
  figure. The preference flips only when the other side pays more than
  ``hysteresis_percent`` above it *and* the current preference is at least
  ``min_dwell_s`` old, so a price oscillating around the threshold changes nothing.
* **Activity** of a GPU with no attempt: with AI preferred it stays idle for
  ``min_dwell_s`` (back-to-back jobs do not restart the miner each time) and then
  mines as a filler; with mining preferred it mines at once. An assignment always
  takes the GPU at once: the miner's process tree is stopped (SIGTERM, SIGKILL
  after ``stop_grace_s``) before the attempt starts and before its energy is metered.

With mining preferred the rig should stop offering the GPU, but WorkerService
has no call for that (GpuInfo is sent once, at registration), so the preference
stays local: it is logged, shown by ``rigshift agent gpus`` (``advertise``) and
the GPU stays on offer; the broker's floor price (max(energy, mining) + margin,
from the farm's mining table) is what keeps AI work from paying less than mining.

A miner runs through :func:`worker_agent.process.run_process` in a thread (own
process group, ``setpriv --pdeathsig KILL``, the tree killed with ``kill_tree``),
with ``CUDA_VISIBLE_DEVICES`` set to its GPU and ``{gpu}`` in its argv replaced
by the GPU index. Its output goes to ``state_dir/mining/gpu<i>.log`` (≤ 1 MiB).
Its energy is metered under its own key, never an attempt's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from rigshift.catalogue import lookup
from worker_agent.config import MiningConfig
from worker_agent.energy import EnergyMeter
from worker_agent.gpu import GpuBackend, GpuInfo, Load
from worker_agent.process import ProcExited, ProcOutput, run_process

__all__ = [
    "Arbitration",
    "GpuState",
    "MiningSupervisor",
    "Policy",
    "Preference",
    "ai_micros_per_kwh",
    "decide",
    "initial",
    "read_status",
]

log = logging.getLogger("rigshift.agent.mining")

#: A miner's log file is started afresh when it grows past this.
MAX_MINER_LOG_BYTES = 1 << 20

#: The status file ``rigshift agent gpus`` reads, in the agent's state directory.
STATUS_FILE = "gpus.json"


class GpuState(StrEnum):
    """What a GPU does now (the ``state`` label of ``rigshift_gpu_state``)."""

    AI = "ai"
    MINING = "mining"
    IDLE = "idle"


class Preference(StrEnum):
    """Which side pays more per kWh, as the hysteresis last decided."""

    AI = "ai"
    MINING = "mining"


@dataclass(frozen=True, slots=True)
class Policy:
    """The knobs of :func:`decide` (from ``[mining]``)."""

    min_dwell_s: float
    """Least time in a state or preference before the policy changes it."""
    hysteresis_percent: int
    """The other side must pay this many percent more before the preference flips."""


@dataclass(frozen=True, slots=True)
class Arbitration:
    """One GPU as the policy sees it; monotonic seconds."""

    state: GpuState
    """What the GPU does."""
    since: float
    """When it entered ``state``."""
    preference: Preference
    """Which side the revenue comparison favours."""
    preference_since: float
    """When ``preference`` last changed."""

    @property
    def advertise(self) -> bool:
        """Whether the rig should offer the GPU for AI work (see the module docstring)."""
        return self.preference == Preference.AI


def initial(now: float, ai_micros_per_kwh: int, mining_micros_per_kwh: int) -> Arbitration:
    """A GPU at agent start: idle, preferring whichever side pays more now (no hysteresis)."""
    pref = Preference.MINING if mining_micros_per_kwh > ai_micros_per_kwh else Preference.AI
    return Arbitration(GpuState.IDLE, now, pref, now)


def decide(
    policy: Policy,
    now: float,
    current: Arbitration,
    *,
    assigned: bool,
    can_mine: bool,
    ai_micros_per_kwh: int,
    mining_micros_per_kwh: int,
) -> Arbitration:
    """The GPU's next arbitration (pure; see the module docstring for the rules).

    ``assigned``: an attempt holds the GPU (the broker decided; it always wins).
    ``can_mine``: the GPU has a miner command and is not waiting to restart one.
    """
    pref, pref_since = current.preference, current.preference_since
    if now - pref_since >= policy.min_dwell_s:
        margin = 100 + policy.hysteresis_percent
        if pref == Preference.AI and mining_micros_per_kwh * 100 > ai_micros_per_kwh * margin:
            pref, pref_since = Preference.MINING, now
        elif pref == Preference.MINING and ai_micros_per_kwh * 100 > mining_micros_per_kwh * margin:
            pref, pref_since = Preference.AI, now
    if assigned:
        state = GpuState.AI
    elif not can_mine:
        state = GpuState.IDLE
    elif current.state == GpuState.MINING or pref == Preference.MINING:
        state = GpuState.MINING
    elif current.state == GpuState.IDLE and now - current.since >= policy.min_dwell_s:
        state = GpuState.MINING  # AI preferred, but no AI work came for a whole dwell: filler
    else:
        state = GpuState.IDLE
    since = current.since if state == current.state else now
    return Arbitration(state, since, pref, pref_since)


def ai_micros_per_kwh(price_micros_per_gpu_hour: int, gpu: GpuInfo) -> int:
    """What AI work pays per kWh on this GPU: its ask per GPU-hour over its power limit.

    A GPU that does not report its power limit is taken at its model's catalogue
    board power; 0 when neither is known.
    """
    watts = gpu.power_limit_watts
    if watts <= 0:
        model = lookup(gpu.model)
        watts = model.board_power_w if model else 0
    return price_micros_per_gpu_hour * 1000 // watts if watts > 0 else 0


def _usd(micros: int) -> str:
    return f"{micros / 1_000_000:.3f}"


class _Miner:
    """One miner process on one GPU, driven by ``run_process`` in a thread."""

    def __init__(
        self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path, grace_s: float
    ) -> None:
        self.stop_event = threading.Event()
        self.done = threading.Event()
        self.pid = 0
        self.exit_code: int | None = None
        self.message = ""
        self.last_line = ""
        self.stopping = False
        self._gen = run_process(
            argv, env, str(cwd), flush_s=0.2, kill_grace_s=grace_s, stop=self.stop_event
        )
        self._log_path = log_path
        self._thread = threading.Thread(target=self._pump, name="miner", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            out = open(self._log_path, "ab")  # noqa: SIM115 (reopened when too large)
            with contextlib.closing(out):
                for event in self._gen:
                    if isinstance(event, ProcOutput):
                        if out.tell() > MAX_MINER_LOG_BYTES:
                            out.close()
                            out = open(self._log_path, "wb")  # noqa: SIM115
                        out.write(event.data)
                        out.flush()
                        lines = event.data.decode(errors="replace").strip().splitlines()
                        if lines:
                            self.last_line = lines[-1][-200:]
                    elif isinstance(event, ProcExited):
                        self.exit_code, self.message = event.exit_code, event.message
                    else:
                        self.pid = event.pid
        except Exception as err:  # never let a miner take the agent down
            self.exit_code, self.message = 127, f"miner thread failed: {err}"
        finally:
            self.done.set()

    def stop(self) -> None:
        """Ask ``run_process`` to kill the tree (SIGTERM, SIGKILL after the grace); at once."""
        self.stopping = True
        self.stop_event.set()

    def join(self, timeout_s: float) -> bool:
        """Wait until the process tree is gone; whether it is."""
        self._thread.join(timeout_s)
        return self.done.is_set()


@dataclass(slots=True)
class _Gpu:
    info: GpuInfo
    command: tuple[str, ...]
    ai_micros_per_kwh: int
    mining_micros_per_kwh: int
    arbitration: Arbitration
    miner: _Miner | None = None
    retry_at: float = 0.0
    mining_millijoules: int = 0
    meter_key: tuple[str, int] | None = None


class MiningSupervisor:
    """Runs the operator's miner on GPUs the policy says should mine (see the module docstring).

    ``config`` None (no ``[mining]``) still tracks ai/idle states for the status
    file. ``clock`` is monotonic seconds (injectable for tests). Call every
    method from the agent's event loop.
    """

    def __init__(
        self,
        config: MiningConfig | None,
        backend: GpuBackend,
        meter: EnergyMeter,
        *,
        asks_micros_per_gpu_hour: Mapping[int, int],
        state_dir: Path,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from worker_agent.launch import SECRET_ENV

        self.config = config or MiningConfig()
        self.enabled = config is not None
        self.policy = Policy(self.config.min_dwell_s, self.config.hysteresis_percent)
        self._backend = backend
        self._meter = meter
        self._clock = clock
        self._dir = state_dir / "mining"
        self._status_path = state_dir / STATUS_FILE
        self._status_at = 0.0
        base = os.environ if env is None else env
        self._env = {
            k: v for k, v in base.items() if k not in SECRET_ENV and not k.startswith("RAY_AUTH")
        }
        now = clock()
        self._curtail_until: float | None = None  # clock time; inf: until told otherwise
        self.gpus: dict[int, _Gpu] = {}
        for info in backend.gpus():
            ai = ai_micros_per_kwh(asks_micros_per_gpu_hour.get(info.index, 0), info)
            mining = self.config.revenue_for(info.model) if self.enabled else 0
            command = self.config.command_for(info.model) if self.enabled else ()
            self.gpus[info.index] = _Gpu(info, command, ai, mining, initial(now, ai, mining))
            if command:
                log.info(
                    "GPU %d (%s): AI pays $%s/kWh at the ask, mining $%s/kWh: %s preferred",
                    info.index,
                    info.model,
                    _usd(ai),
                    _usd(mining),
                    self.gpus[info.index].arbitration.preference.value,
                )

    # --- what the agent and the metrics read -----------------------------------------

    def state(self, index: int) -> GpuState:
        """What the GPU does now, as far as this supervisor knows."""
        gpu = self.gpus.get(index)
        return gpu.arbitration.state if gpu is not None else GpuState.IDLE

    def held_by_miners(self) -> frozenset[int]:
        """GPUs a miner process holds (running or stopping): an assignment there waits
        for :meth:`release`."""
        return frozenset(i for i, gpu in self.gpus.items() if gpu.miner is not None)

    def mining(self) -> frozenset[int]:
        """GPUs whose state is ``mining`` (what the metrics show)."""
        return frozenset(
            i for i, gpu in self.gpus.items() if gpu.arbitration.state == GpuState.MINING
        )

    def mining_joules(self, index: int) -> int:
        """Energy the GPU spent mining since the agent started, whole joules."""
        gpu = self.gpus[index]
        live = self._meter.joules(gpu.meter_key) if gpu.meter_key is not None else 0
        return gpu.mining_millijoules // 1000 + live

    def rows(self) -> list[dict[str, Any]]:
        """One dict per GPU: state, preference, revenues, miner pid, mining energy."""
        now, wall = self._clock(), time.time()
        out = []
        for index, gpu in sorted(self.gpus.items()):
            a = gpu.arbitration
            out.append(
                {
                    "index": index,
                    "model": gpu.info.model,
                    "state": a.state.value,
                    "since_unix": round(wall - (now - a.since), 3),
                    "preference": a.preference.value,
                    "advertise": a.advertise,
                    "ai_usd_per_kwh": _usd(gpu.ai_micros_per_kwh),
                    "mining_usd_per_kwh": _usd(gpu.mining_micros_per_kwh),
                    "miner": bool(gpu.command),
                    "miner_pid": gpu.miner.pid if gpu.miner is not None else 0,
                    "mining_joules": self.mining_joules(index),
                }
            )
        return out

    def curtailed(self) -> bool:
        """Whether a curtailment window is on now (no miner runs)."""
        return self._curtail_until is not None and self._clock() < self._curtail_until

    def curtail(self, active: bool, end_unix: float = 0.0, reason: str = "") -> None:
        """The farm's curtailment window began (``active``, until ``end_unix``, wall
        seconds; 0: until told it ended) or ended: while it is on no miner runs (those
        running are stopped now, reaped by the next tick) and none starts."""
        was = self.curtailed()
        if not active or (end_unix and end_unix <= time.time()):
            self._curtail_until = None
            if was:
                log.info("curtailment over: mining may resume")
            return
        left = end_unix - time.time() if end_unix else math.inf
        self._curtail_until = self._clock() + left
        if not was:
            log.info("curtailment window%s: no mining", f" ({reason})" if reason else "")
        for gpu in self.gpus.values():
            if gpu.miner is not None:
                gpu.miner.stop()

    # --- the shell -------------------------------------------------------------------

    def tick(self, busy: set[int]) -> None:
        """Decide for every GPU (``busy``: held by an attempt) and start or stop miners."""
        now = self._clock()
        changed = False
        curtailed = self.curtailed()
        for index, gpu in self.gpus.items():
            changed |= self._reap(gpu, now)
            before = gpu.arbitration
            after = decide(
                self.policy,
                now,
                before,
                assigned=index in busy,
                can_mine=bool(gpu.command) and now >= gpu.retry_at and not curtailed,
                ai_micros_per_kwh=gpu.ai_micros_per_kwh,
                mining_micros_per_kwh=gpu.mining_micros_per_kwh,
            )
            if after.preference != before.preference:
                self._log_preference(gpu, after)
            if after.state == GpuState.MINING and gpu.miner is None:
                self._start_miner(gpu)
            elif after.state != GpuState.MINING and gpu.miner is not None:
                gpu.miner.stop()  # reaped on a later tick (release() waits instead)
            if after != before:
                changed |= after.state != before.state or after.preference != before.preference
                gpu.arbitration = after
        self._write_status(force=changed)

    async def release(self, indices: list[int]) -> None:
        """Stop the miners on these GPUs and wait until their process trees are gone.

        Called before an attempt on these GPUs starts, so the job never shares a GPU
        with the miner and no mining energy is metered as the attempt's.
        """
        gpus = [self.gpus[i] for i in indices if i in self.gpus and self.gpus[i].miner is not None]
        for gpu in gpus:
            assert gpu.miner is not None
            gpu.miner.stop()
        for gpu in gpus:
            assert gpu.miner is not None
            miner = gpu.miner
            if not await asyncio.to_thread(miner.join, self.config.stop_grace_s + 3.0):
                log.warning(
                    "GPU %d: the miner (pid %d) did not exit in time", gpu.info.index, miner.pid
                )
            self._reap(gpu, self._clock())
        now = self._clock()
        for i in indices:
            held = self.gpus.get(i)
            if held is not None and held.arbitration.state != GpuState.AI:
                held.arbitration = replace(held.arbitration, state=GpuState.AI, since=now)
        self._write_status(force=True)

    async def close(self) -> None:
        """Stop every miner and wait for them (agent shutdown)."""
        miners = [g for g in self.gpus.values() if g.miner is not None]
        await self.release([g.info.index for g in miners])
        now = self._clock()
        for gpu in self.gpus.values():
            if gpu.arbitration.state != GpuState.IDLE:
                gpu.arbitration = replace(gpu.arbitration, state=GpuState.IDLE, since=now)
        self._write_status(force=True)

    def _start_miner(self, gpu: _Gpu) -> None:
        index = gpu.info.index
        argv = [a.replace("{gpu}", str(index)) for a in gpu.command]
        env = {
            **self._env,
            "CUDA_VISIBLE_DEVICES": str(index),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "RIGSHIFT_MINING_GPU": str(index),
        }
        self._dir.mkdir(parents=True, exist_ok=True)
        # Energy from here on is the miner's: booked under its own key, never an attempt's.
        self._backend.set_load([index], Load.MINING)
        gpu.meter_key = ("mining", index)
        self._meter.start(gpu.meter_key, [index])
        gpu.miner = _Miner(
            argv, env, self._dir, self._dir / f"gpu{index}.log", self.config.stop_grace_s
        )
        log.info("GPU %d: no AI work, mining: %s", index, " ".join(argv))

    def _reap(self, gpu: _Gpu, now: float) -> bool:
        """Book a miner whose process has ended; whether there was one."""
        miner = gpu.miner
        if miner is None or not miner.done.is_set():
            return False
        gpu.miner = None
        self._backend.set_load([gpu.info.index], Load.IDLE)
        if gpu.meter_key is not None:
            gpu.mining_millijoules += self._meter.stop(gpu.meter_key) * 1000
            gpu.meter_key = None
        if not miner.stopping:
            gpu.retry_at = now + self.config.restart_delay_s
            log.warning(
                "GPU %d: the miner exited by itself (status %s%s); retrying in %.0f s",
                gpu.info.index,
                miner.exit_code,
                f": {miner.message or miner.last_line}" if miner.message or miner.last_line else "",
                self.config.restart_delay_s,
            )
        else:
            log.info("GPU %d: miner stopped", gpu.info.index)
        gpu.arbitration = replace(gpu.arbitration, state=GpuState.IDLE, since=now)
        return True

    def _log_preference(self, gpu: _Gpu, a: Arbitration) -> None:
        if a.preference == Preference.MINING:
            log.info(
                "GPU %d (%s): mining pays $%s/kWh, AI $%s/kWh: mining preferred; the broker "
                "cannot be told to withhold a GPU, so it stays on offer and an assignment "
                "still stops the miner",
                gpu.info.index,
                gpu.info.model,
                _usd(gpu.mining_micros_per_kwh),
                _usd(gpu.ai_micros_per_kwh),
            )
        else:
            log.info(
                "GPU %d (%s): AI pays $%s/kWh, mining $%s/kWh: AI preferred",
                gpu.info.index,
                gpu.info.model,
                _usd(gpu.ai_micros_per_kwh),
                _usd(gpu.mining_micros_per_kwh),
            )

    def _write_status(self, *, force: bool) -> None:
        """``state_dir/gpus.json`` for ``rigshift agent gpus`` (on changes, else every 10 s)."""
        now = self._clock()
        if not force and now - self._status_at < 10.0:
            return
        self._status_at = now
        body = json.dumps({"pid": os.getpid(), "time_unix": time.time(), "gpus": self.rows()})
        tmp = self._status_path.with_suffix(".tmp")
        try:
            self._status_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body)
            os.replace(tmp, self._status_path)
        except OSError as err:
            log.debug("cannot write %s: %s", self._status_path, err)


def read_status(state_dir: Path) -> dict[int, dict[str, Any]]:
    """The GPU rows a running agent wrote to ``state_dir/gpus.json``, by index.

    Empty when there is no file or the agent that wrote it is no longer running.
    """
    try:
        data = json.loads((state_dir / STATUS_FILE).read_text())
        pid = int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # the agent runs as another user (the systemd unit's): it is alive
    except OSError:
        return {}
    return {int(row["index"]): row for row in data.get("gpus", [])}
