"""PostgreSQL: a group commit's batch stored in one round trip

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 16:30:00

``eventstore_append_batch`` stores what the ingest's group commit decided (``eventstore.Batch``
without the lock taken first): it locks the chain head, checks that every stream the batch read
is still at the version it read (after the lock: a plpgsql statement takes a fresh snapshot, so
it sees what the previous holder committed), and only then numbers the events after the chain
head, hash-chains them over the canonical JSON the client sends (complete: the client knows each
event's stream version, only the position and the previous hash are the server's), inserts them
and their outbox rows, drops the patient heads of streams appended without one, writes the
patient heads the batch kept, and moves the chain head. A stream found at another version makes
it write nothing and name the streams (the caller decides again with the lock taken first).
SQLite appends from Python.
"""
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

APPEND_BATCH_FUNCTION = """
CREATE FUNCTION eventstore_append_batch(
    p_check_stream varchar[], p_check_version integer[],
    p_event_id varchar[], p_stream_id varchar[], p_stream_version integer[], p_type varchar[],
    p_schema_version integer[], p_subject_id varchar[], p_occurred_at timestamptz[],
    p_occurred_offset_s integer[], p_recorded_at timestamptz[], p_recorded_by varchar[], p_data json[],
    p_correlation_id varchar[], p_causation_id varchar[], p_canonical text[], p_unkept varchar[],
    p_head_stream varchar[], p_head_subject varchar[], p_head_site varchar[], p_head_arm varchar[],
    p_head_version integer[], p_head_death_event_id varchar[], p_head_death_occurred_at timestamptz[],
    p_head_death_offset_s integer[],
    OUT after_position bigint, OUT stale varchar[])
LANGUAGE plpgsql AS $$
DECLARE
    n integer := cardinality(p_event_id);
    head_hash varchar;
    canonical text;
    prevs varchar[] := '{}';
    hashes varchar[] := '{}';
BEGIN
    SELECT position, hash INTO after_position, head_hash FROM chain_head WHERE id = 1 FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO chain_head (id, position, hash) VALUES (1, 0, repeat('0', 64)) ON CONFLICT (id) DO NOTHING;
        SELECT position, hash INTO after_position, head_hash FROM chain_head WHERE id = 1 FOR UPDATE;
    END IF;
    SELECT array_agg(c.stream_id) INTO stale
    FROM unnest(p_check_stream, p_check_version) AS c(stream_id, version)
    WHERE coalesce((SELECT max(e.stream_version) FROM events e WHERE e.stream_id = c.stream_id), 0) <> c.version;
    IF stale IS NOT NULL THEN
        after_position := NULL;  -- nothing written: the caller decides again under the lock
        RETURN;
    END IF;
    n := coalesce(n, 0);
    -- FOREACH and array_append, not p_canonical[i]: indexing an array of texts walks it from the
    -- start each time, quadratic for a bulk import's thousands of events.
    FOREACH canonical IN ARRAY coalesce(p_canonical, '{}') LOOP
        prevs := array_append(prevs, head_hash);
        head_hash := encode(sha256(convert_to(head_hash || canonical, 'UTF8')), 'hex');
        hashes := array_append(hashes, head_hash);
    END LOOP;
    INSERT INTO events (position, event_id, stream_id, stream_version, type, schema_version, subject_id,
                        occurred_at, occurred_offset_s, recorded_at, recorded_by, data, correlation_id,
                        causation_id, prev_hash, hash)
    SELECT after_position + e.k, e.event_id, e.stream_id, e.stream_version, e.type, e.schema_version,
           e.subject_id, e.occurred_at, e.occurred_offset_s, e.recorded_at, e.recorded_by, e.data,
           e.correlation_id, e.causation_id, e.prev_hash, e.hash
    FROM unnest(p_event_id, p_stream_id, p_stream_version, p_type, p_schema_version, p_subject_id,
                p_occurred_at, p_occurred_offset_s, p_recorded_at, p_recorded_by, p_data, p_correlation_id,
                p_causation_id, prevs, hashes)
         WITH ORDINALITY AS e(event_id, stream_id, stream_version, type, schema_version, subject_id,
                              occurred_at, occurred_offset_s, recorded_at, recorded_by, data, correlation_id,
                              causation_id, prev_hash, hash, k);
    INSERT INTO outbox (position, event_id, attempts, created_at)
    SELECT after_position + e.k, e.event_id, 0, e.recorded_at
    FROM unnest(p_event_id, p_recorded_at) WITH ORDINALITY AS e(event_id, recorded_at, k);
    IF cardinality(p_unkept) > 0 THEN
        DELETE FROM patient_heads WHERE stream_id = ANY(p_unkept);
    END IF;
    IF cardinality(p_head_stream) > 0 THEN
        INSERT INTO patient_heads (stream_id, subject_id, site_id, arm, stream_version, death_event_id,
                                   death_occurred_at, death_offset_s)
        SELECT * FROM unnest(p_head_stream, p_head_subject, p_head_site, p_head_arm, p_head_version,
                             p_head_death_event_id, p_head_death_occurred_at, p_head_death_offset_s)
        ON CONFLICT (stream_id) DO UPDATE SET
            subject_id = excluded.subject_id, site_id = excluded.site_id, arm = excluded.arm,
            stream_version = excluded.stream_version, death_event_id = excluded.death_event_id,
            death_occurred_at = excluded.death_occurred_at, death_offset_s = excluded.death_offset_s;
    END IF;
    IF n > 0 THEN
        UPDATE chain_head SET position = after_position + n, hash = head_hash WHERE id = 1;
        PERFORM setval(pg_get_serial_sequence('events', 'position'), after_position + n);
    END IF;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(APPEND_BATCH_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute("DROP FUNCTION eventstore_append_batch")
