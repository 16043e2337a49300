"""Secrets from the environment: ``FHIRCRYPT_<NAME>_FILE`` (a path) or ``FHIRCRYPT_<NAME>`` (the value).

Secrets never come from command-line flags or configuration files: a flag value ends up in
shell history and ``ps`` output, a configuration file in version control. The ``_FILE``
form wins so that a Kubernetes secret volume or a Vault agent sink can be used directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class SecretError(ValueError):
    """A secret that cannot be read; names the variable, never the value."""


def read_secret(environ: Mapping[str, str], name: str) -> str | None:
    """The secret ``name`` (e.g. ``PKCS11_PIN``), or None when neither variable is set."""
    variable = "FHIRCRYPT_" + name.upper()
    path = environ.get(variable + "_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not text"
            raise SecretError(f"cannot read {variable}_FILE: {reason}") from None
    return environ.get(variable) or None
