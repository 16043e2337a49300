"""The ``local`` provider: a 256-bit KEK from a file or an environment variable.

For development and small clinics without an HSM. The KEK sits in process memory and in
the file or variable it came from, so it protects the keyring only as well as that file
is protected (see docs/key-management.md). AES key wrap (RFC 3394) has no associated
data, so the wrap context is not bound here; the keyring's MAC still binds every key to
its id and keyring.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from proxy.crypto.encoding import b64d, b64e
from proxy.keymgmt.providers.base import KeyringError, ProviderError

KEK_ENV = "FHIRCRYPT_KEK"
KEK_FILE_ENV = "FHIRCRYPT_KEK_FILE"


class LocalKeyProvider:
    """AES key wrap (RFC 3394) under a 256-bit key held in process memory."""

    type = "local"

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise KeyringError("the key-encryption key must be 32 bytes (256 bits)")
        self._kek = kek
        # A fingerprint (not the key) so a keyring can tell "wrong KEK" from "tampered".
        self.kek_id = hmac.new(kek, b"fhircrypt kek id", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"LocalKeyProvider(kek_id={self.kek_id})"

    def wrap(self, key: bytes, context: Mapping[str, str] | None = None) -> bytes:
        return aes_key_wrap(self._kek, key)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str] | None = None) -> bytes:
        try:
            return aes_key_unwrap(self._kek, wrapped)
        except (InvalidUnwrap, ValueError):
            raise ProviderError(
                "unwrap-failed", "key unwrap failed: wrong key-encryption key or damaged keyring"
            ) from None

    def describe(self) -> dict[str, str]:
        return {"type": "local", "kek_id": self.kek_id}

    def check(self) -> None:
        """The KEK is in memory: nothing can become unavailable."""


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


def load_local_kek(kek_file: str | None = None, environ: Mapping[str, str] | None = None) -> LocalKeyProvider:
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
