"""The ``pkcs11`` provider: the KEK is an AES-256 key inside an HSM, used through PKCS#11.

The key never leaves the token: it is created there non-extractable and sensitive, and
the proxy only asks the token to encrypt or decrypt the keyring's keys with it.

Mechanism: CKM_AES_GCM with a random 96-bit IV and the wrap context as associated data,
stored as ``IV || ciphertext || tag``. Not CKM_AES_KEY_WRAP, because (1) the keyring's
keys must end up in the proxy's memory anyway (the proxy wraps per-record data keys in
process), so C_WrapKey/C_UnwrapKey would have to create the master keys as extractable
token objects only to read their value back, and (2) AES key wrap has no associated
data, whereas GCM binds every wrapped key to its keyring and key id. The IV space is not
a concern: the KEK encrypts a handful of keys per keyring write, far below the 2^32
random-IV limit for GCM.

A session is opened per operation (they are rare: start-up, the periodic re-verification,
``fhircrypt keys``), so a token that was removed and re-inserted, or an HSM that
restarted, is picked up without restarting the proxy. The PIN comes from
``FHIRCRYPT_PKCS11_PIN_FILE`` or ``FHIRCRYPT_PKCS11_PIN`` and stays in memory for those
logins; it is never logged or shown.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from proxy.envsecrets import read_secret
from proxy.keymgmt.providers.base import ProviderError, associated_data, missing_sdk, setting

_LIBS: dict[str, Any] = {}  # one loaded (and C_Initialize'd) library per module path and process
_LIBS_LOCK = threading.Lock()


def _library(module: str) -> Any:
    try:
        import pkcs11
    except ImportError:
        raise missing_sdk("pkcs11", "python-pkcs11", "pkcs11") from None
    with _LIBS_LOCK:
        if module not in _LIBS:
            try:
                _LIBS[module] = pkcs11.lib(module)
            except pkcs11.PKCS11Error:
                raise ProviderError("misconfigured", f"pkcs11: cannot load the PKCS#11 module {module}") from None
        return _LIBS[module]


class Pkcs11KeyProvider:
    """AES-GCM with an AES key on a PKCS#11 token, found by token label and key label."""

    type = "pkcs11"

    def __init__(self, module: str, token_label: str, key_label: str, pin: str) -> None:
        self.module, self.token_label, self.key_label = module, token_label, key_label
        self._pin = pin
        self._lib = _library(module)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Pkcs11KeyProvider(token={self.token_label!r}, key={self.key_label!r})"

    def describe(self) -> dict[str, str]:
        return {"type": self.type, "token_label": self.token_label, "key_label": self.key_label}

    def wrap(self, key: bytes, context: Mapping[str, str] | None = None) -> bytes:
        iv = os.urandom(12)
        return iv + self._with_key("encrypt", key, iv, context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str] | None = None) -> bytes:
        if len(wrapped) < 12 + 16:
            raise ProviderError("unwrap-failed", "pkcs11: the wrapped key is too short (damaged keyring)")
        return self._with_key("decrypt", wrapped[12:], wrapped[:12], context)

    def check(self) -> None:
        self._with_key(None, b"", b"", None)

    def _with_key(self, operation: str | None, data: bytes, iv: bytes, context: Mapping[str, str] | None) -> bytes:
        """Open a session, log in, find the key and run one GCM operation (or none, for ``check``)."""
        import pkcs11
        from pkcs11 import KeyType, Mechanism
        from pkcs11.mechanisms import GCMParams

        where = f"pkcs11: token '{self.token_label}'"
        with self._lock:
            try:
                token = self._lib.get_token(token_label=self.token_label)
            except pkcs11.NoSuchToken:
                raise ProviderError("not-found", f"{where} is not present") from None
            except pkcs11.PKCS11Error as exc:
                raise ProviderError("unreachable", f"{where} is unavailable ({type(exc).__name__})") from None
            try:
                session = token.open(user_pin=self._pin)
            except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
                raise ProviderError("denied", f"{where}: login failed, wrong PIN (FHIRCRYPT_PKCS11_PIN)") from None
            except (pkcs11.PinLocked, pkcs11.PinExpired):
                raise ProviderError("denied", f"{where}: the user PIN is locked or expired") from None
            except pkcs11.PKCS11Error as exc:
                raise ProviderError("unreachable", f"{where}: cannot open a session ({type(exc).__name__})") from None
            with session:
                try:
                    key = session.get_key(label=self.key_label, key_type=KeyType.AES)
                except pkcs11.NoSuchKey:
                    raise ProviderError("not-found", f"{where} has no AES key labelled '{self.key_label}'") from None
                except pkcs11.MultipleObjectsReturned:
                    raise ProviderError(
                        "misconfigured", f"{where} has several AES keys labelled '{self.key_label}'"
                    ) from None
                except pkcs11.PKCS11Error as exc:
                    raise ProviderError("unreachable", f"{where}: key lookup failed ({type(exc).__name__})") from None
                if operation is None:
                    return b""
                param = GCMParams(iv, associated_data(context), 128)
                try:
                    result: bytes = getattr(key, operation)(data, mechanism=Mechanism.AES_GCM, mechanism_param=param)
                    return result
                except pkcs11.PKCS11Error:
                    if operation == "encrypt":
                        raise ProviderError("unavailable", f"{where}: encryption with the key failed") from None
                    raise ProviderError(
                        "unwrap-failed",
                        f"{where}: key unwrap failed: wrong key '{self.key_label}', wrong keyring or damaged keyring",
                    ) from None


def build(config: Mapping[str, object], environ: Mapping[str, str]) -> Pkcs11KeyProvider:
    module = setting(config, "module", "--pkcs11-module")
    token_label = setting(config, "token_label", "--pkcs11-token-label")
    key_label = setting(config, "key_label", "--pkcs11-key-label")
    pin = read_secret(environ, "PKCS11_PIN")
    if not pin:
        raise ProviderError("misconfigured", "the pkcs11 key provider needs FHIRCRYPT_PKCS11_PIN_FILE or _PIN")
    return Pkcs11KeyProvider(module, token_label, key_label, pin)
