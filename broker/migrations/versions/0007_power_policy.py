"""power policy, power curves and AI power limits (issue 16)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _text(name: str, default: str) -> sa.Column:
    return sa.Column(
        name, sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=default
    )


def _int(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), nullable=False, server_default="0")


def upgrade() -> None:
    op.add_column("farms", _text("power_policy", "MAX"))
    op.add_column("farms", _int("max_slowdown_percent"))
    op.add_column(
        "farms",
        sa.Column(
            "demand_response_micros_per_mwh", sa.BigInteger(), nullable=False, server_default="0"
        ),
    )
    op.add_column("gpus", _text("power_curve_json", "[]"))
    op.add_column(
        "gpus",
        sa.Column("power_limit_settable", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("gpus", _int("ai_power_limit_watts"))
    op.add_column("attempts", _int("power_limit_watts"))


def downgrade() -> None:
    op.drop_column("attempts", "power_limit_watts")
    for column in ("ai_power_limit_watts", "power_limit_settable", "power_curve_json"):
        op.drop_column("gpus", column)
    for column in ("demand_response_micros_per_mwh", "max_slowdown_percent", "power_policy"):
        op.drop_column("farms", column)
