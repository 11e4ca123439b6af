"""Faults with the real kernel: network namespaces, veth pairs, nftables, signals.

The ``netns`` fixture gives a test its own network namespace, joined to the root
namespace by a veth pair on a private /30::

    root namespace                                  namespace rsf-XXXXXX
    broker (LocalFleet) on 10.213.N.1 ◄── veth ──► 10.213.N.2: an agent, started
    agents outside the namespace dial 10.213.N.1      with ``ip netns exec rsf-XXXXXX``

Faults are nftables rules in the agent's namespace (table ``inet rigshift_faults``, on
the namespace's end of the veth, both directions): :meth:`NetNs.blackhole` drops every
packet (no reset: both ends keep a half-open connection), :meth:`NetNs.loss` drops a
share at random (``numgen random mod 100 < P drop``), :meth:`NetNs.heal` removes them.
The kernel here has no netem, so delay is not injected. Whatever the test does, its
namespace, veth pair and table are removed when it ends, and that is checked.

Needs root and the ``ip`` and ``nft`` commands (Debian's iproute2 and nftables;
``.ci/run`` installs them); without them the tests that take ``netns`` are skipped and
say why. The ``faults`` fixture (a :class:`FaultFleet`) needs neither. The helpers live
in ``netfaults.py`` (tests import them from there: ``conftest`` is no module name to
import from, several directories have one).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from netfaults import FaultFleet, NetNs, create_netns, new_netns, remove_netns, why_no_netns


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """A fresh namespace + veth pair for this test, removed when it ends (see above)."""
    reason = why_no_netns()
    if reason:
        pytest.skip(reason)
    ns = new_netns()
    try:
        create_netns(ns)
        yield ns
    finally:
        left = remove_netns(ns)
        assert not left, f"fault test left {left} behind"


@pytest.fixture
def faults(tmp_path: Path) -> Iterator[FaultFleet]:
    """A :class:`FaultFleet` under tmp_path, every process stopped when the test ends."""
    ff = FaultFleet(tmp_path)
    try:
        yield ff
    finally:
        left = ff.stop()
        assert not left, f"processes left running: {left}"
