"""The ``vault`` provider: the KEK is a HashiCorp Vault Transit key that never leaves Vault.

Calls (all with ``X-Vault-Token``, and ``X-Vault-Namespace`` when a namespace is set):

- ``POST /v1/<mount>/encrypt/<key>`` ``{"plaintext": b64, "associated_data": b64}``
- ``POST /v1/<mount>/decrypt/<key>`` ``{"ciphertext": "vault:v…", "associated_data": b64}``
- ``GET  /v1/<mount>/keys/<key>`` (the health check: the key exists and is an AEAD key)

The wrap context goes in as associated data, which Transit authenticates for its AEAD key
types (``aes256-gcm96``, the default, ``aes128-gcm96``, ``chacha20-poly1305``). The Vault
token comes from ``FHIRCRYPT_VAULT_TOKEN_FILE`` (e.g. a Vault agent sink) or
``FHIRCRYPT_VAULT_TOKEN``, never from a flag; hvac is given it explicitly so that it does
not fall back to ``VAULT_TOKEN`` or ``~/.vault-token`` behind the operator's back.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from proxy.envsecrets import read_secret
from proxy.keymgmt.providers.base import ProviderError, associated_data, missing_sdk, setting

AEAD_TYPES = ("aes256-gcm96", "aes128-gcm96", "chacha20-poly1305")


def _b64(data: bytes) -> str:
    """Transit takes standard (padded) base64."""
    return base64.b64encode(data).decode("ascii")


class VaultTransitKeyProvider:
    """Transit encrypt/decrypt under one named key, with the wrap context as associated data."""

    type = "vault"

    def __init__(
        self,
        address: str,
        key: str,
        token: str,
        mount: str = "transit",
        namespace: str | None = None,
        ca_cert: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        try:
            import hvac
        except ImportError:
            raise missing_sdk("vault", "hvac", "vault") from None
        self.address, self.key, self.mount, self.namespace = address.rstrip("/"), key, mount.strip("/"), namespace
        self._client = hvac.Client(
            url=self.address, token=token, namespace=namespace, verify=ca_cert or True, timeout=timeout
        )

    def __repr__(self) -> str:
        return f"VaultTransitKeyProvider(address={self.address!r}, mount={self.mount!r}, key={self.key!r})"

    def describe(self) -> dict[str, str]:
        described = {"type": self.type, "address": self.address, "mount": self.mount, "key": self.key}
        if self.namespace:
            described["namespace"] = self.namespace
        return described

    def wrap(self, key: bytes, context: Mapping[str, str] | None = None) -> bytes:
        answer = self._call(
            "encrypt",
            lambda transit: transit.encrypt_data(
                name=self.key,
                plaintext=_b64(key),
                associated_data=_b64(associated_data(context)),
                mount_point=self.mount,
            ),
        )
        ciphertext: str = answer["data"]["ciphertext"]  # hvac has no types: its answers are declared here
        return ciphertext.encode("ascii")

    def unwrap(self, wrapped: bytes, context: Mapping[str, str] | None = None) -> bytes:
        try:
            ciphertext = wrapped.decode("ascii")
        except UnicodeDecodeError:
            raise ProviderError("unwrap-failed", "vault: the wrapped key is not a Transit ciphertext") from None
        answer = self._call(
            "decrypt",
            lambda transit: transit.decrypt_data(
                name=self.key,
                ciphertext=ciphertext,
                associated_data=_b64(associated_data(context)),
                mount_point=self.mount,
            ),
        )
        try:
            return base64.b64decode(answer["data"]["plaintext"], validate=True)
        except (binascii.Error, KeyError, TypeError):
            raise ProviderError("unavailable", "vault: decrypt answered without a base64 plaintext") from None

    def check(self) -> None:
        answer = self._call("read key", lambda transit: transit.read_key(name=self.key, mount_point=self.mount))
        key_type = answer["data"].get("type")
        if key_type not in AEAD_TYPES:
            raise ProviderError(
                "misconfigured", f"vault: Transit key '{self.key}' is {key_type}; use one of {', '.join(AEAD_TYPES)}"
            )

    def _call(self, operation: str, request: Any) -> dict[str, Any]:
        """Run one Transit request; map hvac's exceptions to codes without their text (which may echo input)."""
        import hvac.exceptions as vault_errors
        import requests

        where = f"vault: {operation} with Transit key '{self.mount}/{self.key}'"
        try:
            answer = request(self._client.secrets.transit)
        except vault_errors.VaultDown:
            raise ProviderError("sealed", f"{where}: Vault is sealed or in maintenance (503)") from None
        except (vault_errors.Forbidden, vault_errors.Unauthorized):
            raise ProviderError("denied", f"{where}: permission denied (token or policy)") from None
        except vault_errors.InvalidPath:
            raise ProviderError("not-found", f"{where}: no such key or mount (404)") from None
        except vault_errors.InvalidRequest:
            code = "unwrap-failed" if operation == "decrypt" else "misconfigured"
            raise ProviderError(code, f"{where}: the request was refused (400)") from None
        except vault_errors.VaultError as exc:
            raise ProviderError("unavailable", f"{where}: Vault error ({type(exc).__name__})") from None
        except requests.RequestException as exc:
            raise ProviderError("unreachable", f"{where}: Vault cannot be reached ({type(exc).__name__})") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), dict):
            raise ProviderError("unavailable", f"{where}: unexpected answer from Vault")
        return answer


def build(config: Mapping[str, object], environ: Mapping[str, str]) -> VaultTransitKeyProvider:
    token = read_secret(environ, "VAULT_TOKEN")
    if not token:
        raise ProviderError("misconfigured", "the vault key provider needs FHIRCRYPT_VAULT_TOKEN_FILE or _TOKEN")

    def optional(name: str) -> str | None:
        return str(config[name]) if config.get(name) else None

    return VaultTransitKeyProvider(
        setting(config, "address", "--vault-addr"),
        setting(config, "key", "--vault-key"),
        token,
        mount=optional("mount") or "transit",
        namespace=optional("namespace"),
        ca_cert=optional("ca_cert"),
    )
