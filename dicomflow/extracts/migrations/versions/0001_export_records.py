"""The export records: study_exports (one row per project and study), export_attempts, extracts.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_exports",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("study_hash", sa.String(64), nullable=False),
        sa.Column("study_id", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("accession_number", sa.String(64)),
        sa.Column("study_date", sa.String(8)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("claim", sa.String(200)),
        sa.Column("claimed_at", sa.DateTime(timezone=True)),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("destinations", sa.JSON, nullable=False),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("failed_files", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("series", sa.JSON, nullable=False),
        sa.Column("job", sa.JSON, nullable=False),
        sa.Column("exported_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        # the "one export per project and study" guarantee, enforced by the database
        sa.UniqueConstraint("project", "study_hash", name="uq_study_exports_project_study"),
    )
    op.create_index("ix_study_exports_study_id", "study_exports", ["study_id"])
    op.create_index("ix_study_exports_project_status", "study_exports", ["project", "status"])
    op.create_table(
        "export_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("export_id", sa.Integer, sa.ForeignKey("study_exports.id", ondelete="CASCADE"), nullable=False),
        sa.Column("job", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("destinations", sa.JSON, nullable=False),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text),
    )
    op.create_index("ix_export_attempts_export_id", "export_attempts", ["export_id"])
    op.create_table(
        "extracts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("extract_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("studies", sa.Integer, nullable=False),
        sa.Column("destinations", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_extracts_project", "extracts", ["project"])


def downgrade() -> None:
    op.drop_table("extracts")
    op.drop_table("export_attempts")
    op.drop_table("study_exports")
