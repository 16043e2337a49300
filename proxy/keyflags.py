"""The key provider and key cache a :class:`~proxy.settings.Settings` describes (a thin shell over ``build_provider``).

The provider options and the ``build_provider`` setting each one fills are declared once, in
:class:`proxy.settings.Settings` (``provider=(type, setting)``). ``keys rewrap`` resolves the same
options a second time with the ``to_`` prefix for the target provider; its secrets come from
``FHIRCRYPT_TO_*`` variables, falling back to the ``FHIRCRYPT_*`` ones (so one HSM PIN serves both keys).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from proxy.keymgmt.keycache import CacheBounds
from proxy.keymgmt.providers import KeyProvider, build_provider
from proxy.settings import OPTIONS, Settings


def provider_config(settings: Settings) -> dict[str, object]:
    """The ``build_provider`` configuration of ``settings.key_provider`` (settings of other types ignored)."""
    kind = settings.key_provider
    config: dict[str, object] = {"type": kind}
    for opt in OPTIONS:
        value = getattr(settings, opt.name)
        if opt.provider is not None and opt.provider[0] == kind and value:
            config[opt.provider[1]] = value
    return config


def provider_from_settings(
    settings: Settings, environ: Mapping[str, str] | None = None, prefix: str = ""
) -> KeyProvider:
    """The provider the settings name; with ``prefix`` (``to_``) its secrets from ``FHIRCRYPT_TO_*`` first."""
    env = dict(os.environ if environ is None else environ)
    if prefix:  # FHIRCRYPT_TO_PKCS11_PIN overrides FHIRCRYPT_PKCS11_PIN for the target provider
        head = "FHIRCRYPT_" + prefix.upper()
        env.update({"FHIRCRYPT_" + k[len(head) :]: v for k, v in list(env.items()) if k.startswith(head)})
    return build_provider(provider_config(settings), env)


def settings_bounds(settings: Settings) -> CacheBounds:
    return CacheBounds(settings.key_refresh_interval, settings.key_cache_max_age, settings.key_max_wraps)
