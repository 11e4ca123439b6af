"""finished jobs read from the store: ListJobs, retention and request-id indexes (issue 17)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 14:00:00.000000
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_INDEXES = (
    ("ix_jobs_owner_create_time_id", ["owner", "create_time", "id"]),
    ("ix_jobs_state_create_time_id", ["state", "create_time", "id"]),
    ("ix_jobs_state_update_time", ["state", "update_time"]),
    ("ix_jobs_owner_request_id", ["owner", "request_id"]),
)


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(
            sa.Column(
                "output_sha256",
                sqlmodel.sql.sqltypes.AutoString(),
                nullable=False,
                server_default="",
            )
        )
    # Fill the new column from output_json (its "sha256"), then drop the default the model
    # does not declare.
    conn = op.get_bind()
    rows = conn.execute(
        sa.text("SELECT job_id, number, output_json FROM attempts WHERE output_json != ''")
    )
    for job_id, number, output_json in list(rows):
        conn.execute(
            sa.text("UPDATE attempts SET output_sha256 = :sha WHERE job_id = :job AND number = :n"),
            {"sha": json.loads(output_json).get("sha256", ""), "job": job_id, "n": number},
        )
    with op.batch_alter_table("attempts") as batch:
        batch.alter_column("output_sha256", server_default=None)
    op.create_index(op.f("ix_attempts_output_sha256"), "attempts", ["output_sha256"])
    op.create_index(op.f("ix_attempts_state"), "attempts", ["state"])
    for name, columns in JOB_INDEXES:
        op.create_index(name, "jobs", columns)


def downgrade() -> None:
    for name, _ in JOB_INDEXES:
        op.drop_index(name, table_name="jobs")
    op.drop_index(op.f("ix_attempts_state"), table_name="attempts")
    op.drop_index(op.f("ix_attempts_output_sha256"), table_name="attempts")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("output_sha256")
