"""token expiry; a count of appended events kept by a trigger

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 13:00:00

``events_appended`` counts every insert into ``events`` (and keeps the highest position) from a
trigger, so the count survives whatever the append code does, and a tail deleted from ``events``
with the chain head rewound to match no longer passes ``trialwatch verify``.
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

POSITION = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')

SQLITE_TRIGGER = """
CREATE TRIGGER events_appended_count AFTER INSERT ON events
BEGIN
    UPDATE events_appended SET count = count + 1, last_position = max(last_position, NEW.position) WHERE id = 1;
END
"""
POSTGRES_FUNCTION = """
CREATE FUNCTION events_appended_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE events_appended SET count = count + 1, last_position = greatest(last_position, NEW.position)
    WHERE id = 1;
    RETURN NULL;
END
$$
"""
POSTGRES_TRIGGER = """
CREATE TRIGGER events_appended_count AFTER INSERT ON events
FOR EACH ROW EXECUTE FUNCTION events_appended_count()
"""


def upgrade() -> None:
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table('events_appended',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('count', POSITION, nullable=False),
    sa.Column('last_position', POSITION, nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events_appended'))
    )
    op.execute("INSERT INTO events_appended (id, count, last_position) "
               "SELECT 1, count(*), coalesce(max(position), 0) FROM events")
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(POSTGRES_FUNCTION)
        op.execute(POSTGRES_TRIGGER)
    else:
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS events_appended_count" +
               (" ON events" if op.get_bind().dialect.name == 'postgresql' else ""))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP FUNCTION IF EXISTS events_appended_count()")
    op.drop_table('events_appended')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_column('expires_at')
