"""``rigshift farm workers``' GPU table: state with the quarantine reason, score, PCIe
link and verification with its reason."""

from __future__ import annotations

import pytest

from client import output
from rigshift.v1 import farm_pb2

Gpu = farm_pb2.Gpu


@pytest.mark.parametrize(
    ("gpu", "state", "verification", "pcie"),
    [
        (Gpu(state=Gpu.IDLE, verification=Gpu.VERIFIED, score=100), "IDLE", "VERIFIED", "-"),
        (
            Gpu(state=Gpu.QUARANTINED, quarantine_reason="XID 79", verification=Gpu.PENDING,
                verification_reason="not measured yet", pcie_link_width=16),
            "QUARANTINED (XID 79)",
            "PENDING: not measured yet",
            "x16",
        ),
        (
            Gpu(state=Gpu.QUARANTINED, quarantine_reason="ECC", reinstate_required=True,
                verification=Gpu.UNVERIFIED, verification_reason="fp16 short",
                pcie_generation=3, pcie_link_width=1,
                measurement=farm_pb2.GpuMeasurement(h2d_mbps=812)),
            "QUARANTINED (ECC; reinstate required: rigshift farm gpu reinstate)",
            "UNVERIFIED: fp16 short",
            "gen3 x1, 0.8 GB/s",
        ),
        (Gpu(state=Gpu.LEASED), "LEASED", "-", "-"),  # an older broker: no verification
    ],
)  # fmt: skip
def test_gpu_cells(gpu, state, verification, pcie):
    assert output.gpu_state_text(gpu) == state
    assert output.verification_text(gpu) == verification
    assert output.pcie_text(gpu) == pcie


def test_gpu_table_has_a_row_per_gpu():
    worker = farm_pb2.Worker(
        name="workers/w",
        gpus=[Gpu(index=0, model="RTX 3090", score=100), Gpu(index=1, model="RTX 3090")],
    )
    lines = output.gpu_table([worker]).splitlines()
    assert lines[0].split() == ["WORKER", "GPU", "MODEL", "SCORE", "PCIE", "STATE", "VERIFICATION"]
    assert lines[1].split()[:5] == ["workers/w", "0", "RTX", "3090", "100"]
    assert lines[2].split()[:5] == ["workers/w", "1", "RTX", "3090", "-"]
