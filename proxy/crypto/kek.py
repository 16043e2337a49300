"""Key-encryption keys: the root that wraps the keyring.

The providers live in :mod:`proxy.crypto.providers`; this module keeps the names the rest
of the code (and older imports) use for the interface and the ``local`` provider.
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
