"""The bookkeeping of a follower's lease digests and the leader's reading of statuses
(no sockets: the gRPC paths run in tests/integration/test_replica_sessions.py)."""

from __future__ import annotations

import asyncio

import pytest

from broker.replica_leases import status_entries
from broker.replica_sessions import FollowerSessions, _Session
from rigshift.v1 import worker_service_pb2 as ws

SHA = "a" * 64


@pytest.mark.parametrize(
    ("environments", "images", "want"),
    [
        ([], [], ()),
        ([SHA], ["python:3.11"], (SHA, "python:3.11")),
        (["not-a-sha", SHA.upper()], [], ()),  # dropped, not refused: one odd rig entry
        ([], ["", "bad ref"], ()),
        ([SHA] * 70, [], (SHA,) * 64),  # at most 64 environments
    ],
)
def test_status_entries_keep_only_valid_entries(environments, images, want):  # type: ignore[no-untyped-def]
    status = ws.WorkerStatus(environments=environments, images=images)
    assert status_entries(status) == want


def _sessions() -> FollowerSessions:
    return FollowerSessions(
        "postgresql+psycopg://nobody@127.0.0.1:1/none",  # never connected in these tests
        replica_id="r",
        lease_ttl_s=15.0,
        heartbeat_interval_s=5.0,
        clock=lambda: 1000.0,
    )


def test_a_renewal_is_answered_from_memory_and_noted_for_the_digest():
    follower = _sessions()
    session = _Session("w1", ())
    session.status_wanted = True
    answer = follower._renew(session, ws.SessionRequest(worker="workers/w1"))
    assert answer.lease_renewed.lease_expire_time.seconds == 1015
    assert answer.lease_renewed.status_wanted  # still wanted: no status came
    status = ws.WorkerStatus(environments=[SHA])
    answer = follower._renew(session, ws.SessionRequest(status=status))
    assert not answer.lease_renewed.status_wanted
    follower._renew(session, ws.SessionRequest())  # a later bare renewal keeps the status
    assert follower._renewed == {"w1": status}


def test_a_digest_that_could_not_be_sent_is_merged_into_the_next_one():
    follower = _sessions()
    old = ws.WorkerStatus(environments=[SHA])
    new = ws.WorkerStatus(environments=["b" * 64])
    follower._renewed = {"w1": old, "w2": None}
    sent = asyncio.run(follower.send_digest())  # no leader known: nothing is lost
    assert not sent
    assert follower._renewed == {"w1": old, "w2": None}
    # Renewals after the failure win over the held ones; held statuses fill the gaps.
    held, follower._renewed = follower._renewed, {"w1": new, "w2": None, "w3": None}
    follower._merge_back({**held, "w2": old}, full=True)
    assert follower._renewed == {"w1": new, "w2": old, "w3": None}
    assert follower._full


def test_renewal_answers_wait_for_the_leaders_first_reconcile():
    follower = _sessions()
    session = _Session("w1", ())
    session.answer(follower._renew(session, ws.SessionRequest(worker="workers/w1")))
    assert session.out.empty()  # no Reconcile yet: the answer waits
    session.relay(ws.Instruction(reconcile=ws.Reconcile()))
    session.answer(follower._renew(session, ws.SessionRequest()))
    kinds = [session.out.get_nowait().WhichOneof("kind") for _ in range(3)]
    assert kinds == ["reconcile", "lease_renewed", "lease_renewed"]
