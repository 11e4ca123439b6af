"""Job events on their way to the broker: per-attempt sequence numbers, coalescing, retries.

The broker applies each (job, attempt, sequence) once, so delivery is
at-least-once with stable numbers: an event gets its number when it is put into
a batch, and a batch that failed is sent again *unchanged* until the broker
acknowledges it. Events that have not been numbered yet may still be merged:

* consecutive output of one attempt becomes one ``log`` event (up to 512 KiB);
* a newer ``progress`` replaces an unsent older one (energy is cumulative);
* while the broker is away, unsent output beyond ``max_log_backlog_bytes`` per
  attempt is dropped from the front and replaced by one marker line.

Pure bookkeeping: no I/O, no clock (times are passed in), so the agent's
reporter task and the tests drive it the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from rigshift.v1 import worker_service_pb2 as ws

__all__ = ["AttemptKey", "Outbox"]

AttemptKey = tuple[str, int]
"""(``jobs/{id}``, attempt number)."""

#: Largest ``log`` event the agent sends (the broker accepts up to 1 MiB).
MAX_LOG_EVENT_CHARS = 512 * 1024

#: A batch stops growing once its output reaches this (gRPC's default limit is 4 MiB).
MAX_BATCH_CHARS = 2 * 1024 * 1024

_MARKER = "[rigshift-agent:"


@dataclass(slots=True)
class _Pending:
    kind: str  # preparing | started | log | progress | output | finished | checkpoint
    time: float
    text: str = ""
    number: int = 0  # energy in joules, an archive's size in bytes, or setup milliseconds
    exit_code: int = 0
    setup_ms: int = 0  # finished: how long setup ran
    cause: int = 0  # finished: ws.Finished.Cause when setup failed
    over_limit: bool = False  # output: too large to keep
    message: str = ""  # output: why nothing was kept


class Outbox:
    """Unsent and in-flight events of every attempt on the rig."""

    def __init__(self, *, max_log_backlog_bytes: int = 4 << 20, max_batch: int = 500) -> None:
        self._max_backlog = max_log_backlog_bytes
        self._max_batch = max_batch
        self._pending: OrderedDict[AttemptKey, list[_Pending]] = OrderedDict()
        self._next_seq: dict[AttemptKey, int] = {}
        self._backlog: dict[AttemptKey, int] = {}
        self._dropped: dict[AttemptKey, int] = {}
        self._in_flight: list[ws.JobEvent] = []

    # --- adding -------------------------------------------------------------------

    def _add(self, key: AttemptKey, item: _Pending) -> None:
        self._pending.setdefault(key, []).append(item)
        self._next_seq.setdefault(key, 1)

    def preparing(self, key: AttemptKey, now: float) -> None:
        """The agent began the attempt's setup (environment, inputs, working directory)."""
        self._add(key, _Pending("preparing", now))

    def started(self, key: AttemptKey, now: float, setup_ms: int = 0) -> None:
        """The attempt's process started after ``setup_ms`` of setup."""
        self._add(key, _Pending("started", now, number=setup_ms))

    def output(
        self,
        key: AttemptKey,
        sha256: str,
        size_bytes: int,
        now: float,
        *,
        over_limit: bool = False,
        message: str = "",
    ) -> None:
        """The attempt's output directory was archived (and uploaded unless ``sha256`` is "")."""
        item = _Pending("output", now, sha256, size_bytes, over_limit=over_limit, message=message)
        self._add(key, item)

    def log(self, key: AttemptKey, text: str, now: float) -> None:
        """Output of the attempt (merged with unsent output before it)."""
        if not text:
            return
        items = self._pending.setdefault(key, [])
        self._next_seq.setdefault(key, 1)
        if (
            items
            and items[-1].kind == "log"
            and len(items[-1].text) + len(text) <= MAX_LOG_EVENT_CHARS
        ):
            items[-1].text += text
        else:
            for start in range(0, len(text), MAX_LOG_EVENT_CHARS):
                items.append(_Pending("log", now, text[start : start + MAX_LOG_EVENT_CHARS]))
        self._backlog[key] = self._backlog.get(key, 0) + len(text)
        if self._backlog[key] > self._max_backlog:
            self._trim(key)

    def _trim(self, key: AttemptKey) -> None:
        """Drop the oldest unsent output of ``key`` until it fits, leaving one marker line."""
        excess = self._backlog[key] - self._max_backlog
        kept: list[_Pending] = []
        marker_at = -1
        marker_time = 0.0
        for item in self._pending[key]:
            if item.kind == "log" and item.text.startswith(_MARKER):
                marker_at, marker_time = len(kept), item.time
                continue
            if excess > 0 and item.kind == "log":
                cut = min(excess, len(item.text))
                item.text = item.text[cut:]
                excess -= cut
                self._backlog[key] -= cut
                self._dropped[key] = self._dropped.get(key, 0) + cut
                if marker_at < 0:
                    marker_at, marker_time = len(kept), item.time
                if not item.text:
                    continue
            kept.append(item)
        dropped = self._dropped.get(key, 0)
        text = f"{_MARKER} {dropped} characters of output dropped: not sent in time]\n"
        kept.insert(max(0, marker_at), _Pending("log", marker_time, text))
        self._pending[key] = kept

    def progress(self, key: AttemptKey, energy_joules: int, now: float) -> None:
        """Cumulative energy so far (replaces an unsent older progress)."""
        items = self._pending.setdefault(key, [])
        self._next_seq.setdefault(key, 1)
        items[:] = [it for it in items if it.kind != "progress"]
        items.append(_Pending("progress", now, number=energy_joules))

    def finished(
        self,
        key: AttemptKey,
        exit_code: int,
        energy_joules: int,
        message: str,
        now: float,
        *,
        cause: int = 0,
        setup_ms: int = 0,
    ) -> None:
        """The process ended (or setup failed: ``cause``); the last event of the attempt."""
        items = self._pending.setdefault(key, [])
        self._next_seq.setdefault(key, 1)
        items[:] = [it for it in items if it.kind != "progress"]
        items.append(_Pending("finished", now, message, energy_joules, exit_code, setup_ms, cause))

    def checkpointed(self, key: AttemptKey, sha256: str, size_bytes: int, now: float) -> None:
        """The agent uploaded a checkpoint archive of the attempt."""
        self._add(key, _Pending("checkpoint", now, sha256, size_bytes))

    # --- sending ------------------------------------------------------------------

    def has_urgent(self) -> bool:
        """True when a start, finish or checkpoint is waiting (worth sending without delay)."""
        return any(
            it.kind in ("preparing", "started", "output", "finished", "checkpoint")
            for items in self._pending.values()
            for it in items
        )

    def empty(self) -> bool:
        """Nothing unsent and nothing in flight."""
        return not self._in_flight and not any(self._pending.values())

    def batch(self) -> list[ws.JobEvent]:
        """The batch to send: the unacknowledged one again, or a new one (may be empty)."""
        if self._in_flight:
            return self._in_flight
        out: list[ws.JobEvent] = []
        chars = 0
        for key in list(self._pending):
            items = self._pending[key]
            while items and len(out) < self._max_batch and chars < MAX_BATCH_CHARS:
                item = items.pop(0)
                if item.kind == "log":
                    self._backlog[key] = max(0, self._backlog.get(key, 0) - len(item.text))
                    chars += len(item.text)
                out.append(self._event(key, item))
            if not items:
                del self._pending[key]
            if len(out) >= self._max_batch or chars >= MAX_BATCH_CHARS:
                break
        self._in_flight = out
        return out

    def _event(self, key: AttemptKey, item: _Pending) -> ws.JobEvent:
        seq = self._next_seq[key]
        self._next_seq[key] = seq + 1
        ts = Timestamp()
        ts.FromNanoseconds(int(item.time * 1e9))
        event = ws.JobEvent(job=key[0], attempt=key[1], sequence=seq, time=ts)
        if item.kind == "preparing":
            event.preparing.SetInParent()
        elif item.kind == "started":
            event.started.SetInParent()
            event.started.setup_milliseconds = item.number
        elif item.kind == "log":
            event.log.data = item.text
        elif item.kind == "progress":
            event.progress.energy_joules = item.number
        elif item.kind == "checkpoint":
            event.checkpoint.sha256 = item.text
            event.checkpoint.size_bytes = item.number
        elif item.kind == "output":
            event.output.sha256 = item.text
            event.output.size_bytes = item.number
            event.output.over_limit = item.over_limit
            event.output.message = item.message[:1024]
        else:
            event.finished.exit_code = item.exit_code
            event.finished.energy_joules = item.number
            event.finished.message = item.text[:1024]
            event.finished.cause = item.cause  # type: ignore[assignment]
            event.finished.setup_milliseconds = item.setup_ms
        return event

    def ack(self) -> None:
        """The broker applied the in-flight batch."""
        self._in_flight = []

    def forget(self, key: AttemptKey) -> None:
        """Drop everything unsent of an attempt (it no longer belongs to this worker).

        Events already in flight stay in their batch: its numbers are fixed.
        """
        self._pending.pop(key, None)
        self._backlog.pop(key, None)
        self._dropped.pop(key, None)

    def release(self, key: AttemptKey) -> None:
        """Forget an attempt whose last event was acknowledged (frees its sequence counter)."""
        if key not in self._pending and all((e.job, e.attempt) != key for e in self._in_flight):
            self._next_seq.pop(key, None)
            self._backlog.pop(key, None)
            self._dropped.pop(key, None)

    def pending_keys(self) -> set[AttemptKey]:
        """Attempts with unsent or in-flight events."""
        return set(self._pending) | {(e.job, e.attempt) for e in self._in_flight}
