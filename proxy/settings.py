"""The proxy's configuration: one table of options, resolved from flags, environment, a file and defaults.

Precedence is flags > ``FHIRCRYPT_*`` environment variables > the YAML config file > defaults,
and every resolved value remembers where it came from (``fhircrypt config show``). Secrets
(client secrets, bearer tokens for the audit server) are never options with a value: they are
read from ``FHIRCRYPT_<NAME>`` or from the file named by ``FHIRCRYPT_<NAME>_FILE`` or by the
config file's ``<name>_file`` key, so they never appear in a process listing, a shell history
or a config file checked into version control. The key-encryption key follows the same rule
(``FHIRCRYPT_KEK`` / ``FHIRCRYPT_KEK_FILE`` / ``kek_file``), through the key provider.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.gctune import DEFAULT_THRESHOLD as DEFAULT_GC_THRESHOLD

ENV_PREFIX = "FHIRCRYPT_"
CONFIG_ENV = "FHIRCRYPT_CONFIG"


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
    tls_client_ca: str | None = None  # CA bundle that client certificates must chain to (mutual TLS)
    tls_client_auth: str = "none"  # none, optional or required: whether clients must present a certificate
    client_identities: str | None = None  # YAML file mapping certificate subjects to caller identities
    upstream_ca: str | None = None  # CA bundle for an https upstream (system CAs otherwise)
    upstream_client_cert: str | None = None  # the proxy's client certificate towards the upstream (mTLS)
    upstream_client_key: str | None = None
    upstream_server_name: str | None = None  # SNI and the name the upstream certificate must carry
    upstream_auth: str = "none"  # the proxy's own credential upstream: none, bearer or client-credentials
    upstream_token: str | None = None  # bearer: FHIRCRYPT_UPSTREAM_TOKEN[_FILE] or --upstream-token-file
    upstream_token_url: str | None = None  # client-credentials: the OAuth2 token endpoint
    upstream_client_id: str | None = None
    upstream_client_secret: str | None = None  # FHIRCRYPT_UPSTREAM_CLIENT_SECRET[_FILE] or its --...-file flag
    upstream_scope: str | None = None
    forward_caller_token: bool = False  # send the caller's Authorization upstream instead (docs/threat-model.md)
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
    gc_threshold: int = DEFAULT_GC_THRESHOLD  # proxy.gctune; 0 keeps Python's defaults
    max_body: int = 16 * 1024 * 1024
    max_response: int = 64 * 1024 * 1024
    upstream_timeout: float = 30.0
    connect_timeout: float = 5.0
    upstream_connections: int = 100
    patient_key_store: str | None = None  # SQLite file or postgresql:// URL (policy keys.per_patient)
    patient_key_ttl: float = 60.0  # seconds a replica keeps an unsealed patient key: the shred bound
    patient_key_cache: int = 10_000  # most patient keys kept in memory
    key_provider: str = "local"  # where the key-encryption key lives: local, pkcs11, aws-kms, vault
    pkcs11_module: str | None = None
    pkcs11_token_label: str | None = None
    pkcs11_key_label: str | None = None
    aws_kms_key_id: str | None = None
    aws_kms_region: str | None = None
    aws_kms_endpoint: str | None = None
    vault_addr: str | None = None
    vault_mount: str | None = None
    vault_key: str | None = None
    vault_namespace: str | None = None
    vault_ca_cert: str | None = None
    key_refresh_interval: float = 300.0  # seconds between re-verifications of the keyring with the provider
    key_cache_max_age: float = 86_400.0  # seconds cached keys keep serving after the last verification
    key_max_wraps: int = 2**32  # data keys one master key may wrap in a process
    workers: int = 1  # processes sharing the listening port (SO_REUSEPORT)
    shutdown_timeout: float = 25.0  # SIGTERM: seconds to finish in-flight requests before closing them
    readiness_cache: float = 5.0  # seconds a /readyz upstream probe result is reused
    metrics: bool = True  # serve Prometheus metrics at /metrics
    ops_host: str | None = None  # plain-HTTP listener for /healthz, /readyz and /metrics (then not on the FHIR port)
    ops_port: int | None = None
    log_level: str = "info"


class ConfigError(ValueError):
    """A configuration problem; names the option and its source, never a secret value."""


def _listen(value: str) -> tuple[str, int]:
    host, _, port = str(value).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("use HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def http_url(value: Any) -> str:
    """An absolute http(s) URL with a host and a port in range: checked at start-up, so a URL
    without a scheme fails with the option named instead of answering 500 on every request."""
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError("use an absolute http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in a URL (they end up in logs); use the _FILE settings")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the URL's port must be a number from 1 to 65535")
    return text


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("use true or false")


@dataclass(frozen=True)
class Option:
    """One configuration key: ``name`` in the file, ``--name`` as a flag, ``FHIRCRYPT_NAME`` in the environment."""

    name: str
    help: str
    default: Any = None
    parse: Callable[[Any], Any] = str
    choices: tuple[str, ...] | None = None
    path: bool = False  # a file path: relative paths in the config file are relative to the file
    secret: bool = False  # never a flag or an inline file value: --<name>-file, env, env _FILE, or <name>_file
    required: bool = False  # serve refuses to start without it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("upstream", "FHIR base URL of the upstream server", parse=http_url, required=True),
    Option("policy", "policy file (YAML)", path=True, required=True),
    Option("listen", "HOST:PORT to listen on", "127.0.0.1:8080", _listen),
    Option(
        "public_base_url",
        "the proxy's external FHIR base (default http(s)://HOST:PORT/<upstream path>)",
        parse=http_url,
    ),
    Option("workers", "worker processes sharing the port (SO_REUSEPORT)", 1, int),
    Option("shutdown_timeout", "seconds SIGTERM waits for in-flight requests", 25.0, float),
    Option("keyring", "keyring file", ".fhircrypt/keyring.json", path=True),
    Option("kek_file", "local provider: file holding the key-encryption key (else FHIRCRYPT_KEK)", path=True),
    Option(
        "key_provider",
        "where the key-encryption key lives (PINs and tokens: FHIRCRYPT_PKCS11_PIN, FHIRCRYPT_VAULT_TOKEN, "
        "their _FILE forms, the AWS environment)",
        "local",
        choices=("local", "pkcs11", "aws-kms", "vault"),
    ),
    Option("pkcs11_module", "pkcs11: the PKCS#11 library (.so)", path=True),
    Option("pkcs11_token_label", "pkcs11: token label"),
    Option("pkcs11_key_label", "pkcs11: label of the AES key on the token"),
    Option("aws_kms_key_id", "aws-kms: key id, ARN or alias/NAME"),
    Option("aws_kms_region", "aws-kms: region"),
    Option("aws_kms_endpoint", "aws-kms: endpoint URL (VPC endpoint, tests)", parse=http_url),
    Option("vault_addr", "vault: Vault address, e.g. https://vault:8200", parse=http_url),
    Option("vault_mount", "vault: Transit mount point (default transit)"),
    Option("vault_key", "vault: Transit key name"),
    Option("vault_namespace", "vault: namespace (Vault Enterprise)"),
    Option("vault_ca_cert", "vault: CA bundle for the Vault server", path=True),
    Option("key_refresh_interval", "seconds between re-verifications of the keyring with the provider", 300.0, float),
    Option(
        "key_cache_max_age", "seconds cached keys keep serving after the provider last verified them", 86_400.0, float
    ),
    Option("key_max_wraps", "data keys one master key may wrap in a process before writes are refused", 2**32, int),
    Option(
        "patient_key_store",
        "per-patient keys (policy keys.per_patient): a SQLite file, or postgresql://… without a password "
        "(libpq reads PGPASSWORD / PGPASSFILE)",
    ),
    Option("patient_key_ttl", "seconds a replica may use a cached patient key: the bound on a shred", 60.0, float),
    Option("patient_key_cache", "most patient keys kept in memory", 10_000, int),
    Option("tls_cert", "serve HTTPS with this certificate chain (PEM)", path=True),
    Option("tls_key", "private key of tls_cert (PEM)", path=True),
    Option("tls_client_ca", "CA bundle that client certificates must chain to (mutual TLS)", path=True),
    Option(
        "tls_client_auth",
        "client certificates: none, optional (verified when sent) or required",
        "none",
        choices=("none", "optional", "required"),
    ),
    Option("client_identities", "YAML file mapping client certificate subjects to callers", path=True),
    Option("upstream_ca", "CA bundle to verify an https upstream (default: system CAs)", path=True),
    Option("upstream_client_cert", "client certificate towards the upstream (PEM)", path=True),
    Option("upstream_client_key", "private key of upstream_client_cert (PEM)", path=True),
    Option("upstream_server_name", "SNI name the upstream certificate must carry (default: the URL's host)"),
    Option(
        "upstream_auth",
        "the proxy's own credential towards the upstream: none, bearer (upstream_token) or client-credentials",
        "none",
        choices=("none", "bearer", "client-credentials"),
    ),
    Option("upstream_token", "bearer token for upstream_auth bearer", secret=True),
    Option("upstream_token_url", "OAuth2 token endpoint for upstream_auth client-credentials"),
    Option("upstream_client_id", "client id for upstream_auth client-credentials"),
    Option("upstream_client_secret", "client secret for upstream_auth client-credentials", secret=True),
    Option("upstream_scope", "scope requested for upstream_auth client-credentials"),
    Option("forward_caller_token", "send the caller's token upstream (the upstream can replay it)", False, parse_bool),
    Option("upstream_timeout", "seconds for one upstream exchange", 30.0, float),
    Option("connect_timeout", "seconds to connect to the upstream", 5.0, float),
    Option("upstream_connections", "pooled upstream connections per worker", 100, int),
    Option(
        "auth",
        "jwt: bearer tokens verified against the OpenID provider; none: development mode, decrypts everything",
        "jwt",
        choices=("jwt", "none"),
    ),
    Option("oidc_issuer", "OpenID provider (discovery)", parse=http_url),
    Option("jwks_url", "JWKS URL (instead of discovery)", parse=http_url),
    Option("audience", "the aud claim tokens must carry"),
    Option("token_issuer", "the iss claim (default: discovered)"),
    Option("clock_skew", "seconds of clock skew allowed on token times", 60.0, float),
    Option("introspection_url", "RFC 7662 endpoint for opaque tokens", parse=http_url),
    Option("introspection_client_id", "client id for introspection", "fhircrypt"),
    Option("introspection_secret", "client secret for introspection", secret=True),
    Option("audit_trail", "audit trail (from fhircrypt audit init)", path=True),
    Option("audit_fhir", "also POST every AuditEvent to this FHIR base", parse=http_url),
    Option("audit_fhir_token", "bearer token for audit_fhir", secret=True),
    Option(
        "audit_mode",
        "when the audit cannot keep up: refuse requests or carry on, counting losses",
        "fail-closed",
        choices=("fail-closed", "continue"),
    ),
    Option("audit_max_backlog", "audit records queued per destination before audit_mode applies", 10_000, int),
    Option("validate", "validate writes with fhir.resources", True, parse_bool),
    Option(
        "gc_threshold",
        "garbage collector: generation-0 threshold after start-up, start-up objects frozen (0: Python's defaults)",
        DEFAULT_GC_THRESHOLD,
        int,
    ),
    Option("max_body", "request body limit in bytes", 16 * 1024 * 1024, int),
    Option("max_response", "upstream response limit in bytes", 64 * 1024 * 1024, int),
    Option("readiness_cache", "seconds a /readyz upstream probe is reused", 5.0, float),
    Option("metrics", "serve Prometheus metrics at /metrics", True, parse_bool),
    Option("ops_listen", "HOST:PORT of a plain-HTTP listener for probes and /metrics only", parse=_listen),
    Option("log_level", "debug, info, warning or error", "info", choices=("debug", "info", "warning", "error")),
)
BY_NAME = {o.name: o for o in OPTIONS}
SECRET_FILE_KEYS = {o.name + "_file": o for o in OPTIONS if o.secret}
# the key-encryption key is read by the key provider, not here; listed so `config show` tells where it is from
KEK_ENV = "FHIRCRYPT_KEK"


@dataclass(frozen=True)
class Value:
    value: Any
    source: str  # "flag --x", "env FHIRCRYPT_X", "file PATH", "default"


@dataclass(frozen=True)
class Resolved:
    """The effective configuration: every option's value and where it came from."""

    values: dict[str, Value]
    config_file: str | None

    def __getitem__(self, name: str) -> Any:
        return self.values[name].value

    def settings(self) -> Settings:
        host, port = self["listen"]
        known = {f.name for f in fields(Settings)}
        direct = {k: v.value for k, v in self.values.items() if k in known and v.value is not None}
        upstream = (self["upstream"] or "").rstrip("/")
        ops_host, ops_port = self["ops_listen"] or (None, None)
        derived = {
            "upstream": upstream,
            "policy": self["policy"] or "",  # missing: named by the start-up check, not a TypeError
            "host": host,
            "port": port,
            "public_base": self["public_base_url"],
            "ops_host": ops_host,
            "ops_port": ops_port,
        }
        return Settings(**{**direct, **derived})

    def show(self) -> list[tuple[str, str, str]]:
        """(name, printable value, source) for every option; secrets are never printed."""
        rows = []
        for name, item in self.values.items():
            if BY_NAME[name].secret:
                shown = "(set, redacted)" if item.value else "(not set)"
            elif name in ("listen", "ops_listen") and item.value:
                shown = f"{item.value[0]}:{item.value[1]}"
            else:
                shown = "" if item.value is None else str(item.value)
            rows.append((name, shown, item.source))
        return rows


def _read_file(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration file must be a mapping of option names to values")
    for key in data:
        if key == "kek" or (key in BY_NAME and BY_NAME[key].secret):
            raise ConfigError(f"{path}: {key}: secrets are never written into the config file; use {key}_file")
        if key not in BY_NAME and key not in SECRET_FILE_KEYS:
            raise ConfigError(f"{path}: {key}: unknown option")
    return data


def _read_secret(path: str, where: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: the secret file cannot be read ({exc.strerror})") from None


def resolve(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Resolved:
    """The effective configuration. ``flags`` holds only options given on the command line."""
    flags = flags or {}
    environ = environ or {}
    config_file = config_file or environ.get(CONFIG_ENV) or None
    data = _read_file(config_file) if config_file else {}
    base = Path(config_file).resolve().parent if config_file else None
    values: dict[str, Value] = {}
    for opt in OPTIONS:
        if opt.secret:
            values[opt.name] = _resolve_secret(opt, flags, environ, data, config_file, base)
            continue
        if flags.get(opt.name) is not None:
            raw, source = flags[opt.name], f"flag {opt.flag}"
        elif environ.get(opt.env) not in (None, ""):
            raw, source = environ[opt.env], f"env {opt.env}"
        elif opt.name in data and data[opt.name] is not None:
            raw, source = data[opt.name], f"file {config_file}"
            if opt.path and base is not None and not Path(str(raw)).is_absolute():
                raw = str(base / str(raw))
        else:
            values[opt.name] = Value(None if opt.default is None else opt.parse(opt.default), "default")
            continue
        try:
            value = opt.parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{opt.name} ({source}): {exc}") from None
        if opt.choices and value not in opt.choices:
            raise ConfigError(f"{opt.name} ({source}): use one of {', '.join(opt.choices)}")
        values[opt.name] = Value(value, source)
    return Resolved(values, config_file)


def _resolve_secret(
    opt: Option, flags: Mapping[str, Any], environ: Mapping[str, str], data: dict, config_file: str | None, base
) -> Value:
    file_key, file_env = opt.name + "_file", opt.env + "_FILE"
    if flags.get(file_key):
        flag = f"{opt.flag}-file"
        return Value(_read_secret(str(flags[file_key]), flag), f"flag {flag}")
    if environ.get(file_env):
        return Value(_read_secret(environ[file_env], file_env), f"env {file_env}")
    if environ.get(opt.env):
        return Value(environ[opt.env], f"env {opt.env}")
    if data.get(file_key):
        path = Path(str(data[file_key]))
        path = path if path.is_absolute() or base is None else base / path
        return Value(_read_secret(str(path), f"{config_file}: {file_key}"), f"file {config_file} ({file_key})")
    return Value(None, "default")


def missing_required(settings: Settings) -> str | None:
    """'upstream and policy are required (…)' for the required options that are not set, or None."""
    missing = [o for o in OPTIONS if o.required and not getattr(settings, o.name)]
    if not missing:
        return None
    where = "; ".join(f"{o.flag}, {o.env} or '{o.name}' in the config file" for o in missing)
    return f"{' and '.join(o.name for o in missing)} {'is' if len(missing) == 1 else 'are'} required ({where})"


def kek_source(resolved: Resolved, environ: Mapping[str, str]) -> str:
    """Where the key-encryption key will come from (for ``config show``; the value is never read here)."""
    if resolved["kek_file"]:  # --kek-file, FHIRCRYPT_KEK_FILE or the file's kek_file
        return f"file {resolved['kek_file']} ({resolved.values['kek_file'].source})"
    if environ.get(KEK_ENV):
        return f"env {KEK_ENV} (redacted)"
    return "not set"
