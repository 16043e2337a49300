"""Command-line flags for the key provider and the key cache (a thin shell over ``build_provider``).

Each flag also reads ``FHIRCRYPT_<FLAG>`` (flags win). ``keys rewrap`` adds the same flags
with a ``--to-`` prefix for the target provider; its secrets come from ``FHIRCRYPT_TO_*``
variables, falling back to the ``FHIRCRYPT_*`` ones (so one HSM PIN serves both keys).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from proxy.keymgmt.keycache import CacheBounds
from proxy.keymgmt.providers import SETTINGS, KeyProvider, build_provider
from proxy.settings import Settings, http_url

# flag (without --) -> (provider type, setting)
_FLAGS: dict[str, tuple[str, str]] = {
    "kek-file": ("local", "kek_file"),
    "pkcs11-module": ("pkcs11", "module"),
    "pkcs11-token-label": ("pkcs11", "token_label"),
    "pkcs11-key-label": ("pkcs11", "key_label"),
    "aws-kms-key-id": ("aws-kms", "key_id"),
    "aws-kms-region": ("aws-kms", "region"),
    "aws-kms-endpoint": ("aws-kms", "endpoint"),
    "vault-addr": ("vault", "address"),
    "vault-mount": ("vault", "mount"),
    "vault-key": ("vault", "key"),
    "vault-namespace": ("vault", "namespace"),
    "vault-ca-cert": ("vault", "ca_cert"),
}
_HELP = {
    "kek-file": "local: file holding the key-encryption key (else FHIRCRYPT_KEK)",
    "pkcs11-module": "pkcs11: the PKCS#11 library (.so); PIN from FHIRCRYPT_PKCS11_PIN[_FILE]",
    "aws-kms-key-id": "aws-kms: key id, ARN or alias/NAME (credentials: the AWS environment, profile or role)",
    "aws-kms-endpoint": "aws-kms: endpoint URL (VPC endpoint, tests)",
    "vault-addr": "vault: Vault address, e.g. https://vault:8200 (token: FHIRCRYPT_VAULT_TOKEN[_FILE])",
    "vault-mount": "vault: Transit mount point (default transit)",
}


_URL_FLAGS = frozenset({"aws-kms-endpoint", "vault-addr"})


def url_arg(value: str) -> str:
    """argparse type for a URL flag: the check of :func:`proxy.settings.http_url`, as a usage error (exit 2)."""
    try:
        return http_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _env_name(flag: str) -> str:
    return "FHIRCRYPT_" + flag.upper().replace("-", "_")


def add_provider_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """--[prefix]key-provider and every provider's settings."""
    p.add_argument(
        f"--{prefix}key-provider",
        choices=tuple(SETTINGS),
        default=os.environ.get(_env_name(prefix + "key-provider"), "local"),
        help="where the key-encryption key lives (default local)",
    )
    for flag in _FLAGS:
        p.add_argument(
            f"--{prefix}{flag}",
            default=os.environ.get(_env_name(prefix + flag)),
            type=url_arg if flag in _URL_FLAGS else str,
            help=_HELP.get(flag),
        )


def provider_config(args: argparse.Namespace, prefix: str = "") -> dict[str, object]:
    """The ``build_provider`` configuration the flags describe (settings of other types ignored)."""
    attr = prefix.replace("-", "_")
    kind = getattr(args, attr + "key_provider")
    config: dict[str, object] = {"type": kind}
    for flag, (owner, name) in _FLAGS.items():
        value = getattr(args, attr + flag.replace("-", "_"))
        if owner == kind and value:
            config[name] = value
    return config


def provider_from_args(
    args: argparse.Namespace, prefix: str = "", environ: Mapping[str, str] | None = None
) -> KeyProvider:
    env = dict(os.environ if environ is None else environ)
    if prefix:  # FHIRCRYPT_TO_PKCS11_PIN overrides FHIRCRYPT_PKCS11_PIN for the target provider
        head = "FHIRCRYPT_" + prefix.upper().replace("-", "_")
        env.update({"FHIRCRYPT_" + k[len(head) :]: v for k, v in list(env.items()) if k.startswith(head)})
    return build_provider(provider_config(args, prefix), env)


def provider_from_settings(settings: Settings, environ: Mapping[str, str] | None = None) -> KeyProvider:
    """The provider ``serve`` uses: the same settings as the flags, from the configuration model."""
    kind = settings.key_provider
    config: dict[str, object] = {"type": kind}
    for flag, (owner, name) in _FLAGS.items():
        value = getattr(settings, flag.replace("-", "_"))
        if owner == kind and value:
            config[name] = value
    return build_provider(config, dict(os.environ if environ is None else environ))


def settings_bounds(settings: Settings) -> CacheBounds:
    return CacheBounds(settings.key_refresh_interval, settings.key_cache_max_age, settings.key_max_wraps)
