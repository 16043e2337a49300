"""Key providers: where the key-encryption key lives, chosen by configuration.

``build_provider({"type": "pkcs11", "module": ..., "token_label": ..., "key_label": ...}, os.environ)``
returns a :class:`KeyProvider`. The configuration holds only non-secret settings (the
types and their settings are listed in :data:`SETTINGS`); PINs, tokens and credentials
come from ``environ`` (``FHIRCRYPT_*`` variables and their ``_FILE`` forms). An unknown
type or setting is refused, so a typo cannot silently fall back to another provider.
The SDK of each provider is imported only when that provider is built.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.keymgmt.providers.base import KeyProvider, KeyringError, ProviderError

# type -> the non-secret settings it accepts
SETTINGS: dict[str, tuple[str, ...]] = {
    "local": ("kek_file",),
    "pkcs11": ("module", "token_label", "key_label"),
    "aws-kms": ("key_id", "region", "endpoint"),
    "vault": ("address", "mount", "key", "namespace", "ca_cert"),
}


def build_provider(config: Mapping[str, object], environ: Mapping[str, str]) -> KeyProvider:
    """The provider ``config["type"]`` names (default ``local``), with its secrets from ``environ``."""
    kind = str(config.get("type") or "local")
    if kind not in SETTINGS:
        raise ProviderError("misconfigured", f"unknown key provider '{kind}'; use one of {', '.join(SETTINGS)}")
    unknown = sorted(set(config) - {"type", *SETTINGS[kind]})
    if unknown:
        raise ProviderError("misconfigured", f"the {kind} key provider has no setting {', '.join(unknown)}")
    settings = {k: v for k, v in config.items() if v not in (None, "")}
    if kind == "local":
        from proxy.keymgmt.providers.local import load_local_kek

        kek_file = settings.get("kek_file")
        return load_local_kek(str(kek_file) if kek_file else None, environ)
    if kind == "pkcs11":
        from proxy.keymgmt.providers import hsm

        return hsm.build(settings, environ)
    if kind == "aws-kms":
        from proxy.keymgmt.providers import awskms

        return awskms.build(settings, environ)
    from proxy.keymgmt.providers import vault

    return vault.build(settings, environ)


__all__ = ["SETTINGS", "KeyProvider", "KeyringError", "ProviderError", "build_provider"]
