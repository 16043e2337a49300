"""The caller of one request, as far as decryption is concerned. Never logged whole."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.auth.scopes import Scope, parse_scopes


@dataclass(frozen=True)
class Caller:
    subject: str | None = None
    client_id: str | None = None
    roles: frozenset[str] = frozenset()
    scopes: tuple[Scope, ...] = ()
    fhir_user: str | None = None  # e.g. Practitioner/123
    patient: str | None = None  # SMART launch context: the patient id
    purpose_of_use: tuple[str, ...] = ()
    break_glass_reason: str | None = None
    claims: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def fhir_user_type(self) -> str | None:
        if not self.fhir_user:
            return None
        parts = self.fhir_user.rstrip("/").split("/")
        return parts[-2] if len(parts) >= 2 else None


def claim(claims: dict, path: str) -> object:
    """A dotted claim path, e.g. ``realm_access.roles`` (Keycloak)."""
    value: object = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def caller_from_claims(claims: dict, roles_claim: str = "roles", break_glass_reason: str | None = None) -> Caller:
    roles = claim(claims, roles_claim)
    purpose = claims.get("purpose_of_use") or claims.get("pou") or ()
    return Caller(
        subject=str(claims["sub"]) if "sub" in claims else None,
        client_id=str(claims.get("client_id") or claims.get("azp") or "") or None,
        roles=frozenset(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else frozenset(),
        scopes=parse_scopes(claims.get("scope", claims.get("scp"))),
        fhir_user=claims.get("fhirUser") if isinstance(claims.get("fhirUser"), str) else None,
        patient=claims.get("patient") if isinstance(claims.get("patient"), str) else None,
        purpose_of_use=tuple(p for p in ([purpose] if isinstance(purpose, str) else purpose) if isinstance(p, str)),
        break_glass_reason=break_glass_reason,
        claims=claims,
    )
