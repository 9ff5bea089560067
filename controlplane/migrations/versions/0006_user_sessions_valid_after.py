"""Users: sessions issued before `sessions_valid_after` are void. Logging out, a disable and a
new password end them in every browser: a session is a signed cookie the server cannot delete."""

import sqlalchemy as sa
from alembic import op

from controlplane.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sessions_valid_after", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("sessions_valid_after")
