"""Key-encryption keys: the root that wraps the keyring.

The providers live in :mod:`proxy.crypto.providers` (``base`` and ``local``): import from there.
This alias remains only for ``proxy/web/app.py``'s import; remove it when that import moves.
"""

from proxy.crypto.providers.base import KeyProvider, KeyringError, ProviderError
from proxy.crypto.providers.local import (
    KEK_ENV,
    KEK_FILE_ENV,
    LocalKeyProvider,
    generate_kek,
    load_local_kek,
    parse_kek,
)

__all__ = [
    "KEK_ENV",
    "KEK_FILE_ENV",
    "KeyProvider",
    "KeyringError",
    "LocalKeyProvider",
    "ProviderError",
    "generate_kek",
    "load_local_kek",
    "parse_kek",
]
