"""The database schema, one ``MetaData`` for every service.

Each block is owned by one service (the comment above it says which); no service writes another's
tables. Keeping them in one place lets one Alembic history migrate them all.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Position = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every database.

    SQLite keeps no offset: a Shanghai 08:00 written as is would read back as 08:00 UTC. Every
    time is therefore converted to UTC on the way in, and a naive one read back is UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} would be stored without its zone")
        return value.astimezone(UTC)  # type: ignore[no-any-return]

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)  # type: ignore[no-any-return]


Tz = UtcDateTime()

# --- the event store (shared) ------------------------------------------------------------
events = Table(
    "events",
    metadata,
    Column("position", Position, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("stream_id", String(100), nullable=False),
    Column("stream_version", Integer, nullable=False),
    Column("type", String(64), nullable=False, index=True),
    Column("schema_version", Integer, nullable=False),
    Column("subject_id", String(32), nullable=True, index=True),
    Column("occurred_at", Tz, nullable=False),
    # The offset the clinical time was given in, so it is answered as entered (stored in UTC).
    Column("occurred_offset_s", Integer, nullable=False),
    Column("recorded_at", Tz, nullable=False, index=True),
    Column("recorded_by", String(100), nullable=False),
    Column("data", JSON, nullable=False),
    Column("correlation_id", String(36), nullable=True),
    Column("causation_id", String(36), nullable=True),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    UniqueConstraint("stream_id", "stream_version", name="uq_events_stream_version"),
)

# Rows to publish; written in the same transaction as the event, deleted only after the
# server's ack. The relay reads *all* unpublished rows, never "after the last position".
outbox = Table(
    "outbox",
    metadata,
    Column("position", Position, primary_key=True, autoincrement=False),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", Tz, nullable=False),
)

# The audit hash chain's head: one row, updated under the appending transaction's lock.
chain_head = Table(
    "chain_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("position", Position, nullable=False),
    Column("hash", String(64), nullable=False),
)

# What a write needs to know about a patient without reading the stream (ingest keeps it, in the
# same transaction as each append to the patient's stream; any other append to the stream drops
# the row, and the next write builds it again from the stream).
patient_heads = Table(
    "patient_heads",
    metadata,
    Column("stream_id", String(100), primary_key=True, autoincrement=False),
    Column("subject_id", String(32), nullable=False),
    Column("site_id", String(32), nullable=False),
    Column("arm", String(32), nullable=False),
    Column("stream_version", Integer, nullable=False),
    # The death the corrected history has, if any (CONTRACT: nothing clinical after it).
    Column("death_event_id", String(36), nullable=True),
    Column("death_occurred_at", Tz, nullable=True),
    Column("death_offset_s", Integer, nullable=True),
)

# How many events were ever appended, and the highest position: kept by a database trigger on
# insert into ``events`` (migration 0004), never by the append code, so a tail deleted with the chain
# head rewound to match still shows (``verify_chain``). One row, id 1.
events_appended = Table(
    "events_appended",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("count", Position, nullable=False),
    Column("last_position", Position, nullable=False),
)

# --- consumers (safety, notify): durable idempotency and the dead-letter place -------------
processed_messages = Table(
    "processed_messages",
    metadata,
    Column("consumer", String(64), primary_key=True),
    Column("event_id", String(36), primary_key=True),
    Column("processed_at", Tz, nullable=False),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("consumer", String(64), nullable=False),
    Column("event_id", String(36), nullable=True),
    Column("subject", String(200), nullable=False),
    Column("payload", Text, nullable=False),
    Column("error", Text, nullable=False),
    Column("deliveries", Integer, nullable=False),
    Column("created_at", Tz, nullable=False),
    Column("replayed_at", Tz, nullable=True),
    UniqueConstraint("consumer", "event_id", name="uq_dead_letters_consumer_event"),
)

# Failed deliveries of one message, counted by the consumer itself: the server's own count is a
# hint (it has been seen to restart at 1 after a delayed nak), never the only judge of a dead letter.
delivery_failures = Table(
    "delivery_failures",
    metadata,
    Column("consumer", String(64), primary_key=True),
    Column("message", String(200), primary_key=True),  # "<stream>:<stream sequence>"
    Column("failures", Integer, nullable=False),
    Column("last_error", Text, nullable=False),
    Column("updated_at", Tz, nullable=False),
)

# --- ingest: API tokens and idempotency keys ------------------------------------------------
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user", String(100), nullable=False),
    Column("role", String(20), nullable=False),
    Column("site_id", String(32), nullable=True),
    Column("created_at", Tz, nullable=False),
    Column("revoked_at", Tz, nullable=True),
    Column("expires_at", Tz, nullable=True),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("token_hash", String(64), primary_key=True),
    Column("method_path", String(300), nullable=False),
    Column("body_hash", String(64), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("response", JSON, nullable=False),
    Column("created_at", Tz, nullable=False),
)

# --- ingest: the web pages' sign-in sessions (only hashes: the cookie holds the session id) ---
web_sessions = Table(
    "web_sessions",
    metadata,
    Column("session_hash", String(64), primary_key=True),
    Column("token_hash", String(64), nullable=False),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", Tz, nullable=False),
    Column("expires_at", Tz, nullable=False),
    Column("ended_at", Tz, nullable=True),
)

# --- safety: per-patient projection, stopping-rule state, scheduled due checks --------------
patient_projection = Table(
    "patient_projection",
    metadata,
    Column("subject_id", String(32), primary_key=True),
    Column("site_id", String(32), nullable=False),
    Column("state", JSON, nullable=False),
    Column("last_position", Position, nullable=False),
    Column("updated_at", Tz, nullable=False),
    # The latest recording in the patient's stream: the trial's records have settled once the
    # latest of these is ``entry.settle_seconds`` old (a new stopping-rule crossing waits for it).
    Column("last_recorded_at", Tz, nullable=True, index=True),
)

# What each patient gives each stopping rule (shared/clinical/stopping.py ``RuleInput``), written
# with the patient's evaluation; the rules read these rows instead of folding every patient.
rule_inputs = Table(
    "rule_inputs",
    metadata,
    Column("rule_id", String(64), primary_key=True),
    Column("subject_id", String(32), primary_key=True),
    Column("arm", String(32), nullable=False),
    Column("event", Boolean, nullable=False),
    Column("evaluable_at", Tz, nullable=False),
    Column("counts_from", Tz, nullable=True),
)

# Patients set aside: their evaluation raised, so the others go on being evaluated (the bulkhead).
# The row goes when the patient evaluates again without error.
patient_failures = Table(
    "patient_failures",
    metadata,
    Column("subject_id", String(32), primary_key=True),
    Column("error", Text, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("failed_at", Tz, nullable=False),  # the latest failure
)

stopping_rule_state = Table(
    "stopping_rule_state",
    metadata,
    Column("rule_id", String(64), primary_key=True),
    Column("state", JSON, nullable=False),
    Column("updated_at", Tz, nullable=False),
)

# Who does what exactly once among several safety workers (the stopping rules and the due checks):
# the holder renews its lease; another takes it over once it has expired.
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(100), nullable=False),
    Column("expires_at", Tz, nullable=False),
)

# Bumped (in the same transaction) whenever a patient's rule inputs change: the rules' follower
# looks again when it moves, whichever worker evaluated the patient.
rule_inputs_version = Table(
    "rule_inputs_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
    Column("cause_event_id", String(36), nullable=True),
)

due_checks = Table(
    "due_checks",
    metadata,
    Column("subject_id", String(32), primary_key=True),
    Column("check", String(32), primary_key=True),
    Column("due_at", Tz, nullable=False, index=True),
    Column("done", Boolean, nullable=False, default=False),
)

# --- notify: one row per (alert event, recipient); the digest ledger -------------------------
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alert_event_id", String(36), nullable=False),
    Column("recipient", String(320), nullable=False),
    Column("status", String(16), nullable=False),  # pending | sending | sent
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Tz, nullable=False),
    Column("claimed_until", Tz, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("message_id", String(200), nullable=False),
    Column("created_at", Tz, nullable=False),
    Column("sent_at", Tz, nullable=True),
    UniqueConstraint("alert_event_id", "recipient", name="uq_deliveries_alert_recipient"),
)

digests = Table(
    "digests",
    metadata,
    Column("period_key", String(64), primary_key=True),
    Column("status", String(16), nullable=False),  # sending | sent
    Column("data_cutoff", Tz, nullable=False),
    Column("claimed_by", String(100), nullable=True),
    Column("claimed_until", Tz, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("message_id", String(200), nullable=False),
    Column("summary", JSON, nullable=True),
    Column("created_at", Tz, nullable=False),
    Column("sent_at", Tz, nullable=True),
)
