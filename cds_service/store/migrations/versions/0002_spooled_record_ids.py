"""Spooled audit records: each hook_call row keeps its record id, unique, so a replay is harmless.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column: ADD COLUMN on both dialects, no table rebuild; existing rows keep NULL.
    op.add_column("hook_call", sa.Column("record_id", sa.String(32), nullable=True))
    op.create_index("ix_hook_call_record_id", "hook_call", ["record_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_hook_call_record_id", table_name="hook_call")
    with op.batch_alter_table("hook_call") as batch:
        batch.drop_column("record_id")
