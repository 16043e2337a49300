"""The proxy's configuration: each option declared once, resolved from flags, environment, a file and defaults.

Every option is a field of :class:`Settings` whose metadata declares it (help, default, parsing,
choices, whether it is a path or a secret, which operator commands take it); :data:`OPTIONS`,
the flags (:mod:`proxy.optionflags`), the environment variables and the config-file keys are
derived from those fields, so a name, a default or a help text cannot drift between them.

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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from proxy.gctune import DEFAULT_THRESHOLD as DEFAULT_GC_THRESHOLD
from proxy.keymgmt.providers import SETTINGS as PROVIDER_SETTINGS

ENV_PREFIX = "FHIRCRYPT_"
CONFIG_ENV = "FHIRCRYPT_CONFIG"


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


def _validation(value: Any) -> str:
    """A ``validate`` setting; the booleans of configs written before the choice keep their meaning."""
    try:
        return "full" if parse_bool(value) else "off"
    except ValueError:
        return str(value).strip().lower()  # then checked against the option's choices


# What an operator command takes besides ``serve`` and ``config show`` (which take every option): the
# commands name these groups, and their flags, environment variables and file keys come from the same table.
KEYRING = "keyring"  # the keyring file
PROVIDER = "provider"  # where the key-encryption key lives (``keys rewrap`` also takes them as --to-...)
STORE = "store"  # the per-patient key store (shred)
UPSTREAM = "upstream"  # the operator tools' direct connection to the upstream (reencrypt, coverage, keys retire)
POLICY = "policy"  # the policy file (reencrypt, coverage)


@dataclass(frozen=True)
class Option:
    """One configuration key: ``name`` in the file, ``--name`` as a flag, ``FHIRCRYPT_NAME`` in the environment.

    Built from the metadata of a :class:`Settings` field, so an option is declared once.
    """

    name: str
    help: str
    default: Any = None  # as written on the command line (shown by --help), parsed for the Settings field
    parse: Callable[[Any], Any] = str
    choices: tuple[str, ...] | None = None
    path: bool = False  # a file path: relative paths in the config file are relative to the file
    secret: bool = False  # never a flag or an inline file value: --<name>-file, env, env _FILE, or <name>_file
    required: bool = False  # serve refuses to start without it
    groups: frozenset[str] = frozenset()  # the operator commands' groups (above) that take it
    provider: tuple[str, str] | None = None  # (key provider type, its build_provider setting)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _option(
    help: str,
    default: Any = None,
    *,
    parse: Callable[[Any], Any] = str,
    choices: tuple[str, ...] | None = None,
    path: bool = False,
    secret: bool = False,
    required: bool = False,
    groups: tuple[str, ...] = (),
    provider: tuple[str, str] | None = None,
) -> Any:
    """A :class:`Settings` field declaring its option: the field's default is ``default`` parsed."""
    spec = Option("", help, default, parse, choices, path, secret, required, frozenset(groups), provider)
    if required:  # no default: the field must be given (resolve() gives it, "" when it is not set)
        return field(metadata={"option": spec})
    return field(default=None if default is None else parse(default), metadata={"option": spec})


def _base_url(value: Any) -> str:
    """The upstream's FHIR base, checked like every URL, without a trailing slash (paths are appended to it)."""
    return http_url(value).rstrip("/")


@dataclass(frozen=True)
class Settings:
    """The typed, resolved configuration; each field declares its option (help, default, parsing, groups).

    ``listen``, ``public_base_url`` and ``ops_listen`` are named as the operator writes them; the
    properties below give the parts the server needs.
    """

    upstream: str = _option("FHIR base URL of the upstream server", parse=_base_url, required=True, groups=(UPSTREAM,))
    policy: str = _option("policy file (YAML)", path=True, required=True, groups=(POLICY,))
    listen: tuple[str, int] = _option("HOST:PORT to listen on", "127.0.0.1:8080", parse=_listen)
    public_base_url: str | None = _option(
        "the proxy's external FHIR base (default http(s)://HOST:PORT/<upstream path>)", parse=http_url
    )
    workers: int = _option("worker processes sharing the port (SO_REUSEPORT)", 1, parse=int)
    shutdown_timeout: float = _option("seconds SIGTERM waits for in-flight requests", 25.0, parse=float)
    keyring: str = _option("keyring file", ".fhircrypt/keyring.json", path=True, groups=(KEYRING,))
    kek_file: str | None = _option(
        "local provider: file holding the key-encryption key (else FHIRCRYPT_KEK)",
        path=True,
        groups=(PROVIDER,),
        provider=("local", "kek_file"),
    )
    key_provider: str = _option(
        "where the key-encryption key lives (PINs and tokens: FHIRCRYPT_PKCS11_PIN, FHIRCRYPT_VAULT_TOKEN, "
        "their _FILE forms, the AWS environment)",
        "local",
        choices=tuple(PROVIDER_SETTINGS),
        groups=(PROVIDER,),
    )
    pkcs11_module: str | None = _option(
        "pkcs11: the PKCS#11 library (.so)", path=True, groups=(PROVIDER,), provider=("pkcs11", "module")
    )
    pkcs11_token_label: str | None = _option(
        "pkcs11: token label", groups=(PROVIDER,), provider=("pkcs11", "token_label")
    )
    pkcs11_key_label: str | None = _option(
        "pkcs11: label of the AES key on the token", groups=(PROVIDER,), provider=("pkcs11", "key_label")
    )
    aws_kms_key_id: str | None = _option(
        "aws-kms: key id, ARN or alias/NAME", groups=(PROVIDER,), provider=("aws-kms", "key_id")
    )
    aws_kms_region: str | None = _option("aws-kms: region", groups=(PROVIDER,), provider=("aws-kms", "region"))
    aws_kms_endpoint: str | None = _option(
        "aws-kms: endpoint URL (VPC endpoint, tests)",
        parse=http_url,
        groups=(PROVIDER,),
        provider=("aws-kms", "endpoint"),
    )
    vault_addr: str | None = _option(
        "vault: Vault address, e.g. https://vault:8200",
        parse=http_url,
        groups=(PROVIDER,),
        provider=("vault", "address"),
    )
    vault_mount: str | None = _option(
        "vault: Transit mount point (default transit)", groups=(PROVIDER,), provider=("vault", "mount")
    )
    vault_key: str | None = _option("vault: Transit key name", groups=(PROVIDER,), provider=("vault", "key"))
    vault_namespace: str | None = _option(
        "vault: namespace (Vault Enterprise)", groups=(PROVIDER,), provider=("vault", "namespace")
    )
    vault_ca_cert: str | None = _option(
        "vault: CA bundle for the Vault server", path=True, groups=(PROVIDER,), provider=("vault", "ca_cert")
    )
    key_refresh_interval: float = _option(
        "seconds between re-verifications of the keyring with the provider", 300.0, parse=float
    )
    key_cache_max_age: float = _option(
        "seconds cached keys keep serving after the provider last verified them", 86400.0, parse=float
    )
    key_max_wraps: int = _option(
        "data keys one master key may wrap in a process before writes are refused", 2**32, parse=int
    )
    patient_key_store: str | None = _option(
        "per-patient keys (policy keys.per_patient): a SQLite file, or postgresql://… without a password "
        "(libpq reads PGPASSWORD / PGPASSFILE)",
        groups=(STORE,),
    )
    patient_key_ttl: float = _option(
        "seconds a replica may use a cached patient key: the bound on a shred", 60.0, parse=float, groups=(STORE,)
    )
    patient_key_cache: int = _option("most patient keys kept in memory", 10000, parse=int)
    tls_cert: str | None = _option("serve HTTPS with this certificate chain (PEM)", path=True)
    tls_key: str | None = _option("private key of tls_cert (PEM)", path=True)
    tls_client_ca: str | None = _option("CA bundle that client certificates must chain to (mutual TLS)", path=True)
    tls_client_auth: str = _option(
        "client certificates: none, optional (verified when sent) or required",
        "none",
        choices=("none", "optional", "required"),
    )
    client_identities: str | None = _option("YAML file mapping client certificate subjects to callers", path=True)
    upstream_ca: str | None = _option(
        "CA bundle to verify an https upstream (default: system CAs)", path=True, groups=(UPSTREAM,)
    )
    upstream_client_cert: str | None = _option("client certificate towards the upstream (PEM)", path=True)
    upstream_client_key: str | None = _option("private key of upstream_client_cert (PEM)", path=True)
    upstream_server_name: str | None = _option("SNI name the upstream certificate must carry (default: the URL's host)")
    upstream_auth: str = _option(
        "the proxy's own credential towards the upstream: none, bearer (upstream_token) or client-credentials",
        "none",
        choices=("none", "bearer", "client-credentials"),
    )
    upstream_token: str | None = _option("bearer token for upstream_auth bearer", secret=True, groups=(UPSTREAM,))
    upstream_token_url: str | None = _option("OAuth2 token endpoint for upstream_auth client-credentials")
    upstream_client_id: str | None = _option("client id for upstream_auth client-credentials")
    upstream_client_secret: str | None = _option("client secret for upstream_auth client-credentials", secret=True)
    upstream_scope: str | None = _option("scope requested for upstream_auth client-credentials")
    forward_caller_token: bool = _option(
        "send the caller's token upstream (the upstream can replay it)", False, parse=parse_bool
    )
    upstream_timeout: float = _option("seconds for one upstream exchange", 30.0, parse=float)
    connect_timeout: float = _option("seconds to connect to the upstream", 5.0, parse=float)
    upstream_connections: int = _option("pooled upstream connections per worker", 100, parse=int)
    auth: str = _option(
        "jwt: bearer tokens verified against the OpenID provider; none: development mode, decrypts everything",
        "jwt",
        choices=("jwt", "none"),
    )
    oidc_issuer: str | None = _option("OpenID provider (discovery)", parse=http_url)
    jwks_url: str | None = _option("JWKS URL (instead of discovery)", parse=http_url)
    audience: str | None = _option("the aud claim tokens must carry")
    token_issuer: str | None = _option("the iss claim (default: discovered)")
    clock_skew: float = _option("seconds of clock skew allowed on token times", 60.0, parse=float)
    introspection_url: str | None = _option("RFC 7662 endpoint for opaque tokens", parse=http_url)
    introspection_client_id: str | None = _option("client id for introspection", "fhircrypt")
    introspection_secret: str | None = _option("client secret for introspection", secret=True)
    audit_trail: str | None = _option("audit trail (from fhircrypt audit init)", path=True)
    audit_fhir: str | None = _option("also POST every AuditEvent to this FHIR base", parse=http_url)
    audit_fhir_token: str | None = _option("bearer token for audit_fhir", secret=True)
    audit_mode: Literal["fail-closed", "continue"] = _option(
        "when the audit cannot keep up: refuse requests or carry on, counting losses",
        "fail-closed",
        choices=("fail-closed", "continue"),
    )
    audit_max_backlog: int = _option("audit records queued per destination before audit_mode applies", 10000, parse=int)
    validate: Literal["structure", "full", "off"] = _option(
        "validate writes holding a resource of a covered type: structure (element names, JSON shapes, primitive forms"
        " against R4), full (fhir.resources) or off; true and false, from older configs, mean full and off",
        "structure",
        parse=_validation,
        choices=("structure", "full", "off"),
    )
    gc_threshold: int = _option(
        "garbage collector: generation-0 threshold after start-up, start-up objects frozen (0: Python's defaults)",
        DEFAULT_GC_THRESHOLD,
        parse=int,
    )
    max_body: int = _option("request body limit in bytes", 16 * 1024 * 1024, parse=int)
    max_response: int = _option("upstream response limit in bytes", 64 * 1024 * 1024, parse=int)
    # 4 MiB, about 270 encrypted SATUSEHAT Patients: read whole, a page costs ~16x its size in objects per
    # request in flight (at most ~64 MiB here); streamed, a third more CPU (the splitter builds each entry
    # from the parser's events in Python), so the common pages (20-100 resources) stay on the whole path
    # (docs/benchmarks.md, "Memory of large pages")
    stream_threshold: int = _option(
        "upstream search, history and collection Bundles larger than this (bytes) are streamed entry by entry",
        4 * 1024 * 1024,
        parse=int,
    )
    readiness_cache: float = _option("seconds a /readyz upstream probe is reused", 5.0, parse=float)
    metrics: bool = _option("serve Prometheus metrics at /metrics", True, parse=parse_bool)
    ops_listen: tuple[str, int] | None = _option(
        "HOST:PORT of a plain-HTTP listener for probes and /metrics only", parse=_listen
    )
    log_level: str = _option("debug, info, warning or error", "info", choices=("debug", "info", "warning", "error"))

    @property
    def host(self) -> str:
        return self.listen[0]

    @property
    def port(self) -> int:
        return self.listen[1]

    @property
    def public_base(self) -> str | None:
        return self.public_base_url

    @property
    def ops_host(self) -> str | None:
        return self.ops_listen[0] if self.ops_listen else None

    @property
    def ops_port(self) -> int | None:
        return self.ops_listen[1] if self.ops_listen else None


OPTIONS: tuple[Option, ...] = tuple(replace(f.metadata["option"], name=f.name) for f in fields(Settings))
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
        """The typed view; a missing required option is "" (named by the start-up check, not a TypeError)."""
        given = {name: item.value for name, item in self.values.items() if item.value is not None}
        return Settings(**{"upstream": "", "policy": "", **given})

    def show(self) -> list[tuple[str, str, str]]:
        """(name, printable value, source) for every option; secrets are never printed."""
        rows = []
        for name, item in self.values.items():
            if BY_NAME[name].secret:
                shown = "(set, redacted)" if item.value else "(not set)"
            elif isinstance(item.value, tuple):  # listen, ops_listen
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


def options_in(*groups: str) -> tuple[Option, ...]:
    """The options an operator command takes, by group (``serve`` and ``config show`` take them all)."""
    return tuple(o for o in OPTIONS if o.groups.intersection(groups))


def resolve(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
    options: tuple[Option, ...] = OPTIONS,
    prefix: str = "",
) -> Resolved:
    """The effective configuration of ``options`` (the others keep their defaults), for every command alike.

    ``flags`` holds only options given on the command line, keyed ``<prefix><name>`` (secrets:
    ``<prefix><name>_file``). A ``prefix`` (``to_`` for the target of ``keys rewrap``) names a second
    set of the same options, read from ``--to-<name>`` and ``FHIRCRYPT_TO_<NAME>`` only: the config
    file describes the deployment, not a one-off target.
    """
    flags = flags or {}
    environ = environ or {}
    if prefix:
        config_file, data = None, {}
    else:
        config_file = config_file or environ.get(CONFIG_ENV) or None
        data = _read_file(config_file) if config_file else {}
    base = Path(config_file).resolve().parent if config_file else None
    values = {o.name: Value(o.parse(o.default) if o.default is not None else None, "default") for o in OPTIONS}
    for opt in options:
        named = replace(opt, name=prefix + opt.name)  # its flag and environment variable
        if opt.secret:
            values[opt.name] = _resolve_secret(named, flags, environ, data, config_file, base)
            continue
        if flags.get(named.name) is not None:
            raw, source = flags[named.name], f"flag {named.flag}"
        elif environ.get(named.env) not in (None, ""):
            raw, source = environ[named.env], f"env {named.env}"
        elif data.get(opt.name) is not None:
            raw, source = data[opt.name], f"file {config_file}"
            if opt.path and base is not None and not Path(str(raw)).is_absolute():
                raw = str(base / str(raw))
        else:
            continue
        try:
            value = opt.parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{named.name} ({source}): {exc}") from None
        if opt.choices and value not in opt.choices:
            raise ConfigError(f"{named.name} ({source}): use one of {', '.join(opt.choices)}")
        values[opt.name] = Value(value, source)
    return Resolved(values, config_file)


def _resolve_secret(
    opt: Option,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    data: Mapping[str, Any],
    config_file: str | None,
    base: Path | None,
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
