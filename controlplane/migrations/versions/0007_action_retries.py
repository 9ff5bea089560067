"""Healing goes on: a remediation may be tried again for one incident (one run per try, the
database keeps each try unique), a run says whether it may be followed by another, and an
incident remembers when a human was told that healing did not work."""

import sqlalchemy as sa
from alembic import op

from controlplane.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("action_runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("try_number", sa.Integer(), nullable=False, server_default="1")
        )
        batch_op.add_column(
            sa.Column("retry", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.drop_constraint("uq_action_per_incident", type_="unique")
        batch_op.create_unique_constraint(
            "uq_action_try_per_incident", ["incident_id", "action", "try_number"]
        )
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("escalated_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.drop_column("escalated_at")
    with op.batch_alter_table("action_runs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_action_try_per_incident", type_="unique")
        batch_op.create_unique_constraint("uq_action_per_incident", ["incident_id", "action"])
        batch_op.drop_column("retry")
        batch_op.drop_column("try_number")
