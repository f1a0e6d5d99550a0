"""patient heads: what a write needs to know about a patient, kept with each append

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 13:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Empty at first: the ingest builds a patient's row from the stream on the first write after this.
    op.create_table('patient_heads',
    sa.Column('stream_id', sa.String(length=100), nullable=False),
    sa.Column('subject_id', sa.String(length=32), nullable=False),
    sa.Column('site_id', sa.String(length=32), nullable=False),
    sa.Column('arm', sa.String(length=32), nullable=False),
    sa.Column('stream_version', sa.Integer(), nullable=False),
    sa.Column('death_event_id', sa.String(length=36), nullable=True),
    sa.Column('death_occurred_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('death_offset_s', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('stream_id', name=op.f('pk_patient_heads'))
    )


def downgrade() -> None:
    op.drop_table('patient_heads')
