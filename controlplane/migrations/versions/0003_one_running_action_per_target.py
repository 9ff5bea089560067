"""one running action per target

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("action_runs", schema=None) as batch_op:
        batch_op.create_index(
            "uq_action_running_per_target",
            ["target"],
            unique=True,
            sqlite_where=sa.text("state = 'running'"),
            postgresql_where=sa.text("state = 'running'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("action_runs", schema=None) as batch_op:
        batch_op.drop_index("uq_action_running_per_target")
