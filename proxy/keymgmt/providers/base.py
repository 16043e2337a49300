"""The key-provider interface: where the key-encryption key (KEK) lives.

A provider wraps and unwraps the keyring's keys with a KEK it holds. Only the keyring's
few keys ever pass through a provider (at start-up, on the periodic re-verification and
in ``fhircrypt keys``): the per-record data keys are wrapped in process by the keyring's
master keys, so the request path never waits for an HSM, a KMS or Vault.

Every wrap carries a *context* (``{"fhircrypt-keyring": <id>, "fhircrypt-key": "k3"}``).
Providers with authenticated encryption bind it to the ciphertext (PKCS#11 and Vault as
AES-GCM associated data, AWS KMS as the encryption context, which also shows up in
CloudTrail), so a wrapped key cannot be moved to another slot or another keyring.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Protocol


class KeyringError(Exception):
    """A key problem; messages never contain key material, PINs or tokens."""


class ProviderError(KeyringError):
    """A key provider failed. ``code`` is stable and safe for health checks and metrics:

    ``misconfigured`` (settings or SDK missing), ``unreachable`` (network), ``unavailable``
    (the provider answered with a server error), ``sealed`` (Vault), ``denied`` (wrong PIN,
    token or credentials, no permission), ``not-found`` (token, key or label missing),
    ``disabled`` (the key exists but may not be used), ``unwrap-failed`` (wrong key or
    context, or damaged ciphertext).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class KeyProvider(Protocol):
    """Wraps and unwraps keys with a key-encryption key that never leaves the provider."""

    type: str

    def wrap(self, key: bytes, context: Mapping[str, str] | None = None) -> bytes: ...

    def unwrap(self, wrapped: bytes, context: Mapping[str, str] | None = None) -> bytes: ...

    def describe(self) -> dict[str, str]:
        """The provider type and which KEK it uses (labels, ids; never secrets)."""
        ...

    def check(self) -> None:
        """Raise :class:`ProviderError` unless the KEK can be used now (a cheap call)."""
        ...


def describe_text(described: Mapping[str, str]) -> str:
    """A provider description for people: ``local KEK (kek_id 83673d91f7293209)``, not a Python dict."""
    details = ", ".join(f"{k} {v}" for k, v in described.items() if k != "type")
    return f"{described.get('type', 'local')} KEK" + (f" ({details})" if details else "")


def associated_data(context: Mapping[str, str] | None) -> bytes:
    """Canonical bytes of a wrap context, for providers that take AEAD associated data."""
    body = json.dumps(dict(context or {}), sort_keys=True, separators=(",", ":"))
    return b"fhircrypt kek/1\x1f" + body.encode()


def setting(config: Mapping[str, object], name: str, flag: str) -> str:
    """A required non-secret setting, or an error naming the flag that sets it."""
    value = config.get(name)
    if not isinstance(value, str) or not value:
        raise ProviderError("misconfigured", f"the {config.get('type')} key provider needs {flag}")
    return value


def missing_sdk(provider: str, package: str, extra: str) -> ProviderError:
    return ProviderError(
        "misconfigured", f"the {provider} key provider needs the {package} package: pip install 'fhircrypt[{extra}]'"
    )
