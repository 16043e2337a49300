"""The ``fhircrypt`` command: a thin shell over the core and the aiohttp app.

``serve`` and ``config show`` take one flag per option of :mod:`proxy.settings`; each can
also come from ``FHIRCRYPT_<NAME>`` or the ``--config`` file (flags > env > file > defaults).
Secrets (the key-encryption key, client secrets) come only from files or environment
variables, never from flags.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from proxy import __version__
from proxy.keyflags import provider_from_settings
from proxy.keymgmt.keyring import (
    Keyring,
    backup_keyring,
    create_keyring,
    load_keyring,
    make_folder,
    refuse_existing,
    restore_keyring,
    rewrap_keyring,
    update_keyring,
)
from proxy.keymgmt.providers.base import KeyringError, describe_text
from proxy.keymgmt.providers.local import generate_kek
from proxy.keystore import cli as shred_cli
from proxy.keystore.base import StoreError
from proxy.optionflags import add_option_flags, resolve_args, settings_from_args
from proxy.oserrors import os_error_line
from proxy.policy.compiler import compile_file
from proxy.policy.explain import explain
from proxy.policy.loader import PolicyError
from proxy.settings import (
    KEYRING,
    POLICY,
    PROVIDER,
    STORE,
    UPSTREAM,
    Settings,
    kek_source,
    missing_required,
    options_in,
)

if TYPE_CHECKING:
    from proxy.migrate.commands import Connection

log = logging.getLogger("fhircrypt")


# The options each operator command takes (serve, config show and probe take them all).
KEYS = options_in(KEYRING, PROVIDER)
SHRED = options_in(KEYRING, PROVIDER, STORE)
RETIRE = options_in(KEYRING, PROVIDER, UPSTREAM)
REENCRYPT = options_in(KEYRING, PROVIDER, UPSTREAM, POLICY)
COVERAGE = options_in(UPSTREAM, POLICY)
TARGET = options_in(PROVIDER)  # keys rewrap --to-...


def _tool_args(p: argparse.ArgumentParser) -> None:
    """The operator tools' own knobs (not deployment options: --workers here counts concurrent requests)."""
    p.add_argument("--workers", type=int, default=8, help="concurrent requests")
    p.add_argument("--rate", type=float, help="at most this many requests per second to the upstream")
    p.add_argument("--report", help="write the JSON report to this file ('-' for stdout)")


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # what add_subparsers returns


class _FirstWord(argparse.Action):
    """Hand the rest of the line to the parser its first word names, or to ``fallback`` when it names none.

    ``shred Patient/<id>`` and ``shred hold add Patient/<id>`` share a command word; argparse's
    subcommands cannot fall back to a positional form, so this action chooses the parser and
    argparse parses the rest (usage errors exit 2 with that parser's usage).
    """

    def __init__(
        self,
        option_strings: list[str],
        dest: str,
        parsers: dict[str, argparse.ArgumentParser],
        fallback: argparse.ArgumentParser,
        **kwargs: Any,
    ) -> None:
        super().__init__(option_strings, dest, nargs=argparse.REMAINDER, **kwargs)
        self.parsers, self.fallback = parsers, fallback

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        words = list(values) if isinstance(values, list) else []
        if not words:
            parser.error(f"expected {self.metavar}")
        chosen = self.parsers.get(words[0])
        if chosen is not None:
            chosen.parse_args(words[1:], namespace)
        else:
            self.fallback.parse_args(words, namespace)


def _serve(sub: Subparsers) -> None:
    serve = sub.add_parser("serve", help="run the proxy")
    add_option_flags(serve)
    serve.set_defaults(func=cmd_serve)


def _config(sub: Subparsers) -> None:
    config = sub.add_parser("config", help="the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="every option, its value and where it came from (secrets redacted)")
    add_option_flags(show)
    show.set_defaults(func=cmd_config)


def _probe(sub: Subparsers) -> None:
    probe = sub.add_parser("probe", help="exit 0 when the local proxy answers /healthz (container HEALTHCHECK)")
    probe.add_argument("--ready", action="store_true", help="ask /readyz instead")
    add_option_flags(probe)
    probe.set_defaults(func=cmd_probe)


def _audit(sub: Subparsers) -> None:
    audit = sub.add_parser("audit", help="the tamper-evident audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    init = audit_sub.add_parser("init", help="create a trail and its initial key (give the key to the auditor)")
    init.add_argument("--trail", required=True, help="the JSON-lines trail to create")
    init.add_argument("--key-file", required=True, help="where to write the initial key (mode 0600)")
    init.set_defaults(func=cmd_audit_init)
    verify = audit_sub.add_parser("verify", help="check a trail; names the first broken record")
    verify.add_argument("trail")
    verify.add_argument("--key-file", required=True, help="the initial key written by audit init")
    verify.add_argument("--state", help="the writer's state file: also detects records cut from the end")
    verify.set_defaults(func=cmd_audit_verify)


def _keys(sub: Subparsers) -> None:
    keys = sub.add_parser("keys", help="manage the local keyring")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="create a new keyring")
    add_option_flags(init, KEYS)
    init.add_argument(
        "--generate-kek",
        metavar="FILE",
        help="also create a new random key-encryption key in FILE (mode 0600; never printed)",
    )
    init.set_defaults(func=cmd_keys_init)
    rotate = keys_sub.add_parser("rotate", help="add a new primary key; old keys keep decrypting")
    add_option_flags(rotate, KEYS)
    rotate.set_defaults(func=cmd_keys_rotate)
    listing = keys_sub.add_parser("list", help="show key ids and which is primary (never key material)")
    add_option_flags(listing, KEYS)
    listing.set_defaults(func=cmd_keys_list)
    rewrap = keys_sub.add_parser(
        "rewrap", help="wrap the keyring under another key-encryption key or provider (resources untouched)"
    )
    add_option_flags(rewrap, KEYS)
    add_option_flags(rewrap, TARGET, prefix="to-")
    rewrap.add_argument("--out", help="write the rewrapped keyring here instead of replacing --keyring")
    rewrap.add_argument(
        "--generate-kek", metavar="FILE", help="--to-key-provider local: create the new KEK in FILE (mode 0600)"
    )
    rewrap.set_defaults(func=cmd_keys_rewrap)
    backup = keys_sub.add_parser("backup", help="copy the wrapped keyring to FILE after proving it opens")
    add_option_flags(backup, KEYS)
    backup.add_argument("--out", required=True, help="the backup file (never overwritten; mode 0600)")
    backup.set_defaults(func=cmd_keys_backup)
    restore = keys_sub.add_parser(
        "restore", help="put a verified backup in place of --keyring (refuses to drop keys the current one holds)"
    )
    add_option_flags(restore, KEYS)
    restore.add_argument("--from", dest="source", required=True, help="the backup file")
    restore.set_defaults(func=cmd_keys_restore)
    retire = keys_sub.add_parser(
        "retire", help="remove a key once a scan of the upstream proves no stored resource still uses it"
    )
    retire.add_argument("key", help="key id, e.g. k1")
    _tool_args(retire)
    retire.add_argument("--types", nargs="+", help="scan only these types (default: every R4 resource type)")
    retire.add_argument(
        "--history", action="store_true", help="also scan every version in _history (refuses while any uses the key)"
    )
    add_option_flags(retire, RETIRE)
    retire.set_defaults(func=cmd_keys_retire)


ShredCommand: TypeAlias = Callable[[argparse.Namespace, Settings, Keyring], int]


def _with_keyring(run: ShredCommand) -> Callable[[argparse.Namespace], int]:
    """A shred command: the keyring first (the store names patients only by tags keyed with it)."""

    def opened(args: argparse.Namespace) -> int:
        settings = settings_from_args(args)
        return run(args, settings, load_keyring(settings.keyring, provider_from_settings(settings)))

    return opened


def _shred(sub: Subparsers) -> None:
    """``shred Patient/<id>`` or ``shred hold add|remove|list``: every form needs the keyring and the store."""

    def patient(p: argparse.ArgumentParser) -> None:
        p.add_argument("patient", metavar="Patient/<id>")

    def stores(p: argparse.ArgumentParser, run: ShredCommand) -> None:
        add_option_flags(p, SHRED)
        p.set_defaults(func=_with_keyring(run))

    def who(p: argparse.ArgumentParser, reason: str) -> None:
        p.add_argument("--reason", help=reason)
        p.add_argument("--by", help="who runs it, for the tombstone (default FHIRCRYPT_OPERATOR or the OS user)")

    erase = argparse.ArgumentParser(
        prog="fhircrypt shred", description="crypto-shred a patient: destroy its keys (refused while on legal hold)"
    )
    patient(erase)
    who(erase, "a reason code, e.g. erasure-request (the default), retention-expired")
    stores(erase, shred_cli.shred)

    hold = argparse.ArgumentParser(prog="fhircrypt shred hold", description="the legal-hold list")
    hold_sub = hold.add_subparsers(dest="hold_command", required=True)
    add = hold_sub.add_parser("add", help="refuse shredding a patient until a day")
    patient(add)
    add.add_argument("--until", help="the last day of the hold (YYYY-MM-DD)")
    who(add, "a reason code, e.g. litigation, uu-retention")
    stores(add, shred_cli.hold_add)
    remove = hold_sub.add_parser("remove", help="end a patient's hold")
    patient(remove)
    stores(remove, shred_cli.hold_remove)
    listing = hold_sub.add_parser("list", help="every hold (patients shown to whoever has the keyring)")
    stores(listing, shred_cli.hold_list)

    parser = sub.add_parser(
        "shred",
        help="crypto-shred a patient (destroy its keys) or manage the legal-hold list",
        description="fhircrypt shred Patient/<id> [--reason CODE] | shred hold add Patient/<id> --until DATE "
        "--reason CODE | shred hold remove Patient/<id> | shred hold list",
    )
    parser.add_argument(
        "form",
        action=_FirstWord,
        parsers={"hold": hold},
        fallback=erase,
        metavar="Patient/<id> | hold {add,remove,list}",
        help="see fhircrypt shred Patient/x -h and fhircrypt shred hold -h",
    )


def _reencrypt(sub: Subparsers) -> None:
    reencrypt = sub.add_parser(
        "reencrypt",
        help="encrypt plaintext and re-encrypt old keys/policies in place on the upstream (operator tool)",
    )
    _tool_args(reencrypt)
    reencrypt.add_argument(
        "--previous-policy", help="the policy older resources were written under (to re-encrypt them)"
    )
    reencrypt.add_argument("--types", nargs="+", help="only these types (default: every type the policy covers)")
    reencrypt.add_argument(
        "--all-types", action="store_true", help="every R4 type (finds covered resources nested in uncovered ones)"
    )
    reencrypt.add_argument("--retire", nargs="+", default=[], metavar="KID", help="move resources off these keys")
    reencrypt.add_argument(
        "--to-primary", action="store_true", help="move every resource not under the primary key to it"
    )
    reencrypt.add_argument("--checkpoint", help="resume from / record progress in this file")
    reencrypt.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    reencrypt.add_argument("--shard", help="i/N: do only shard i of N (e.g. $(JOB_COMPLETION_INDEX)/8)")
    reencrypt.add_argument("--page-size", type=int, default=100, help="resources per search page")
    add_option_flags(reencrypt, REENCRYPT)
    reencrypt.set_defaults(func=cmd_reencrypt)


def _coverage(sub: Subparsers) -> None:
    coverage = sub.add_parser(
        "coverage", help="read-only scan: what the server stores encrypted, masked or in the clear, by element path"
    )
    _tool_args(coverage)
    add_option_flags(coverage, COVERAGE)
    coverage.add_argument("--types", nargs="+", help="only these types (default: every R4 resource type)")
    coverage.add_argument("--checkpoint", help="resume from / record progress in this file")
    coverage.add_argument("--page-size", type=int, default=100, help="resources per search page")
    coverage.add_argument("--timeout", type=float, default=60.0, help="seconds per request before retrying")
    coverage.add_argument("--html", help="write the self-contained HTML report to this file")
    coverage.add_argument("--ndjson", nargs="+", metavar="FILE", help="read Bulk export files instead of --upstream")
    coverage.set_defaults(func=cmd_coverage)


def _policy(sub: Subparsers) -> None:
    policy = sub.add_parser("policy", help="work with policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="compile a policy and explain what it encrypts")
    check.add_argument("file")
    check.add_argument("--show-display", action="store_true", help="list every covered Reference.display")
    check.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too, e.g. in CI")
    check.set_defaults(func=cmd_policy)


# One function per command: it adds its parser(s) and names the function that runs each with set_defaults(func=...).
COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _serve,
    _config,
    _probe,
    _audit,
    _keys,
    _shred,
    _reencrypt,
    _coverage,
    _policy,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fhircrypt", description="Encrypting reverse proxy for FHIR R4")
    parser.add_argument("--version", action="version", version=f"fhircrypt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _write_secret(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")


def _generate_kek_into(path: str, settings: Settings, prefix: str = "") -> Settings:
    """--generate-kek FILE: a new random local KEK (never printed) that the command then uses."""
    if settings.key_provider != "local":
        raise ValueError(f"--generate-kek goes with --{prefix}key-provider local")
    make_folder(Path(path).parent)
    _write_secret(path, generate_kek())
    _warn_if_in_git(Path(path))
    return dataclasses.replace(settings, kek_file=path)


def _warn_if_in_git(path: Path) -> None:
    """A KEK inside a git work tree is one ``git add .`` from a commit: say so (the file is already written)."""
    path = path.resolve()
    tree = next((folder for folder in path.parents if (folder / ".git").exists()), None)
    if tree is None:
        return
    git = shutil.which("git")
    ignored = (
        git is not None and subprocess.run([git, "-C", str(tree), "check-ignore", "-q", str(path)]).returncode == 0
    )
    print(
        f"warning: the key-encryption key {path} is inside the git work tree {tree}"
        + ("" if ignored else " and git does not ignore it")
        + "; keep it outside any repository (or in a secret store)",
        file=sys.stderr,
    )


def cmd_keys_init(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    refuse_existing(settings.keyring)  # before a KEK file is made for nothing; checked again under the lock
    if args.generate_kek:
        settings = _generate_kek_into(args.generate_kek, settings)
    provider = provider_from_settings(settings)
    provider.check()
    keyring = create_keyring(settings.keyring, provider)
    wrapper = describe_text(provider.describe())
    print(f"created {settings.keyring}: primary key {keyring.primary_id}, wrapped by the {wrapper}")
    return 0


def cmd_keys_backup(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    keyring = backup_keyring(settings.keyring, provider_from_settings(settings), args.out)
    print(f"backed up {settings.keyring} to {args.out}: keys {', '.join(keyring.key_ids)}, verified to open")
    return 0


def cmd_keys_restore(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    keyring = restore_keyring(args.source, provider_from_settings(settings), settings.keyring)
    print(f"restored {settings.keyring} from {args.source}: keys {', '.join(keyring.key_ids)}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    keyring, kid = update_keyring(settings.keyring, provider_from_settings(settings), lambda ring: ring.rotate())
    print(f"new primary key {kid}; keys {', '.join(keyring.key_ids)} remain for decryption")
    return 0


def cmd_keys_retire(args: argparse.Namespace) -> int:
    from proxy.migrate.commands import every_type, retire

    settings = settings_from_args(args)
    provider = provider_from_settings(settings)
    keyring = load_keyring(settings.keyring, provider)
    types = tuple(args.types) if args.types else every_type()
    conn = _connection(args, settings)
    return asyncio.run(
        retire(conn, keyring, provider, settings.keyring, args.key, types, args.workers, args.report, args.history)
    )


def cmd_keys_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    keyring = load_keyring(settings.keyring, provider_from_settings(settings))
    for kid in keyring.key_ids:
        print(f"{kid}{'  (primary)' if kid == keyring.primary_id else ''}")
    return 0


def cmd_keys_rewrap(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    wanted = settings_from_args(args, "to-")  # both resolved before any key is touched
    source = provider_from_settings(settings)
    if args.generate_kek:
        wanted = _generate_kek_into(args.generate_kek, wanted, "to-")
    target = provider_from_settings(wanted, prefix="to_")
    if target.describe() == source.describe():
        raise ValueError(
            f"the target key-encryption key is the one the keyring uses now ({describe_text(source.describe())})"
        )
    target.check()
    keyring = rewrap_keyring(settings.keyring, source, target, args.out)
    print(
        f"rewrapped {args.out or settings.keyring}: keys {', '.join(keyring.key_ids)} "
        f"(primary {keyring.primary_id}) now wrapped by the {describe_text(target.describe())}; "
        "stored resources are unchanged"
    )
    return 0


def _connection(args: argparse.Namespace, settings: Settings) -> Connection:
    """The operator tools' direct connection: upstream, its CA and its token from the resolved options."""
    from proxy.migrate.commands import Connection, every_type

    if not settings.upstream:
        raise ValueError("--upstream (or FHIRCRYPT_UPSTREAM) is required")
    unknown = sorted(set(args.types or ()) - set(every_type()))
    if unknown:
        raise ValueError(f"--types: not R4 resource types: {', '.join(unknown)}")
    return Connection(settings.upstream, args.rate, settings.upstream_token, settings.upstream_ca)


def cmd_reencrypt(args: argparse.Namespace) -> int:
    from proxy.migrate.assess import Plan
    from proxy.migrate.commands import every_type, reencrypt
    from proxy.migrate.run import Options
    from proxy.migrate.shards import parse_shard

    settings = settings_from_args(args)
    if not settings.policy:
        raise ValueError("--policy (or FHIRCRYPT_POLICY) is required")
    conn = _connection(args, settings)
    policy = compile_file(settings.policy)
    policy.require_configured()  # an unset variable would rewrite those values in the clear
    if getattr(policy, "per_patient_keys", False):
        # Fail closed: reencrypt wraps data keys with the keyring's primary only. Under a policy with
        # keys.per_patient that would put patients' records beyond the reach of crypto-shredding.
        raise ValueError("reencrypt does not support policies with keys.per_patient yet")
    keyring = load_keyring(settings.keyring, provider_from_settings(settings))
    unknown = [k for k in args.retire if k not in keyring.key_ids]
    if unknown or keyring.primary_id in args.retire:
        raise ValueError(f"--retire names keys that are not in the keyring or the primary: {', '.join(args.retire)}")
    types = tuple(args.types) if args.types else every_type() if args.all_types else tuple(sorted(policy.resources))
    plan = Plan(
        policy,
        keyring,
        frozenset(args.retire),
        args.to_primary,
        compile_file(args.previous_policy) if args.previous_policy else None,
    )
    opts = Options(
        types=types,
        workers=max(1, args.workers),
        page_size=max(1, args.page_size),
        shard=parse_shard(args.shard) if args.shard else None,
        dry_run=args.dry_run,
    )
    return asyncio.run(reencrypt(conn, plan, opts, args.checkpoint, args.report))


def cmd_coverage(args: argparse.Namespace) -> int:
    from proxy.coverage.command import Outputs, Scan, scan_ndjson, scan_upstream
    from proxy.migrate.commands import every_type
    from proxy.migrate.run import Options

    settings = settings_from_args(args)
    scan = Scan(compile_file(settings.policy) if settings.policy else None)
    out = Outputs(args.report, args.html)
    if args.ndjson:
        return scan_ndjson(args.ndjson, scan, out)
    conn = dataclasses.replace(_connection(args, settings), timeout=args.timeout)
    opts = Options(tuple(args.types or every_type()), workers=max(1, args.workers), page_size=max(1, args.page_size))
    return asyncio.run(scan_upstream(conn, scan, opts, args.checkpoint, out))


def cmd_audit_init(args: argparse.Namespace) -> int:
    from proxy.audit.cli import init_trail

    init_trail(args.trail, args.key_file)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from proxy.audit.cli import verify_trail

    return verify_trail(args.trail, args.key_file, args.state)


def cmd_policy(args: argparse.Namespace) -> int:
    policy = compile_file(args.file)
    print(explain(policy, args.show_display))
    return 1 if args.strict and any(f.severity == "warning" for f in policy.findings) else 0


def cmd_config(args: argparse.Namespace) -> int:
    resolved = resolve_args(args)
    kek = kek_source(resolved, os.environ)
    rows = [*resolved.show(), ("kek", "" if kek == "not set" else "(redacted)", kek)]
    width = max(len(name) for name, _, _ in rows)
    print(f"# configuration file: {resolved.config_file or '(none)'}; precedence: flag > env > file > default")
    for name, value, source in rows:
        print(f"{name.ljust(width)}  {value or '-'}  [{source}]")
    missing = missing_required(resolved.settings())
    if missing:  # what serve would refuse to start without
        print(f"error: {missing}", file=sys.stderr)
        return 2
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Probe this container's own proxy on loopback, on the ops port when there is one."""
    import ssl
    import urllib.request

    settings = settings_from_args(args)
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

    settings = settings_from_args(args)
    configure(settings.log_level)
    problem = check_startup(settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return serve(settings)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = args.func(args)
    except (PolicyError, KeyringError, StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except OSError as exc:  # permissions, missing folders, a full disk, a directory where a file goes
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        code = 2
    sys.exit(code)
