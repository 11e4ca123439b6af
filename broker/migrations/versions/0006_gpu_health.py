"""gpu health, verification and host figures

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "workers", sa.Column("host_ram_mb", sa.BigInteger(), nullable=False, server_default="0")
    )
    for column in ("cpu_cores", "disk_write_mbps"):
        op.add_column(
            "workers", sa.Column(column, sa.Integer(), nullable=False, server_default="0")
        )
    op.add_column(
        "gpus", sa.Column("pcie_generation", sa.Integer(), nullable=False, server_default="0")
    )
    for column in ("measurement_json", "quarantine_reason"):
        op.add_column(
            "gpus",
            sa.Column(
                column, sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=""
            ),
        )
    op.add_column("gpus", sa.Column("quarantined_at", sa.Float(), nullable=True))
    op.add_column(
        "gpus",
        sa.Column("reinstate_required", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    for column in (
        "reinstate_required",
        "quarantined_at",
        "quarantine_reason",
        "measurement_json",
        "pcie_generation",
    ):
        op.drop_column("gpus", column)
    for column in ("disk_write_mbps", "cpu_cores", "host_ram_mb"):
        op.drop_column("workers", column)
