"""The SQLite store (broker.store.sqlite.store), assembled from one part per concern."""

from broker.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from broker.store.sqlite.store import SqliteStore

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SqliteStore"]
