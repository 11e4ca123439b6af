"""End-to-end fixtures: a real broker process, two real agent processes with real Ray heads.

Shared by every test of the package (session scope) so the suite starts Ray only
twice. Layout::

    broker   rigshift broker serve (SQLite), lease 6 s, heartbeat 1 s
    rig-a    farm-a, RTX3090x4, dials the broker directly, /metrics on
    rig-b    farm-b, RTX3060x2, dials the broker through a TcpProxy that a test
             can cut ("the broker went away") and restore

Jobs write what they see into ``E2E_OUT`` (a shared directory) so tests can
check GPU ids, pids and timings from the job's side.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_cluster import Cluster

from harness.agent_fixtures import TcpProxy
from harness.fleet import LocalFleet


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The broker and two agents, started once for the whole e2e suite."""
    root = tmp_path_factory.mktemp("e2e")
    out = root / "out"
    out.mkdir()
    fleet = LocalFleet(root)
    proxy = None
    try:
        fleet.start_broker(lease_ttl_s=6, heartbeat_interval_s=1)
        client = fleet.client()
        farm_a = client.create_farm("farm-a")
        farm_b = client.create_farm("farm-b")
        proxy = TcpProxy(fleet.broker_address).start()
        common = {"heartbeat_interval_s": 1, "lease_ttl_s": 6, "drain_grace_s": 5}
        rig_a = fleet.start_agent(
            "rig-a",
            farm_a.enrollment_token,
            simulate="RTX3090x4",
            metrics_listen="127.0.0.1:0",
            **common,
        )
        rig_b = fleet.start_agent(
            "rig-b", farm_b.enrollment_token, simulate="RTX3060x2", broker=proxy.address, **common
        )
        fleet.wait_workers(2)
        yield Cluster(fleet, client, proxy, out, rig_a, rig_b)
    finally:
        fleet.stop()
        if proxy is not None:
            proxy.close()
        left = fleet.leftovers()
        assert not left, f"processes left running after the e2e suite: {left}"
