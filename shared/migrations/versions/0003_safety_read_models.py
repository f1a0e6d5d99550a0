"""safety read models that are read: rule inputs, patients set aside, leases of the one rules follower

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 13:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('patient_projection', sa.Column('last_recorded_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index(op.f('ix_patient_projection_last_recorded_at'), 'patient_projection', ['last_recorded_at'])
    op.create_table('rule_inputs',
    sa.Column('rule_id', sa.String(length=64), nullable=False),
    sa.Column('subject_id', sa.String(length=32), nullable=False),
    sa.Column('arm', sa.String(length=32), nullable=False),
    sa.Column('event', sa.Boolean(), nullable=False),
    sa.Column('evaluable_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('counts_from', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('rule_id', 'subject_id', name=op.f('pk_rule_inputs'))
    )
    op.create_table('patient_failures',
    sa.Column('subject_id', sa.String(length=32), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('failed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('subject_id', name=op.f('pk_patient_failures'))
    )


    op.create_table('leases',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('holder', sa.String(length=100), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_leases'))
    )
    op.create_table('rule_inputs_version',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('cause_event_id', sa.String(length=36), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rule_inputs_version'))
    )
    op.create_index(op.f('ix_due_checks_due_at'), 'due_checks', ['due_at'])


def downgrade() -> None:
    op.drop_index(op.f('ix_due_checks_due_at'), table_name='due_checks')
    op.drop_table('rule_inputs_version')
    op.drop_table('leases')
    op.drop_table('patient_failures')
    op.drop_table('rule_inputs')
    op.drop_index(op.f('ix_patient_projection_last_recorded_at'), table_name='patient_projection')
    op.drop_column('patient_projection', 'last_recorded_at')
