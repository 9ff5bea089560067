"""Cluster facts in the state store: whether commits are synchronous, the leader, the node
roles, the timeline history and the last primary known good, changed by compare-and-set
(they were kept in the lab's stack.json, through the executor)."""

import sqlalchemy as sa
from alembic import op

from controlplane.models import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cluster_facts",
        sa.Column("cluster", sa.String(length=100), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("synchronous", sa.Boolean(), nullable=True),
        sa.Column("leader", sa.String(length=100), nullable=True),
        sa.Column("roles", sa.JSON(), nullable=False),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.Column("last_good_primary", sa.String(length=100), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cluster_facts")
