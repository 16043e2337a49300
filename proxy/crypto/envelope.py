"""Per-record encryption: data key, element and group ciphertexts, and the record MAC.

Each written resource gets a fresh 512-bit data key: the first half is the AES-256-GCM
key for its elements, the second half the HMAC-SHA256 key of its record MAC (two keys,
so one key never serves two primitives). The data key is wrapped (AES key wrap) by
the keyring's primary master key and stored once, in the resource's envelope::

    v1.<key id>.<record id>.<wrapped data key>.<record MAC>      (base64url fields)

An element ciphertext is ``v1.`` + base64url(nonce || ciphertext || tag) with a random
96-bit nonce and associated data binding it to its place::

    "fhircrypt/v1" US resourceType US recordId US fieldId US elementPath

so a ciphertext moved to another element, another resource or another policy field
fails to decrypt. The record MAC covers the key id and the (path, ciphertext) list
sorted by path, detecting elements that were removed, added or swapped as a whole.

Format v2 (the version written since issue 16) keeps every field above under ``v2`` and adds
the *group ciphertext*: the elements of one access group are sealed together, in one
AES-GCM call, as ``v2.<group>.`` + base64url(nonce || ciphertext || tag) with the associated
data ``"fhircrypt/v2" US resourceType US recordId US group``. Its plaintext says where each
element belongs (``docs/at-rest-format.md``); the record MAC covers the group ciphertexts
beside the elements' locations.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from proxy.crypto.encoding import b64d, b64d_fast, b64e

VERSION = "v2"  # what new records are written in
VERSIONS = ("v1", "v2")  # what is read


def grouped_envelope(envelope: object) -> bool:
    """Whether a record's elements are marked as format v2 does (sealed in group ciphertexts), read from its
    envelope string before it is opened; an envelope forged to say otherwise fails the record MAC."""
    return type(envelope) is str and not envelope.startswith("v1.")


_US, _RS = "\x1f", "\x1e"  # unit and record separators: never part of a path or field id
_NONCE_BATCH = 32  # nonces drawn per OS call: a Patient under the SATUSEHAT policy seals 22 elements


class IntegrityError(Exception):
    """Ciphertext, envelope or MAC that does not verify. Carries no values."""


class KeyLookup(Protocol):
    """Where envelope key ids are looked up: a keyring, or one that also knows patient keys
    (a Protocol, so these primitives do not depend on key management, :mod:`proxy.keymgmt`)."""

    def master_key(self, kid: str) -> bytes | None: ...


class WrapKeys(Protocol):
    """What wraps new data keys: a keyring's primary master key (:meth:`proxy.keymgmt.keyring.Keyring.primary`)."""

    def primary(self) -> tuple[str, bytes]: ...


def associated_data(resource_type: str, record_id: str, field_id: str, path: str, version: str = "v1") -> bytes:
    return _US.join((f"fhircrypt/{version}", resource_type, record_id, field_id, path)).encode()


def group_associated_data(resource_type: str, record_id: str, group: str) -> bytes:
    """A group ciphertext's: four fields where an element's has five, so neither can pass for the other."""
    return _US.join(("fhircrypt/v2", resource_type, record_id, group)).encode()


class RecordCipher:
    """Encrypts or decrypts the elements of one resource version."""

    __slots__ = (
        "_aad_prefix",
        "_aead",
        "_mac_key",
        "_nonces",
        "_prefix",
        "key_id",
        "record_id",
        "resource_type",
        "version",
        "wrapped",
    )

    def __init__(
        self, resource_type: str, key_id: str, record_id: str, data_key: bytes, wrapped: bytes, version: str = VERSION
    ) -> None:
        self.resource_type, self.key_id, self.record_id, self.wrapped = resource_type, key_id, record_id, wrapped
        self.version = version
        self._prefix = version + "."
        self._aead = AESGCM(data_key[:32])
        self._mac_key = data_key[32:]
        # the part of every element's associated data that is the same for the whole record
        self._aad_prefix = _US.join((f"fhircrypt/{version}", resource_type, record_id)).encode()
        self._nonces = b""  # random bytes drawn in one call and used 12 at a time (see _nonce)

    @property
    def grouped(self) -> bool:
        """Whether the record's elements are sealed per group (format v2) rather than one by one (v1)."""
        return self.version != "v1"

    def __repr__(self) -> str:
        return f"RecordCipher({self.resource_type}, key={self.key_id})"

    @classmethod
    def new(
        cls, keyring: WrapKeys, resource_type: str, wrap: tuple[str, bytes] | None = None, version: str = VERSION
    ) -> RecordCipher:
        """A fresh data key, wrapped by ``wrap`` (key id, key) - a patient key - or else the primary."""
        kid, master = wrap or keyring.primary()
        data_key = secrets.token_bytes(64)
        record_id = b64e(secrets.token_bytes(12))
        return cls(resource_type, kid, record_id, data_key, aes_key_wrap(master, data_key), version)

    @classmethod
    def open_envelope(cls, keyring: KeyLookup, resource_type: str, envelope: str) -> tuple[RecordCipher, bytes]:
        """Parse an envelope string; returns the cipher and the stored record MAC."""
        parts = envelope.split(".") if isinstance(envelope, str) else []
        if len(parts) != 5 or parts[0] not in VERSIONS:
            raise IntegrityError("envelope has an unknown format")
        _, kid, record_id, wrapped_text, mac_text = parts
        master = keyring.master_key(kid)
        if master is None:
            raise IntegrityError(f"envelope names key '{kid[:8]}' that is not in the keyring")
        try:
            wrapped, mac = b64d(wrapped_text), b64d(mac_text)
            data_key = aes_key_unwrap(master, wrapped)
        except (ValueError, InvalidUnwrap):
            raise IntegrityError("envelope data key does not unwrap") from None
        if len(data_key) != 64 or len(b64d(record_id)) != 12:
            raise IntegrityError("envelope has an unknown format")
        return cls(resource_type, kid, record_id, data_key, wrapped, parts[0]), mac

    def envelope(self, mac: bytes) -> str:
        return ".".join((self.version, self.key_id, self.record_id, b64e(self.wrapped), b64e(mac)))

    def _aad(self, field_id: str, path: str) -> bytes:
        """:func:`associated_data` for this record, without re-joining its fixed part per element."""
        return self._aad_prefix + f"{_US}{field_id}{_US}{path}".encode()

    def _nonce(self) -> bytes:
        """A fresh random 96-bit nonce.

        Drawing from the OS (``secrets.token_bytes``, i.e. ``os.urandom``) is a system call that
        costs about as much as the AES-GCM encryption of a small element, so a record's nonces
        are drawn from the OS in one call. Each
        12-byte slice is used once, so the nonces are exactly as random and as unique as
        separate calls would make them.
        """
        if not self._nonces:
            self._nonces = secrets.token_bytes(12 * _NONCE_BATCH)
        nonce, self._nonces = self._nonces[:12], self._nonces[12:]
        return nonce

    def seal(self, field_id: str, path: str, plaintext: bytes) -> str:
        """Encrypt one element under a fresh random nonce: callers never choose nonces (a repeated
        GCM nonce under one data key leaks plaintext XORs and the authentication key)."""
        return self._prefix + self._encrypt(plaintext, self._aad(field_id, path))

    def open(self, field_id: str, path: str, ciphertext: str) -> bytes:
        if type(ciphertext) is not str or not ciphertext.startswith(self._prefix):
            raise IntegrityError("ciphertext has an unknown version")
        return self._decrypt(ciphertext[3:], self._aad(field_id, path))  # 3 = len("v1.")

    def seal_group(self, group: str, plaintext: bytes) -> str:
        """Encrypt the elements of one group together (format v2): ``v2.<group>.<nonce||ct||tag>``."""
        if not self.grouped:
            raise ValueError("format v1 has no group ciphertexts")
        aad = group_associated_data(self.resource_type, self.record_id, group)
        return f"{self._prefix}{group}.{self._encrypt(plaintext, aad)}"

    def open_group(self, ciphertext: str) -> tuple[str, bytes]:
        """The group a group ciphertext names, and its plaintext; IntegrityError if it does not verify."""
        version, _, rest = ciphertext.partition(".") if type(ciphertext) is str else ("", "", "")
        group, dot, body = rest.partition(".")
        if version != self.version or not self.grouped or not dot or not group:
            raise IntegrityError("group ciphertext has an unknown format")
        return group, self._decrypt(body, group_associated_data(self.resource_type, self.record_id, group))

    def _encrypt(self, plaintext: bytes, aad: bytes) -> str:
        nonce = self._nonce()
        return b64e(nonce + self._aead.encrypt(nonce, plaintext, aad))

    def _decrypt(self, text: str, aad: bytes) -> bytes:
        try:
            raw = b64d_fast(text)
            return self._aead.decrypt(raw[:12], raw[12:], aad)
        except (ValueError, InvalidTag):
            raise IntegrityError("ciphertext does not verify") from None

    def mac(self, items: list[tuple[str, str]]) -> bytes:
        """Record MAC over the key id and the ordered (path, ciphertext) list (v2: group ciphertexts too,
        as ``("@" + group, ciphertext)``, and ``(path, "")`` for an element sealed in its group)."""
        parts = [f"fhircrypt/{self.version} record{_US}{self.resource_type}{_US}{self.record_id}{_US}{self.key_id}"]
        parts.extend(f"{path}{_US}{ct}" for path, ct in items)
        return hmac.digest(self._mac_key, _RS.join(parts).encode(), "sha256")  # one-shot: no HMAC object

    def verify(self, items: list[tuple[str, str]], expected: bytes) -> None:
        if not hmac.compare_digest(self.mac(items), expected):
            raise IntegrityError("record MAC does not verify")
