"""Runtime settings of the proxy, filled by the CLI from flags and ``FHIRCRYPT_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    upstream: str  # FHIR base of the upstream server, e.g. https://fhir.example/fhir/R4
    policy: str  # policy file
    keyring: str  # keyring file
    kek_file: str | None = None  # else FHIRCRYPT_KEK / FHIRCRYPT_KEK_FILE
    host: str = "127.0.0.1"
    port: int = 8080
    public_base: str | None = None  # external FHIR base of the proxy; default http://host:port/<upstream path>
    tls_cert: str | None = None
    tls_key: str | None = None
    upstream_ca: str | None = None  # CA bundle for an https upstream (system CAs otherwise)
    auth: str = "jwt"  # "none" is the development mode that decrypts every group for every caller
    oidc_issuer: str | None = None  # OpenID provider (discovery) for --auth jwt
    jwks_url: str | None = None  # or a JWKS URL directly
    audience: str | None = None  # the aud claim tokens must carry (the proxy's client id or URL)
    token_issuer: str | None = None  # the iss claim (default: the discovered issuer)
    clock_skew: float = 60.0
    introspection_url: str | None = None  # RFC 7662 endpoint for opaque tokens
    introspection_client_id: str | None = None
    introspection_secret: str | None = None  # from FHIRCRYPT_INTROSPECTION_SECRET(_FILE), never a flag
    audit_trail: str | None = None  # JSON-lines audit trail (created with fhircrypt audit init)
    audit_fhir: str | None = None  # FHIR base that also receives every AuditEvent (POST /AuditEvent)
    audit_fhir_token: str | None = None  # its bearer token (FHIRCRYPT_AUDIT_FHIR_TOKEN[_FILE]; never a flag)
    audit_mode: str = "fail-closed"  # or "continue": what to do when the trail cannot keep up
    audit_max_backlog: int = 10_000
    validate: bool = True
    max_body: int = 16 * 1024 * 1024
    max_response: int = 64 * 1024 * 1024
    upstream_timeout: float = 30.0
    connect_timeout: float = 5.0
    upstream_connections: int = 100
    patient_key_store: str | None = None  # SQLite file or postgresql:// URL (policy keys.per_patient)
    patient_key_ttl: float = 60.0  # seconds a replica keeps an unsealed patient key: the shred bound
    patient_key_cache: int = 10_000  # most patient keys kept in memory
