"""Patient key stores for crypto-shredding (see :mod:`proxy.keystore.base`)."""

from __future__ import annotations

from proxy.keystore.base import PatientKeyStore, StoreError


def open_store(location: str) -> PatientKeyStore:
    """``postgresql://…`` / ``postgres://…`` for PostgreSQL, anything else is a SQLite file path
    (``sqlite:///path`` also accepted)."""
    if location.startswith(("postgresql://", "postgres://")):
        from proxy.keystore.postgres import PostgresStore

        return PostgresStore(location)
    from proxy.keystore.sqlite import SqliteStore

    path = location.removeprefix("sqlite://")
    if not path:
        raise StoreError("the patient key store needs a file path or a postgresql:// URL")
    return SqliteStore(path)
