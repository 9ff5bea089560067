"""which policy may act on an open incident; alerts indexed by status

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        # '?': not matched yet (every incident open before this revision), matched again by
        # the loop; NULL: no policy acts on it.
        batch_op.add_column(sa.Column("policy", sa.String(100), nullable=True, server_default="?"))
        batch_op.create_index(
            "ix_incidents_open_policy",
            ["policy"],
            sqlite_where=sa.text("state = 'open'"),
            postgresql_where=sa.text("state = 'open'"),
        )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index("ix_alerts_status_received_at", ["status", "received_at"])


def downgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_status_received_at")
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.drop_index("ix_incidents_open_policy")
        batch_op.drop_column("policy")
