"""PostgreSQL: an append in one round trip; the appended-events count once per statement

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 16:00:00

``eventstore_append`` does on the server what ``eventstore.append`` did in four round trips: lock
the chain head, read the stream's version (after the lock: a plpgsql statement takes a fresh
snapshot, so it sees what the previous holder committed), check the expected version, hash-chain
the events, insert them and their outbox rows, drop the stream's patient head and move the chain
head. The hash is the one ``eventstore.chain_hash`` computes: SHA-256 over the previous hash and
the event's canonical JSON, which the client sends in two pieces around the stream version (the
one field it cannot know before the lock). The canonical JSON is ASCII (``ensure_ascii``), so
``convert_to`` gives the bytes Python hashes.

The ``events_appended`` trigger counts a whole INSERT at once (a transition table) instead of
updating its one row per event: the count is still kept by the database for every insert,
whatever code does it. SQLite keeps its row trigger and appends from Python.
"""
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

COUNT_FUNCTION = """
CREATE FUNCTION events_appended_count_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE events_appended SET count = events_appended.count + n.c,
           last_position = greatest(events_appended.last_position, n.m)
    FROM (SELECT count(*) AS c, max(position) AS m FROM appended) AS n
    WHERE id = 1 AND n.c > 0;
    RETURN NULL;
END
$$
"""
COUNT_TRIGGER = """
CREATE TRIGGER events_appended_count AFTER INSERT ON events
REFERENCING NEW TABLE AS appended FOR EACH STATEMENT EXECUTE FUNCTION events_appended_count_statement()
"""
ROW_TRIGGER = """
CREATE TRIGGER events_appended_count AFTER INSERT ON events
FOR EACH ROW EXECUTE FUNCTION events_appended_count()
"""

APPEND_FUNCTION = """
CREATE FUNCTION eventstore_append(
    p_stream_id varchar, p_expected integer, p_recorded_at timestamptz,
    p_event_id varchar[], p_type varchar[], p_schema_version integer[], p_subject_id varchar[],
    p_occurred_at timestamptz[], p_occurred_offset_s integer[], p_recorded_by varchar[], p_data json[],
    p_correlation_id varchar[], p_causation_id varchar[], p_canonical_head text[], p_canonical_tail text[],
    OUT version integer, OUT after_position bigint)
LANGUAGE plpgsql AS $$
DECLARE
    n integer := cardinality(p_event_id);
    head_hash varchar;
    prevs varchar[] := '{}';
    hashes varchar[] := '{}';
BEGIN
    SELECT position, hash INTO after_position, head_hash FROM chain_head WHERE id = 1 FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO chain_head (id, position, hash) VALUES (1, 0, repeat('0', 64)) ON CONFLICT (id) DO NOTHING;
        SELECT position, hash INTO after_position, head_hash FROM chain_head WHERE id = 1 FOR UPDATE;
    END IF;
    SELECT coalesce(max(stream_version), 0) INTO version FROM events WHERE stream_id = p_stream_id;
    IF p_expected IS NOT NULL AND p_expected <> version THEN
        after_position := NULL;  -- nothing written: the caller raises WrongExpectedVersion
        RETURN;
    END IF;
    IF n = 0 THEN
        RETURN;
    END IF;
    FOR i IN 1 .. n LOOP
        prevs[i] := head_hash;
        head_hash := encode(sha256(convert_to(
            head_hash || p_canonical_head[i] || (version + i)::text || p_canonical_tail[i], 'UTF8')), 'hex');
        hashes[i] := head_hash;
    END LOOP;
    INSERT INTO events (position, event_id, stream_id, stream_version, type, schema_version, subject_id,
                        occurred_at, occurred_offset_s, recorded_at, recorded_by, data, correlation_id,
                        causation_id, prev_hash, hash)
    SELECT after_position + k, e.event_id, p_stream_id, version + k::integer, e.type, e.schema_version,
           e.subject_id, e.occurred_at, e.occurred_offset_s, p_recorded_at, e.recorded_by, e.data,
           e.correlation_id, e.causation_id, e.prev_hash, e.hash
    FROM unnest(p_event_id, p_type, p_schema_version, p_subject_id, p_occurred_at, p_occurred_offset_s,
                p_recorded_by, p_data, p_correlation_id, p_causation_id, prevs, hashes)
         WITH ORDINALITY AS e(event_id, type, schema_version, subject_id, occurred_at, occurred_offset_s,
                              recorded_by, data, correlation_id, causation_id, prev_hash, hash, k);
    INSERT INTO outbox (position, event_id, attempts, created_at)
    SELECT after_position + k, e.event_id, 0, p_recorded_at FROM unnest(p_event_id) WITH ORDINALITY AS e(event_id, k);
    DELETE FROM patient_heads WHERE stream_id = p_stream_id;
    UPDATE chain_head SET position = after_position + n, hash = head_hash WHERE id = 1;
    PERFORM setval(pg_get_serial_sequence('events', 'position'), after_position + n);
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(COUNT_FUNCTION)
    op.execute("DROP TRIGGER events_appended_count ON events")
    op.execute(COUNT_TRIGGER)
    op.execute(APPEND_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute("DROP FUNCTION eventstore_append")
    op.execute("DROP TRIGGER events_appended_count ON events")
    op.execute(ROW_TRIGGER)
    op.execute("DROP FUNCTION events_appended_count_statement()")
