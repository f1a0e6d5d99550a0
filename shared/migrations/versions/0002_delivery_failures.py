"""delivery failures counted by the consumer

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 14:45:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('delivery_failures',
    sa.Column('consumer', sa.String(length=64), nullable=False),
    sa.Column('message', sa.String(length=200), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('consumer', 'message', name=op.f('pk_delivery_failures'))
    )


def downgrade() -> None:
    op.drop_table('delivery_failures')
