"""The patient key store: sealed patient keys, shred tombstones and the legal-hold list.

One SQL schema serves both back ends (SQLite embedded, PostgreSQL for several replicas);
they differ only in how a connection and a transaction are made. The store holds no
patient id and no key in the clear: patients are named by their keyed tag, keys are
sealed by a keyring master key (:mod:`proxy.keymgmt.patientkeys`), and a legal hold's
patient reference is sealed the same way so ``hold list`` can show it to a keyring holder.

Shredding and key creation for one patient are serialised (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: a transaction-scoped advisory lock on the tag), so a key can never be created
for a patient after its tombstone was written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol, TypeVar

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fhircrypt_patient_keys (
        handle TEXT PRIMARY KEY, tag TEXT, kid TEXT NOT NULL, sealed TEXT NOT NULL, created TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS fhircrypt_patient_keys_tag ON fhircrypt_patient_keys (tag)",
    """CREATE TABLE IF NOT EXISTS fhircrypt_shredded_patients (
        tag TEXT PRIMARY KEY, shredded_at TEXT NOT NULL, shredded_by TEXT NOT NULL, reason TEXT NOT NULL,
        keys_destroyed INTEGER NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS fhircrypt_shredded_keys (handle TEXT PRIMARY KEY, tag TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS fhircrypt_legal_holds (
        tag TEXT PRIMARY KEY, patient TEXT NOT NULL, until TEXT NOT NULL, reason TEXT NOT NULL,
        added_by TEXT NOT NULL, added_at TEXT NOT NULL)""",
)


T = TypeVar("T")


class StoreError(Exception):
    """The store cannot be reached or used; messages name no patient and no key."""


class PatientShredded(Exception):
    """The patient's keys were destroyed: nothing new is written for it."""

    def __init__(self, tombstone: Tombstone) -> None:
        super().__init__("the patient was crypto-shredded")
        self.tombstone = tombstone


class LegalHoldActive(Exception):
    """Shredding refused: the patient is on legal hold."""

    def __init__(self, hold: Hold) -> None:
        super().__init__(f"the patient is on legal hold until {hold.until} ({hold.reason})")
        self.hold = hold


@dataclass(frozen=True)
class StoredKey:
    handle: str
    tag: str | None  # None: created for a Patient whose id the server has not assigned yet
    kid: str  # the keyring master key that sealed it
    sealed: str

    def __repr__(self) -> str:
        return f"StoredKey({self.handle[:10]}…, bound={self.tag is not None})"


@dataclass(frozen=True)
class Tombstone:
    tag: str
    shredded_at: str
    shredded_by: str
    reason: str
    keys_destroyed: int


@dataclass(frozen=True)
class Hold:
    tag: str
    patient: str  # sealed reference
    until: str  # ISO date: shredding is refused until the end of that day
    reason: str
    added_by: str
    added_at: str


class PatientKeyStore(Protocol):
    def lookup(self, handles: set[str]) -> tuple[list[StoredKey], set[str]]: ...
    def key_for_patient(self, tag: str) -> StoredKey | None: ...
    def add_key(self, key: StoredKey) -> None: ...
    def bind(self, handle: str, tag: str, kid: str, sealed: str) -> bool: ...
    def unbound(self) -> int: ...
    def shred(self, tag: str, by: str, reason: str, today: date | None = None) -> Tombstone: ...
    def tombstone(self, tag: str) -> Tombstone | None: ...
    def add_hold(self, hold: Hold) -> None: ...
    def remove_hold(self, tag: str) -> bool: ...
    def holds(self) -> list[Hold]: ...
    def close(self) -> None: ...


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SqlStore:
    """The store's logic in portable SQL. Subclasses provide :meth:`_transaction` (yielding a
    function ``run(sql, params) -> rows``, with ``%s`` placeholders) and :meth:`_lock_tag`."""

    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _lock_tag(self, run: Any, tag: str) -> None:
        """Serialise key creation and shredding for one patient (nothing to do where the whole
        write transaction is exclusive)."""

    def create_schema(self) -> None:
        with self._transaction() as run:
            for statement in SCHEMA:
                run(statement, ())

    def close(self) -> None:
        """Release connections (none are held by default)."""

    # ------------------------------------------------------------------ keys

    def lookup(self, handles: set[str]) -> tuple[list[StoredKey], set[str]]:
        """The stored keys among ``handles``, and which of them were shredded."""
        if not handles:
            return [], set()
        names = sorted(handles)
        marks = ",".join(["%s"] * len(names))
        with self._transaction() as run:
            rows = run(_KEYS + f"WHERE handle IN ({marks})", names)
            gone = run(f"SELECT handle FROM fhircrypt_shredded_keys WHERE handle IN ({marks})", names)
        return [StoredKey(*row) for row in rows], {row[0] for row in gone}

    def key_for_patient(self, tag: str) -> StoredKey | None:
        """The patient's (oldest) key; raises PatientShredded after a shred."""
        with self._transaction() as run:
            stone = self._tombstone(run, tag)
            if stone is not None:
                raise PatientShredded(stone)
            return _first(run, StoredKey, _KEYS + "WHERE tag = %s ORDER BY created, handle LIMIT 1", tag)

    def add_key(self, key: StoredKey) -> None:
        """Store a new key; refused (PatientShredded) if the patient was shredded meanwhile."""
        with self._transaction() as run:
            if key.tag is not None:
                self._lock_tag(run, key.tag)
                stone = self._tombstone(run, key.tag)
                if stone is not None:
                    raise PatientShredded(stone)
            run(
                "INSERT INTO fhircrypt_patient_keys (handle, tag, kid, sealed, created) VALUES (%s, %s, %s, %s, %s)",
                (key.handle, key.tag, key.kid, key.sealed, now()),
            )

    def bind(self, handle: str, tag: str, kid: str, sealed: str) -> bool:
        """Bind a key created before the server assigned the Patient's id; False if already bound or gone."""
        with self._transaction() as run:
            self._lock_tag(run, tag)
            if self._tombstone(run, tag) is not None:
                return False
            rows = run(
                "UPDATE fhircrypt_patient_keys SET tag = %s, kid = %s, sealed = %s WHERE handle = %s AND tag IS NULL "
                "RETURNING handle",
                (tag, kid, sealed, handle),
            )
        return bool(rows)

    def unbound(self) -> int:
        """How many keys were created for Patients whose server-assigned id was never seen."""
        with self._transaction() as run:
            return int(run("SELECT count(*) FROM fhircrypt_patient_keys WHERE tag IS NULL", ())[0][0])

    # ------------------------------------------------------------------ shredding and holds

    def shred(self, tag: str, by: str, reason: str, today: date | None = None) -> Tombstone:
        """Destroy every key of the patient and write the tombstone, unless a legal hold is active.
        Shredding an already shredded patient returns the existing tombstone."""
        today = today or datetime.now(UTC).date()
        with self._transaction() as run:
            self._lock_tag(run, tag)
            stone = self._tombstone(run, tag)
            if stone is not None:
                return stone
            hold = _first(run, Hold, _HOLDS + "WHERE tag = %s", tag)
            if hold is not None and date.fromisoformat(hold.until) >= today:
                raise LegalHoldActive(hold)
            handles = [r[0] for r in run("DELETE FROM fhircrypt_patient_keys WHERE tag = %s RETURNING handle", (tag,))]
            for handle in handles:
                run("INSERT INTO fhircrypt_shredded_keys (handle, tag) VALUES (%s, %s)", (handle, tag))
            stone = Tombstone(tag, now(), by, reason, len(handles))
            run(
                "INSERT INTO fhircrypt_shredded_patients (tag, shredded_at, shredded_by, reason, keys_destroyed) "
                "VALUES (%s, %s, %s, %s, %s)",
                (stone.tag, stone.shredded_at, stone.shredded_by, stone.reason, stone.keys_destroyed),
            )
        return stone

    def tombstone(self, tag: str) -> Tombstone | None:
        with self._transaction() as run:
            return self._tombstone(run, tag)

    @staticmethod
    def _tombstone(run: Any, tag: str) -> Tombstone | None:
        return _first(run, Tombstone, _TOMBSTONES + "WHERE tag = %s", tag)

    def add_hold(self, hold: Hold) -> None:
        """Add or replace the patient's hold."""
        with self._transaction() as run:
            run("DELETE FROM fhircrypt_legal_holds WHERE tag = %s", (hold.tag,))
            run(
                "INSERT INTO fhircrypt_legal_holds (tag, patient, until, reason, added_by, added_at) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (hold.tag, hold.patient, hold.until, hold.reason, hold.added_by, hold.added_at),
            )

    def remove_hold(self, tag: str) -> bool:
        with self._transaction() as run:
            return bool(run("DELETE FROM fhircrypt_legal_holds WHERE tag = %s RETURNING tag", (tag,)))

    def holds(self) -> list[Hold]:
        with self._transaction() as run:
            return [Hold(*row) for row in run(_HOLDS + "ORDER BY until, tag", ())]


_KEYS = "SELECT handle, tag, kid, sealed FROM fhircrypt_patient_keys "
_HOLDS = "SELECT tag, patient, until, reason, added_by, added_at FROM fhircrypt_legal_holds "
_TOMBSTONES = "SELECT tag, shredded_at, shredded_by, reason, keys_destroyed FROM fhircrypt_shredded_patients "


def _first(run: Any, row_type: type[T], sql: str, tag: str) -> T | None:
    rows = run(sql, (tag,))
    return row_type(*rows[0]) if rows else None


def rows_of(cursor: Any) -> list[tuple]:
    """All rows of the last statement, or [] when it returned none."""
    return [tuple(row) for row in cursor.fetchall()] if cursor.description is not None else []


@contextlib.contextmanager
def translated(errors: tuple[type[BaseException], ...], what: str) -> Iterator[None]:
    """Turn a driver's errors into StoreError (their messages may quote SQL parameters: dropped)."""
    try:
        yield
    except errors as exc:
        raise StoreError(f"the patient key store ({what}) failed: {type(exc).__name__}") from None
