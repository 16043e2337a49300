"""Key-encryption keys: the root that wraps the keyring.

This module holds the ``local`` provider (a 256-bit key from an environment variable
or a file, for development and small clinics). HSM and cloud KMS providers implement
the same :class:`KeyProvider` protocol.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from proxy.crypto.encoding import b64d, b64e

KEK_ENV = "FHIRCRYPT_KEK"
KEK_FILE_ENV = "FHIRCRYPT_KEK_FILE"


class KeyringError(Exception):
    """A key problem; messages never contain key material."""


class KeyProvider(Protocol):
    """Wraps and unwraps keys with a key-encryption key that never leaves the provider."""

    def wrap(self, key: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes) -> bytes: ...

    def describe(self) -> dict[str, str]: ...


class LocalKeyProvider:
    """AES key wrap (RFC 3394) under a 256-bit key held in process memory."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise KeyringError("the key-encryption key must be 32 bytes (256 bits)")
        self._kek = kek
        # A fingerprint (not the key) so a keyring can tell "wrong KEK" from "tampered".
        self.kek_id = hmac.new(kek, b"fhircrypt kek id", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"LocalKeyProvider(kek_id={self.kek_id})"

    def wrap(self, key: bytes) -> bytes:
        return aes_key_wrap(self._kek, key)

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return aes_key_unwrap(self._kek, wrapped)
        except (InvalidUnwrap, ValueError):
            raise KeyringError("key unwrap failed: wrong key-encryption key or damaged keyring") from None

    def describe(self) -> dict[str, str]:
        return {"type": "local", "kek_id": self.kek_id}


def parse_kek(text: str) -> bytes:
    """Accept 64 hex digits or unpadded/padded base64url of 32 bytes."""
    text = text.strip()
    try:
        raw = bytes.fromhex(text) if len(text) == 64 else b64d(text.rstrip("="))
    except ValueError:
        raise KeyringError("the key-encryption key is neither 64 hex digits nor base64url") from None
    if len(raw) != 32:
        raise KeyringError("the key-encryption key must be 32 bytes (256 bits)")
    return raw


def load_local_kek(kek_file: str | None = None, environ: dict[str, str] | None = None) -> LocalKeyProvider:
    """KEK from a file (``--kek-file`` / ``FHIRCRYPT_KEK_FILE``) or ``FHIRCRYPT_KEK``; never a flag value."""
    env = os.environ if environ is None else environ
    path = kek_file or env.get(KEK_FILE_ENV)
    if path:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise KeyringError(f"cannot read the key-encryption key file: {exc.strerror}") from None
        return LocalKeyProvider(data if len(data) == 32 else parse_kek(data.decode("ascii", "replace")))
    if env.get(KEK_ENV):
        return LocalKeyProvider(parse_kek(env[KEK_ENV]))
    raise KeyringError(f"no key-encryption key: set {KEK_ENV} or {KEK_FILE_ENV} (or --kek-file)")


def generate_kek() -> str:
    """A new random KEK as base64url, for ``fhircrypt keys init --generate-kek``."""
    return b64e(os.urandom(32))
