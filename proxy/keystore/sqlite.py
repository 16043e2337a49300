"""The embedded patient key store: one SQLite file (one proxy replica, or a few on one host)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxy.keystore.base import SqlStore, rows_of, translated


class SqliteStore(SqlStore):
    """A connection per operation (cheap for SQLite, and safe from any thread); write
    transactions are ``BEGIN IMMEDIATE``, so key creation and shredding never interleave.
    The file is created with mode 0600: it holds sealed keys."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.create_schema()

    def __repr__(self) -> str:
        return f"SqliteStore({self.path})"

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        with translated((sqlite3.Error,), "sqlite"):
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                conn.execute("PRAGMA secure_delete = ON")  # shredded keys are overwritten, not just unlinked
                conn.execute("BEGIN IMMEDIATE")

                def run(sql: str, params: Any) -> list[tuple]:
                    return rows_of(conn.execute(sql.replace("%s", "?"), tuple(params)))

                try:
                    yield run
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                conn.close()
