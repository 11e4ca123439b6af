"""attempt setup time and output archive

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 05:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "attempts",
        sa.Column("setup_ms", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.add_column(
        "attempts",
        sa.Column(
            "output_json", sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=""
        ),
    )


def downgrade() -> None:
    op.drop_column("attempts", "output_json")
    op.drop_column("attempts", "setup_ms")
