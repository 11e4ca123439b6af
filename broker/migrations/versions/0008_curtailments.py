"""curtailment windows (issue 16)

Revision ID: 0008
Revises: 0007 (0006 while 0007 is not in the tree)
Create Date: 2026-12-06 12:00:00.000000

0007 is the power columns (issue 16's power caps, built alongside this one). Until both
are merged this revision follows 0007 when its file is there and 0006 otherwise, so the
chain has one head either way; once 0007 is on main this can read ``"0007"``.
"""

from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007" if any(Path(__file__).parent.glob("0007_*.py")) else "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "curtailments",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("farm_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("start_time", sa.Float(), nullable=False),
        sa.Column("end_time", sa.Float(), nullable=False),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("include_guaranteed", sa.Boolean(), nullable=False),
        sa.Column("create_time", sa.Float(), nullable=False),
        sa.Column("created_by", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("cancel_time", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["farm_id"], ["farms.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_curtailments_farm_id"), "curtailments", ["farm_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_curtailments_farm_id"), table_name="curtailments")
    op.drop_table("curtailments")
