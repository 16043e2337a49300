"""Per-patient keys for crypto-shredding: handles, tags, wrapping and the bounded cache.

With ``keys: {per_patient: true}`` in the policy, the per-record data key of a resource in
one patient's compartment is wrapped by that patient's own random 256-bit key instead of
the keyring's master key. Destroying the patient key (``fhircrypt shred``) then makes every
version and every backup of those records unreadable, without touching the upstream.

Names, chosen so that neither the upstream nor the key store learns patient ids:

* **handle** - ``p_`` + 32 lowercase hex digits (128 random bits). It is the envelope's key
  id, so the upstream sees only a random handle; records of one patient share it (the
  upstream can group them, which it can already do through ``subject`` references).
* **tag** - the key store's name for a patient: a 128-bit HMAC of ``Patient/<id>`` under a
  key derived from the keyring's blind-index root. The store never holds a patient id, and
  a stolen store cannot be searched for one without the keyring.

A patient key is stored sealed by a keyring master key (AES-256-GCM, associated data =
handle and tag, so a sealed key moved to another row does not open), not by the KEK: the
master keys are in memory already, so a cache miss never calls the HSM or KMS.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.crypto.encoding import b64d, b64e
from proxy.crypto.envelope import IntegrityError
from proxy.keymgmt.keyring import Keyring

HANDLE_PREFIX = "p_"
HANDLE = re.compile(r"^p_[0-9a-f]{32}$")
TAG_LABEL = "fhircrypt/patient-key-tag"
_US = "\x1f"
V = TypeVar("V")


class KeyShredded(IntegrityError):
    """The envelope names a patient key that was destroyed on purpose (not damage)."""


class PatientKeyError(Exception):
    """A stored patient key that cannot be opened (wrong keyring or a tampered row)."""


def new_handle() -> str:
    return HANDLE_PREFIX + os.urandom(16).hex()


def is_handle(kid: object) -> bool:
    return isinstance(kid, str) and HANDLE.match(kid) is not None


def patient_tag(keyring: Keyring, patient_id: str) -> str:
    """The key store's name for ``Patient/<patient_id>`` (keyed: reveals nothing without the keyring)."""
    return keyring.indexer.token(TAG_LABEL, "Patient/" + patient_id)


def _aad(handle: str, tag: str | None) -> bytes:
    return _US.join(("fhircrypt/v1 patient-key", handle, tag or "")).encode()


def _seal(keyring: Keyring, aad: bytes, data: bytes) -> tuple[str, str]:
    kid, master = keyring.primary()
    nonce = os.urandom(12)
    return kid, b64e(nonce + AESGCM(master).encrypt(nonce, data, aad))


def _open(keyring: Keyring, kid: str, aad: bytes, sealed: str, what: str) -> bytes:
    master = keyring.master_key(kid)
    if master is None:
        raise PatientKeyError(f"{what} is sealed by key '{kid[:8]}' that is not in the keyring")
    try:
        raw = b64d(sealed)
        return AESGCM(master).decrypt(raw[:12], raw[12:], aad)
    except (ValueError, InvalidTag):
        raise PatientKeyError(f"{what} does not open: wrong keyring or a modified row") from None


def seal_patient_key(keyring: Keyring, handle: str, tag: str | None, key: bytes) -> tuple[str, str]:
    """(master key id, sealed key) for the store. ``tag`` None: a key not yet bound to a patient."""
    return _seal(keyring, _aad(handle, tag), key)


def open_patient_key(keyring: Keyring, handle: str, tag: str | None, kid: str, sealed: str) -> bytes:
    key = _open(keyring, kid, _aad(handle, tag), sealed, f"patient key {handle[:10]}…")
    if len(key) != 32:
        raise PatientKeyError(f"patient key {handle[:10]}… has the wrong length")
    return key


def seal_reference(keyring: Keyring, tag: str, reference: str) -> str:
    """A patient reference sealed for the legal-hold list (``kid:sealed``), bound to its tag."""
    kid, sealed = _seal(keyring, _US.join(("fhircrypt/v1 hold", tag)).encode(), reference.encode())
    return f"{kid}:{sealed}"


def open_reference(keyring: Keyring, tag: str, text: str) -> str:
    kid, _, sealed = text.partition(":")
    return _open(keyring, kid, _US.join(("fhircrypt/v1 hold", tag)).encode(), sealed, "a legal hold").decode()


class PatientKeyCache:
    """Unsealed patient keys in memory, bounded in number and age.

    The age bound is what makes a shred reach every replica: a replica keeps using a
    cached key for at most ``ttl`` seconds after it was read from the store, so a shred
    is honoured everywhere within ``ttl`` (plus one store round trip). ``repr`` never
    shows keys.
    """

    def __init__(self, max_entries: int = 10_000, ttl: float = 60.0) -> None:
        if max_entries < 1 or ttl <= 0:
            raise ValueError("the patient key cache needs max_entries >= 1 and ttl > 0")
        self.max_entries, self.ttl = max_entries, ttl
        self._keys: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._handles: OrderedDict[str, tuple[float, str]] = OrderedDict()  # tag -> handle, for writes
        self._shredded: OrderedDict[str, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"PatientKeyCache(entries={len(self._keys)}, ttl={self.ttl})"

    def get(self, handle: str) -> bytes | None:
        return _fresh(self._keys, handle, self.ttl)

    def handle_for(self, tag: str) -> str | None:
        """The cached handle of a patient's key, for writes (same age bound as the keys)."""
        return _fresh(self._handles, tag, self.ttl)

    def put(self, handle: str, key: bytes, tag: str | None = None) -> None:
        _store(self._keys, handle, key, self.max_entries)
        if tag is not None:
            _store(self._handles, tag, handle, self.max_entries)

    def mark_shredded(self, handle: str) -> None:
        """Remember a destroyed handle (never comes back, so no age bound; bounded in number)."""
        self._keys.pop(handle, None)
        self._shredded[handle] = None
        while len(self._shredded) > self.max_entries:
            self._shredded.popitem(last=False)

    def is_shredded(self, handle: str) -> bool:
        return handle in self._shredded

    def missing(self, handles: set[str]) -> set[str]:
        """The handles neither cached (and fresh) nor known to be shredded."""
        return {h for h in handles if not self.is_shredded(h) and self.get(h) is None}


def _fresh(table: OrderedDict[str, tuple[float, V]], name: str, ttl: float) -> V | None:
    """The value of ``name`` if read at most ``ttl`` seconds ago (then most recently used), else None."""
    entry = table.get(name)
    if entry is None:
        return None
    if time.monotonic() - entry[0] > ttl:
        del table[name]
        return None
    table.move_to_end(name)
    return entry[1]


def _store(table: OrderedDict[str, tuple[float, V]], name: str, value: V, max_entries: int) -> None:
    table[name] = (time.monotonic(), value)
    table.move_to_end(name)
    while len(table) > max_entries:
        table.popitem(last=False)


class ReadKeys:
    """What :meth:`RecordCipher.open_envelope` looks keys up in: the keyring's master keys and
    the cached patient keys. A shredded handle raises :class:`KeyShredded`; an unknown one is
    ``None``, an integrity failure like any key that is not in the keyring."""

    __slots__ = ("cache", "keyring")

    def __init__(self, keyring: Keyring, cache: PatientKeyCache) -> None:
        self.keyring, self.cache = keyring, cache

    def __repr__(self) -> str:
        return f"ReadKeys({self.keyring!r}, {self.cache!r})"

    def master_key(self, kid: str) -> bytes | None:
        if not kid.startswith(HANDLE_PREFIX):
            return self.keyring.master_key(kid)
        if self.cache.is_shredded(kid):
            raise KeyShredded("the patient key of this record was shredded")
        return self.cache.get(kid)
