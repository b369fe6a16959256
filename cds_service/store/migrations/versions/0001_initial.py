"""Initial schema: hook-call audit with its cards, feedback, client JWT ids.

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen here on purpose: a migration describes the schema as it was, whatever schema.py says later.
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "hook_call",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("hook_instance", sa.Text(), nullable=False),
        sa.Column("service_id", sa.String(100), nullable=False),
        sa.Column("received_at", _When, nullable=False),
        sa.Column("patient_hash", sa.String(64), nullable=False),
        sa.Column("fhir_mode", sa.String(20), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("card_count", sa.Integer(), nullable=False),
    )
    op.create_index("ix_hook_call_received_at", "hook_call", ["received_at"])
    op.create_table(
        "hook_card",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("call_id", _Id, sa.ForeignKey("hook_call.id", ondelete="CASCADE"), nullable=False),
        sa.Column("card_uuid", sa.String(36), nullable=False),
        sa.Column("model", sa.String(64)),
        sa.Column("recommendation", sa.String(64)),
        sa.Column("score_min", sa.Integer()),
        sa.Column("score_max", sa.Integer()),
        sa.Column("risk_group", sa.String(32)),
        sa.Column("suggestion_uuids", sa.JSON(), nullable=False),
    )
    op.create_index("ix_hook_card_call_id", "hook_card", ["call_id"])
    op.create_index("ix_hook_card_card_uuid", "hook_card", ["card_uuid"])
    op.create_table(
        "feedback",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("service_id", sa.String(100), nullable=False),
        sa.Column("card_uuid", sa.String(36), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("accepted_suggestions", sa.JSON(), nullable=False),
        sa.Column("override_system", sa.Text()),
        sa.Column("override_code", sa.Text()),
        sa.Column("override_display", sa.Text()),
        sa.Column("user_comment", sa.Text()),
        sa.Column("outcome_timestamp", _When),
        sa.Column("received_at", _When, nullable=False),
        sa.Column("dedupe_key", sa.String(64), nullable=False),
        sa.UniqueConstraint("dedupe_key", name="uq_feedback_dedupe_key"),
    )
    op.create_index("ix_feedback_card_uuid", "feedback", ["card_uuid"])
    op.create_index("ix_feedback_received_at", "feedback", ["received_at"])
    op.create_table(
        "client_jti",
        sa.Column("issuer", sa.String(1000), primary_key=True),
        sa.Column("jti", sa.String(500), primary_key=True),
        sa.Column("expires_at", _When, nullable=False),
    )
    op.create_index("ix_client_jti_expires_at", "client_jti", ["expires_at"])


def downgrade() -> None:
    op.drop_table("client_jti")
    op.drop_table("feedback")
    op.drop_table("hook_card")
    op.drop_table("hook_call")
