"""distribution reports: why a lead distribution plugin gave each device its share of a campaign

One JSON document per campaign and plugin, written through `PlanContext.save_distribution_report` (the AI lead
distribution plugin keeps its explanation here). Not in `campaigns.options`: users edit those.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import wamd_server.infra.db.types

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "distribution_reports",
        sa.Column("campaign_id", sa.Uuid(), nullable=False),
        sa.Column("plugin", sa.String(length=100), nullable=False),
        sa.Column(
            "report", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("updated_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_distribution_reports_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("campaign_id", "plugin", name=op.f("pk_distribution_reports")),
    )


def downgrade() -> None:
    op.drop_table("distribution_reports")
