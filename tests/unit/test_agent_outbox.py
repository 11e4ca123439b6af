"""The outbox: per-attempt sequence numbers, coalescing, unchanged retries, bounded backlog."""

from __future__ import annotations

from worker_agent.outbox import MAX_LOG_EVENT_CHARS, Outbox

A = ("jobs/a", 1)
B = ("jobs/b", 2)


def kinds(batch) -> list[tuple[str, int, str]]:  # type: ignore[no-untyped-def]
    return [(e.job, e.sequence, e.WhichOneof("kind")) for e in batch]


def test_sequences_start_at_one_per_attempt_and_logs_merge() -> None:
    box = Outbox()
    box.started(A, 1.0)
    box.log(A, "hello ", 1.1)
    box.log(A, "world\n", 1.2)
    box.started(B, 1.3)
    box.progress(A, 10, 1.4)
    box.progress(A, 25, 1.5)  # replaces the unsent 10
    batch = box.batch()
    assert kinds(batch) == [
        ("jobs/a", 1, "started"),
        ("jobs/a", 2, "log"),
        ("jobs/a", 3, "progress"),
        ("jobs/b", 1, "started"),
    ]
    assert batch[1].log.data == "hello world\n"
    assert batch[2].progress.energy_joules == 25
    assert batch[0].time.ToNanoseconds() == 1_000_000_000


def test_a_failed_batch_is_resent_unchanged_and_new_events_wait() -> None:
    box = Outbox()
    box.started(A, 1.0)
    box.log(A, "x", 1.0)
    first = box.batch()
    box.log(A, "y", 2.0)  # arrives while the batch is in flight
    assert box.batch() == first  # a retry: same events, same numbers
    box.ack()
    box.finished(A, 0, 99, "", 3.0)
    second = box.batch()
    assert kinds(second) == [("jobs/a", 3, "log"), ("jobs/a", 4, "finished")]
    assert second[1].finished.energy_joules == 99
    box.ack()
    assert box.empty()
    box.release(A)
    box.started(A, 4.0)  # a released attempt starts again from 1 (a new attempt number in practice)
    assert box.batch()[0].sequence == 1


def test_finished_drops_an_unsent_progress() -> None:
    box = Outbox()
    box.progress(A, 5, 1.0)
    box.finished(A, -15, 7, "cancelled", 2.0)
    assert kinds(box.batch()) == [("jobs/a", 1, "finished")]


def test_urgent_events_are_flagged() -> None:
    box = Outbox()
    box.log(A, "just output", 1.0)
    assert not box.has_urgent()
    box.finished(A, 0, 0, "", 1.0)
    assert box.has_urgent()


def test_long_output_is_split_under_the_broker_limit() -> None:
    box = Outbox(max_log_backlog_bytes=10 << 20)
    box.log(A, "z" * (MAX_LOG_EVENT_CHARS * 2 + 10), 1.0)
    batch = box.batch()
    assert [len(e.log.data) for e in batch] == [MAX_LOG_EVENT_CHARS, MAX_LOG_EVENT_CHARS, 10]
    assert [e.sequence for e in batch] == [1, 2, 3]


def test_backlog_is_bounded_while_the_broker_is_away() -> None:
    box = Outbox(max_log_backlog_bytes=100)
    box.started(A, 1.0)
    for i in range(50):
        box.log(A, f"line {i:04d}\n", 1.0 + i)  # 10 characters each, 500 in all
    batch = box.batch()
    texts = "".join(e.log.data for e in batch if e.WhichOneof("kind") == "log")
    assert batch[0].WhichOneof("kind") == "started"
    assert texts.startswith("[rigshift-agent: 400 characters of output dropped")
    assert texts.endswith("line 0049\n")
    assert texts.count("line ") == 10


def test_forget_keeps_in_flight_numbers() -> None:
    box = Outbox()
    box.started(A, 1.0)
    first = box.batch()
    box.log(A, "late", 2.0)
    box.forget(A)
    assert box.batch() == first
    box.ack()
    assert box.empty()


def test_batches_are_capped() -> None:
    box = Outbox(max_batch=3)
    for i in range(5):
        box.started((f"jobs/{i}", 1), 1.0)
    assert len(box.batch()) == 3
    box.ack()
    assert len(box.batch()) == 2


def test_batches_stay_under_the_message_size_limit() -> None:
    box = Outbox(max_log_backlog_bytes=64 << 20)
    for i in range(10):
        box.log((f"jobs/{i}", 1), "q" * MAX_LOG_EVENT_CHARS, 1.0)
    sizes = []
    while not box.empty():
        sizes.append(sum(len(e.log.data) for e in box.batch()))
        box.ack()
    assert max(sizes) <= 2 * 1024 * 1024 and sum(sizes) == 10 * MAX_LOG_EVENT_CHARS
