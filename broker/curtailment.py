"""The core's handling of curtailment windows (part of ``BrokerCore``; ``docs/energy.md``).

The pure rules are ``broker.windows``; this mixin applies them to the core's state:

* **Placement.** The workers of a farm are kept out of the pass's index while one of its
  windows is on, and in an index of their own (one per farm, ``_side``) while one is
  coming: a pass places on the fleet's index first and tries those farms only for the
  jobs it left, and only where the job fits before the window (``fits_before``). So a
  pass's cost does not grow with the fleet: the extra work is per unplaced job and per
  farm with a window. A job left unplaced is told which farms are curtailed and until
  when (a ``curtailment`` rejection after its other reasons). The preemption step skips
  the same farms.
* **Start** (the first ``Tick`` past ``start_time``): the farm's spot attempts, and its
  guaranteed ones with ``include_guaranteed``, end PREEMPTED (so they neither count
  against ``max_attempts`` nor lower the farm's reliability), their jobs go back to
  PENDING with a ``CURTAILED`` SLA event and the agent is told to cancel them with its
  grace (SIGTERM: the job checkpoints). A guaranteed job's lost work is credited from the
  farm's account. Each worker of the farm is sent ``SendCurtail(active=True)``.
* **End** (a ``Tick`` past ``end_time``, or a cancel): the workers take work again and
  are sent ``SendCurtail(active=False)``.

Windows are the store's (written by the shell before it applies the event); a
restarted core gets them in ``StoredState.curtailments`` and its first ``Tick`` starts
the windows that are on again (stopping what still runs there, telling the agents).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from broker.errors import FailedPrecondition, NotFound
from broker.events import (
    Cancel,
    Command,
    CurtailmentCancelled,
    CurtailmentScheduled,
    SendCurtail,
    Transition,
)
from broker.model import AttemptState, JobState, WorkerState
from broker.queue import job_request
from broker.records import Attempt, Effects, Job, Worker
from broker.scheduler import FleetIndex, Rejection
from broker.settlement import curtailed, farm_credit_legs
from broker.windows import Window, fits_before, need_seconds, stops, when

__all__ = ["Curtailments"]

S = JobState
MAX_REASONS = 5  # curtailment reasons shown per pending job at most


class Curtailments:
    """``BrokerCore``'s curtailment handlers (a mixin: the state is the core's)."""

    if TYPE_CHECKING:
        jobs: dict[str, Job]
        workers: dict[str, Worker]
        spot_permille: int
        _out: Effects

        def _worker_changed(self, worker_id: str) -> None: ...

        def _held_attempts(self, worker: Worker) -> list[tuple[Job, Attempt]]: ...

        def _end_attempt(
            self,
            attempt: Attempt,
            state: AttemptState,
            now: float,
            msg: str,
            rig_fault: bool = False,
        ) -> None: ...

        def _transition(self, job: Job, to: JobState, now: float, reason: str) -> Transition: ...

        def _post(self, entries: list) -> None: ...

        def _bind(
            self, job: Job, worker_id: str, indices: tuple[int, ...], ask: int, now: float
        ) -> list[Command]: ...

    def _init_curtailments(self, lead_s: float) -> None:
        self.curtailment_lead_s = lead_s
        self.windows: dict[str, Window] = {}  # every window, past ones too
        self._by_farm: dict[str, dict[str, Window]] = {}  # farm -> its open windows
        self._windows_on: set[str] = set()  # open windows whose start this core carried out
        self._side: dict[str, FleetIndex] = {}  # farm with a window coming -> its index

    # --- reads -----------------------------------------------------------------------

    def curtailment(self, curtailment_id: str) -> Window:
        """The window, or NotFound."""
        try:
            return self.windows[curtailment_id]
        except KeyError:
            raise NotFound(
                f"curtailment {curtailment_id} not found",
                metadata={"curtailment": curtailment_id},
            ) from None

    def curtailments(self, farm_id: str, now: float, include_past: bool = False) -> list[Window]:
        """The farm's windows, newest start first; ENDED and CANCELLED ones only with
        ``include_past``."""
        out = [
            w
            for w in self.windows.values()
            if w.farm_id == farm_id and (include_past or w.open(now))
        ]
        return sorted(out, key=lambda w: (-w.start_time, w.curtailment_id))

    def active_curtailment(self, farm_id: str, now: float) -> Window | None:
        """The farm's window on at ``now`` (the one ending last), or None: what a Reconcile
        tells its agents."""
        on = [w for w in self._by_farm.get(farm_id, {}).values() if w.start_time <= now]
        return max(on, key=lambda w: w.end_time, default=None)

    # --- restore and events ----------------------------------------------------------

    def _restore_curtailments(self, windows: Iterable[Window], now: float) -> None:
        for w in windows:
            self.windows[w.curtailment_id] = w
            if w.open(now):
                self._by_farm.setdefault(w.farm_id, {})[w.curtailment_id] = w

    def _curtailment_scheduled(self, ev: CurtailmentScheduled) -> list[Command]:
        w = ev.window
        if w.curtailment_id in self.windows:
            raise FailedPrecondition(f"curtailment {w.curtailment_id} exists already")
        self.windows[w.curtailment_id] = w
        if not w.open(ev.now):
            return []
        self._by_farm.setdefault(w.farm_id, {})[w.curtailment_id] = w
        self._farm_changed(w.farm_id)
        return self._curtail_tick(ev.now)  # a window starting now starts at once

    def _curtailment_cancelled(self, ev: CurtailmentCancelled) -> list[Command]:
        w = self.curtailment(ev.curtailment_id)
        if not w.open(ev.now):
            raise FailedPrecondition(
                f"curtailment {w.curtailment_id} already {w.state(ev.now).lower()}",
                reason="CURTAILMENT_OVER",
                metadata={"curtailment": w.name, "state": w.state(ev.now)},
            )
        self.windows[w.curtailment_id] = Window(
            w.curtailment_id,
            w.farm_id,
            w.start_time,
            w.end_time,
            w.reason,
            w.include_guaranteed,
            w.create_time,
            w.created_by,
            cancel_time=ev.now,
        )
        return self._close(w, ev.now)

    def _curtail_tick(self, now: float) -> list[Command]:
        """Start the windows whose start passed and end those whose end did."""
        cmds: list[Command] = []
        for farm_windows in list(self._by_farm.values()):
            for w in list(farm_windows.values()):
                if now >= w.end_time:
                    cmds += self._close(w, now)
                elif now >= w.start_time and w.curtailment_id not in self._windows_on:
                    cmds += self._start(w, now)
        return cmds

    def _start(self, w: Window, now: float) -> list[Command]:
        self._windows_on.add(w.curtailment_id)
        on = self.active_curtailment(w.farm_id, now) or w
        cmds: list[Command] = []
        for worker in self._farm_workers(w.farm_id):
            self._worker_changed(worker.worker_id)
            if worker.state == WorkerState.OFFLINE:
                continue  # its attempts are lost with its lease; it reconciles on return
            cmds.append(SendCurtail(worker.worker_id, True, on.end_time, on.reason))
            for job, attempt in self._held_attempts(worker):
                if (
                    job.current is attempt
                    and job.state in (S.SCHEDULED, S.RUNNING)
                    and stops(w, job.spec.tier)
                ):
                    cmds += self._curtail_attempt(job, attempt, w, now)
        self._side.pop(w.farm_id, None)
        self._out.schedule = True
        return cmds

    def _close(self, w: Window, now: float) -> list[Command]:
        """The window ended or was cancelled: forget it as open; the farm's workers take
        work again unless another window is on."""
        farm_windows = self._by_farm.get(w.farm_id, {})
        farm_windows.pop(w.curtailment_id, None)
        if not farm_windows:
            self._by_farm.pop(w.farm_id, None)
        # On in this core, or before a restart (its agents heard so in their Reconcile).
        was_on = w.curtailment_id in self._windows_on or w.start_time <= now
        self._windows_on.discard(w.curtailment_id)
        self._farm_changed(w.farm_id)
        if not was_on:
            return []
        on = self.active_curtailment(w.farm_id, now)
        cmds: list[Command] = []
        for worker in self._farm_workers(w.farm_id):
            if worker.state != WorkerState.OFFLINE:
                if on is None:
                    cmds.append(SendCurtail(worker.worker_id, False))
                else:
                    cmds.append(SendCurtail(worker.worker_id, True, on.end_time, on.reason))
        self._out.schedule = True
        return cmds

    def _curtail_attempt(self, job: Job, attempt: Attempt, w: Window, now: float) -> list[Command]:
        why = f"curtailed: farm {w.farm_id} curtails until {when(w.end_time)}"
        self._end_attempt(attempt, AttemptState.PREEMPTED, now, why)
        event = curtailed(job, attempt, why, now)
        job.sla_events.append(event)
        self._out.jobs.add(job.job_id)
        if event.credit_micros > 0:
            job.credit_micros += event.credit_micros
            self._post(farm_credit_legs(job, event, len(job.sla_events), w.farm_id))
        return [
            self._transition(job, S.PENDING, now, why),
            Cancel(attempt.worker_id, job.job_id, attempt.number, why),
        ]

    # --- placement ---------------------------------------------------------------------

    def _farm_workers(self, farm_id: str) -> list[Worker]:
        # A scan of the workers, but only when a window starts or ends (never per pass).
        return [w for w in self.workers.values() if w.farm_id == farm_id]

    def _farm_changed(self, farm_id: str) -> None:
        for worker in self._farm_workers(farm_id):
            self._worker_changed(worker.worker_id)

    def _curtail_index(self, farm_id: str, now: float) -> tuple[bool, FleetIndex | None]:
        """Where a farm's ONLINE workers go: (False, None) out of every index while a
        window is on; (True, its own index) while one is coming; (True, None) the fleet's
        index otherwise."""
        windows = self._by_farm.get(farm_id)
        if not windows:
            self._side.pop(farm_id, None)
            return True, None
        if any(w.start_time <= now for w in windows.values()):
            self._side.pop(farm_id, None)
            return False, None
        index = self._side.get(farm_id)
        if index is None:
            index = self._side[farm_id] = FleetIndex()
        return True, index

    def _farm_open_for(self, farm_id: str, need_s: float, now: float) -> bool:
        """True when work that may run ``need_s`` from ``now`` meets none of the farm's windows."""
        windows = self._by_farm.get(farm_id)
        return not windows or all(fits_before(w, need_s, now) for w in windows.values())

    def _place_before_windows(self, job: Job, now: float) -> list[Command]:
        """Place a job the pass left on a farm with a window coming, where it ends first."""
        need = need_seconds(job.spec, self.curtailment_lead_s)
        request = None
        for farm_id, index in self._side.items():
            if not len(index) or not self._farm_open_for(farm_id, need, now):
                continue
            if request is None:
                request = job_request(job.job_id, job.spec, self.spot_permille)
            result = index.place([request])
            if result.placements:
                p = result.placements[0]
                return self._bind(job, p.worker_id, p.gpu_indices, p.price_micros_per_gpu_hour, now)
        return []

    def _curtail_reasons(self, job: Job, now: float) -> tuple[Rejection, ...]:
        """Why the farms with a window on or coming took no part: which farm, and when
        its window starts and ends."""
        if not self._by_farm:
            return ()
        need = need_seconds(job.spec, self.curtailment_lead_s)
        out: list[Rejection] = []
        for farm_id, windows in self._by_farm.items():
            if len(out) == MAX_REASONS:
                break
            first = min(windows.values(), key=lambda w: w.start_time)
            end = max(w.end_time for w in windows.values())
            if first.start_time <= now:
                message = f"farm {farm_id} is curtailed until {when(end)}"
            elif not fits_before(first, need, now):
                declared = job.spec.max_duration_seconds > 0
                what = "its max_duration" if declared else "the curtailment lead time"
                message = (
                    f"farm {farm_id} curtails from {when(first.start_time)} until {when(end)}: "
                    f"{what} ({int(need)} s) would overlap"
                )
            else:
                continue
            out.append(Rejection("curtailment", "no curtailed farm", farm_id, True, message))
        return tuple(out)
