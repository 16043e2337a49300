"""The ``fhircrypt`` command: a thin shell over the core and the aiohttp app.

``serve`` and ``config show`` take one flag per option of :mod:`proxy.settings`; each can
also come from ``FHIRCRYPT_<NAME>`` or the ``--config`` file (flags > env > file > defaults).
Secrets (the key-encryption key, client secrets) come only from files or environment
variables, never from flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from proxy import __version__
from proxy.crypto.kek import KeyringError, generate_kek, load_local_kek
from proxy.crypto.keyring import Keyring, load_keyring, save_keyring
from proxy.policy.compiler import compile_file
from proxy.policy.explain import explain
from proxy.policy.loader import PolicyError
from proxy.settings import CONFIG_ENV, OPTIONS, Resolved, kek_source, parse_bool, resolve

log = logging.getLogger("fhircrypt")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("FHIRCRYPT_" + name.upper().replace("-", "_"), default)


def _kek_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keyring", default=_env("keyring", ".fhircrypt/keyring.json"), help="keyring file")
    p.add_argument(
        "--kek-file", default=_env("kek_file"), help="file holding the key-encryption key (else FHIRCRYPT_KEK)"
    )


def _config_args(p: argparse.ArgumentParser) -> None:
    """One flag per configuration option; secrets have none (they come from files or the environment)."""
    p.add_argument("--config", help=f"YAML configuration file (or {CONFIG_ENV})")
    for opt in OPTIONS:
        if opt.secret:
            continue
        if opt.parse is parse_bool:
            p.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None, help=opt.help)
        else:
            p.add_argument(opt.flag, dest=opt.name, choices=opt.choices, default=None, help=opt.help)


def _resolve(args: argparse.Namespace) -> Resolved:
    flags = {opt.name: getattr(args, opt.name) for opt in OPTIONS if not opt.secret}
    return resolve(flags, os.environ, args.config)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fhircrypt", description="Encrypting reverse proxy for FHIR R4")
    parser.add_argument("--version", action="version", version=f"fhircrypt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    _config_args(serve)
    config = sub.add_parser("config", help="the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="every option, its value and where it came from (secrets redacted)")
    _config_args(show)
    probe = sub.add_parser("probe", help="exit 0 when the local proxy answers /healthz (container HEALTHCHECK)")
    probe.add_argument("--ready", action="store_true", help="ask /readyz instead")
    _config_args(probe)

    audit = sub.add_parser("audit", help="the tamper-evident audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_init = audit_sub.add_parser("init", help="create a trail and its initial key (give the key to the auditor)")
    audit_init.add_argument("--trail", required=True, help="the JSON-lines trail to create")
    audit_init.add_argument("--key-file", required=True, help="where to write the initial key (mode 0600)")
    audit_verify = audit_sub.add_parser("verify", help="check a trail; names the first broken record")
    audit_verify.add_argument("trail")
    audit_verify.add_argument("--key-file", required=True, help="the initial key written by audit init")
    audit_verify.add_argument("--state", help="the writer's state file: also detects records cut from the end")

    keys = sub.add_parser("keys", help="manage the local keyring")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="create a new keyring")
    _kek_args(init)
    init.add_argument(
        "--generate-kek",
        metavar="FILE",
        help="also create a new random key-encryption key in FILE (mode 0600; never printed)",
    )
    rotate = keys_sub.add_parser("rotate", help="add a new primary key; old keys keep decrypting")
    _kek_args(rotate)
    listing = keys_sub.add_parser("list", help="show key ids and which is primary (never key material)")
    _kek_args(listing)

    policy = sub.add_parser("policy", help="work with policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="compile a policy and explain what it encrypts")
    check.add_argument("file")
    check.add_argument("--show-display", action="store_true", help="list every covered Reference.display")

    demo = sub.add_parser("demo", help="run the demo on the embedded test upstream")
    demo.add_argument("--keep-running", action="store_true", help="leave proxy and upstream running afterwards")
    return parser


def _write_secret(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")


def cmd_keys(args: argparse.Namespace) -> int:
    if args.keys_command == "init":
        if Path(args.keyring).exists():
            print(
                f"error: {args.keyring} exists; refusing to overwrite a keyring (key loss is data loss)",
                file=sys.stderr,
            )
            return 2
        if args.generate_kek:
            Path(args.generate_kek).parent.mkdir(parents=True, exist_ok=True)
            _write_secret(args.generate_kek, generate_kek())
            args.kek_file = args.generate_kek
        provider = load_local_kek(args.kek_file)
        keyring = Keyring.generate()
        save_keyring(args.keyring, keyring, provider)
        print(f"created {args.keyring}: primary key {keyring.primary_id}, wrapped by {provider.describe()}")
        return 0
    provider = load_local_kek(args.kek_file)
    keyring = load_keyring(args.keyring, provider)
    if args.keys_command == "rotate":
        kid = keyring.rotate()
        save_keyring(args.keyring, keyring, provider)
        print(f"new primary key {kid}; keys {', '.join(keyring.key_ids)} remain for decryption")
    else:
        for kid in keyring.key_ids:
            print(f"{kid}{'  (primary)' if kid == keyring.primary_id else ''}")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    policy = compile_file(args.file)
    print(explain(policy, args.show_display))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    resolved = _resolve(args)
    kek = kek_source(resolved, os.environ)
    rows = [*resolved.show(), ("kek", "" if kek == "not set" else "(redacted)", kek)]
    width = max(len(name) for name, _, _ in rows)
    print(f"# configuration file: {resolved.config_file or '(none)'}; precedence: flag > env > file > default")
    for name, value, source in rows:
        print(f"{name.ljust(width)}  {value or '-'}  [{source}]")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Probe this container's own proxy on loopback, on the ops port when there is one."""
    import ssl
    import urllib.request

    settings = _resolve(args).settings()
    if settings.ops_port is not None:
        scheme, host, port = "http", settings.ops_host, settings.ops_port
    else:
        scheme, host, port = ("https" if settings.tls_cert else "http"), settings.host, settings.port
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    # our own process on loopback: whether its certificate is trusted is not what is probed
    context = ssl._create_unverified_context() if scheme == "https" else None
    url = f"{scheme}://{host}:{port}/{'readyz' if args.ready else 'healthz'}"
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as resp:
            return 0 if resp.status == 200 else 1
    except OSError as exc:
        print(f"probe {url}: {type(exc).__name__}", file=sys.stderr)
        return 1


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.logs import configure
    from proxy.server import check_startup, serve

    resolved = _resolve(args)
    settings = resolved.settings()
    configure(settings.log_level)
    problem = check_startup(settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return serve(settings)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "audit":
            from proxy.audit.cli import init_trail, verify_trail

            if args.audit_command == "init":
                init_trail(args.trail, args.key_file)
                code = 0
            else:
                code = verify_trail(args.trail, args.key_file, args.state)
        elif args.command == "keys":
            code = cmd_keys(args)
        elif args.command == "policy":
            code = cmd_policy(args)
        elif args.command == "serve":
            code = cmd_serve(args)
        elif args.command == "config":
            code = cmd_config(args)
        elif args.command == "probe":
            code = cmd_probe(args)
        else:
            from proxy.demo import run_demo

            code = run_demo(keep_running=args.keep_running)
    except (PolicyError, KeyringError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
