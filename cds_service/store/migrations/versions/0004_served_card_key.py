"""The run's derived card-signing key beside its base URL, so `evaluate` mints the uuids `serve` mints.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("served_base", sa.Column("card_key", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("served_base") as batch:
        batch.drop_column("card_key")
