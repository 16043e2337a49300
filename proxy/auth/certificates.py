"""Callers identified by a verified client certificate (mutual TLS), for system-to-system calls.

A laboratory analyser or an interface engine often cannot fetch OAuth tokens, but can hold a
client certificate. The operator maps certificate subjects to the claims such a caller would
have carried in a token; the policy's access rules then apply to those claims exactly as to a
token's, and the audit trail records the mapped subject. Only the TLS layer verifies the
certificate (against ``tls_client_ca``); this module only looks up its subject.

File format (YAML)::

    identities:
      - subject: "CN=lab-analyser,O=RS Sehat,C=ID"      # RFC 4514, as `openssl x509 -subject -nameopt rfc2253`
        claims: {sub: lab-analyser, client_id: lab-analyser, realm_access: {roles: [lab-system]},
                 scope: "system/Observation.cru"}
"""

from __future__ import annotations

from pathlib import Path

import yaml
from cryptography import x509


class IdentityError(ValueError):
    """The identities file is not usable; names the entry, never a claim value."""


class CertificateIdentities:
    def __init__(self, mapping: dict[str, dict]) -> None:
        self._by_subject = mapping

    def __len__(self) -> int:
        return len(self._by_subject)

    @classmethod
    def load(cls, path: str) -> CertificateIdentities:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise IdentityError(f"{path}: cannot be read as YAML ({type(exc).__name__})") from None
        entries = data.get("identities") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise IdentityError(f"{path}: needs a list 'identities'")
        mapping: dict[str, dict] = {}
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("subject"), str):
                raise IdentityError(f"{path}: identities[{n}]: needs a 'subject' string")
            claims = entry.get("claims")
            if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
                raise IdentityError(f"{path}: identities[{n}]: needs 'claims' with a 'sub' string")
            subject = _normal(entry["subject"])
            if subject in mapping:
                raise IdentityError(f"{path}: identities[{n}]: the subject is mapped twice")
            mapping[subject] = {**claims, "fhircrypt_authn": "mtls"}
        return cls(mapping)

    def claims_for(self, der: bytes) -> dict | None:
        """The mapped claims of a (verified) DER certificate, or None when its subject is not mapped."""
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        return self._by_subject.get(_normal(subject))


def _normal(subject: str) -> str:
    """Compare subjects without the spaces people put after commas."""
    return ",".join(part.strip() for part in subject.split(","))
