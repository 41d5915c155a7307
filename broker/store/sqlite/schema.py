"""The SQLite store's schema, as migrations counted by PRAGMA user_version."""

from __future__ import annotations

SCHEMA_V1 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('fence_counter', 0), ('events_trimmed_upto', 0);
CREATE TABLE fences (session_id TEXT PRIMARY KEY, token INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE sessions (
  session_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, enabled INTEGER NOT NULL,
  created_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE credentials (
  session_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, sealed BLOB NOT NULL);
CREATE TABLE outbox (
  session_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, depth INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE messages (
  id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, sequence INTEGER NOT NULL,
  message_id TEXT NOT NULL, recipient TEXT NOT NULL, body TEXT NOT NULL,
  idempotency_key TEXT NOT NULL, accepted_at REAL NOT NULL, acked_at REAL);
CREATE UNIQUE INDEX messages_by_key ON messages (session_id, idempotency_key);
CREATE UNIQUE INDEX messages_by_id ON messages (session_id, message_id);
CREATE INDEX messages_unacked ON messages (session_id, sequence) WHERE acked_at IS NULL;
CREATE INDEX messages_acked ON messages (acked_at) WHERE acked_at IS NOT NULL;
CREATE TABLE events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, event TEXT NOT NULL);
CREATE TABLE last_events (
  session_id TEXT PRIMARY KEY, event_id INTEGER NOT NULL, event TEXT NOT NULL);
CREATE TABLE inbound (
  id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
  upstream_id TEXT NOT NULL, sender TEXT NOT NULL, body TEXT NOT NULL,
  received_at REAL NOT NULL);
CREATE UNIQUE INDEX inbound_by_upstream ON inbound (session_id, upstream_id);
CREATE INDEX inbound_by_session ON inbound (session_id, id);
CREATE INDEX inbound_by_age ON inbound (session_id, received_at);
CREATE TABLE inbound_groups (
  session_id TEXT NOT NULL, grp TEXT NOT NULL, last_id INTEGER NOT NULL,
  PRIMARY KEY (session_id, grp)) WITHOUT ROWID;
CREATE TABLE inbound_pending (
  session_id TEXT NOT NULL, grp TEXT NOT NULL, inbound_id INTEGER NOT NULL,
  consumer TEXT NOT NULL, delivered_at REAL NOT NULL, deliveries INTEGER NOT NULL,
  PRIMARY KEY (session_id, grp, inbound_id)) WITHOUT ROWID;
"""

SCHEMA_V2_KV = """
CREATE TABLE kv (
  session_id TEXT NOT NULL, name TEXT NOT NULL, key_id TEXT NOT NULL, sealed BLOB NOT NULL,
  PRIMARY KEY (session_id, name)) WITHOUT ROWID;
"""
"""The per-session key-value area (a database of schema 1 gains an empty table)."""

SCHEMA_V3_REFUSED = """
ALTER TABLE messages ADD COLUMN refused_code INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN refused TEXT NOT NULL DEFAULT '';
"""
"""Why the upstream refused a settled message ('' for an acked one)."""

SCHEMA_V4_ORIGIN = """
ALTER TABLE inbound ADD COLUMN origin TEXT NOT NULL DEFAULT '';
"""
"""An inbound message's sender LID, push name, chat and send time (InboundOrigin JSON)."""

SCHEMA_V5_CONTENT = """
ALTER TABLE messages ADD COLUMN content BLOB;
"""
"""A message's content beyond text (broker.content's stored payload; NULL: plain text)."""

SCHEMA_V6_INBOUND_CONTENT = """
ALTER TABLE inbound ADD COLUMN content BLOB;
ALTER TABLE inbound ADD COLUMN media BLOB;
"""
"""An inbound message's content beyond text (broker.content's stored payload) and its
medium's bytes (read only by DownloadMedia; they go with the row)."""

MIGRATIONS: tuple[str, ...] = (SCHEMA_V1, SCHEMA_V2_KV, SCHEMA_V3_REFUSED, SCHEMA_V4_ORIGIN,
                               SCHEMA_V5_CONTENT, SCHEMA_V6_INBOUND_CONTENT)
"""Schema steps in order; PRAGMA user_version counts those applied. Append, never edit."""

SCHEMA_VERSION = len(MIGRATIONS)
