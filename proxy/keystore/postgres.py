"""The shared patient key store for several proxy replicas: PostgreSQL through psycopg 3.

The connection string comes from configuration (``postgresql://…``; put the password in
``PGPASSFILE`` or ``PGPASSWORD``, not in a flag). One connection per store, guarded by a
lock and re-opened after a failure; the proxy calls the store only on patient-key cache
misses and on writes of a new patient, so one connection per replica is enough.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from proxy.keystore.base import SqlStore, StoreError, rows_of, translated


class PostgresStore(SqlStore):
    def __init__(self, conninfo: str, connect_timeout: float = 5.0) -> None:
        try:
            import psycopg
        except ImportError:
            raise StoreError("the PostgreSQL key store needs psycopg: pip install 'fhircrypt[postgres]'") from None
        self._psycopg = psycopg
        self._conninfo, self._timeout = conninfo, connect_timeout
        self._conn: Any = None
        self._lock = threading.Lock()
        self.create_schema()

    def __repr__(self) -> str:
        return "PostgresStore()"  # the connection string may hold a password

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock, translated((self._psycopg.Error,), "postgresql"):
            if self._conn is None or self._conn.closed:
                self._conn = self._psycopg.connect(self._conninfo, connect_timeout=int(self._timeout))
            try:
                with self._conn.transaction(), self._conn.cursor() as cur:

                    def run(sql: str, params: Any) -> list[tuple]:
                        cur.execute(sql, tuple(params))
                        return rows_of(cur)

                    yield run
            except self._psycopg.OperationalError:
                self._conn.close()
                raise

    def _lock_tag(self, run: Any, tag: str) -> None:
        run("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("fhircrypt-patient:" + tag,))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
