"""worker container runtime

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 09:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for column in ("runtime_name", "runtime_version"):
        op.add_column(
            "workers",
            sa.Column(
                column, sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=""
            ),
        )


def downgrade() -> None:
    op.drop_column("workers", "runtime_version")
    op.drop_column("workers", "runtime_name")
