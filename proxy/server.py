"""Running the proxy as a process: start-up checks, one worker, graceful drain and SIGHUP reloads.

One worker is one process with one event loop. ``workers > 1`` hands over to
:mod:`proxy.supervisor`, which forks that many workers sharing the port (SO_REUSEPORT).

Signals (a worker; the supervisor forwards them):

- SIGTERM / SIGINT: stop accepting, let requests in flight finish for up to
  ``shutdown_timeout`` seconds, close what is left, exit 0.
- SIGHUP: compile the policy and load certificates, identities and the upstream TLS again; only
  when all of them load is anything swapped (requests already running finish with what they
  started with). A policy that fails to compile is rejected with one log line and the old
  configuration keeps serving.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import ssl
import sys

from proxy import gctune
from proxy.keyflags import provider_from_settings, settings_bounds
from proxy.keymgmt.keycache import KeyCache
from proxy.oserrors import os_error_line
from proxy.policy.compiler import CompiledPolicy, compile_file
from proxy.policy.loader import PolicyError
from proxy.settings import OPTIONS, Settings, missing_required

log = logging.getLogger("fhircrypt")


def check_startup(settings: Settings) -> str | None:
    """What makes this configuration unusable, in words (for exit code 2), or None."""
    from proxy.web.tls import check_files
    from proxy.web.upstream import upstream_problem

    missing = missing_required(settings)
    if missing:
        return missing
    if settings.auth == "jwt" and (not settings.audience or not (settings.oidc_issuer or settings.jwks_url)):
        return (
            "--auth jwt needs --audience and --oidc-issuer or --jwks-url (--auth none is a development "
            "mode that decrypts everything for every caller)"
        )
    if settings.workers < 1:
        return "--workers must be at least 1"
    return check_files(settings) or _unreadable(settings) or _unconfigured(settings) or upstream_problem(settings)


def _unconfigured(settings: Settings) -> str | None:
    """A policy with a ``${FHIRCRYPT_…}`` variable left unset would match nothing where it is used
    (an MRN or BPJS system) and store those values in the clear: refused, naming the variable."""
    try:
        compile_file(settings.policy).require_configured()
    except PolicyError as exc:
        return str(exc)
    return None


def _unreadable(settings: Settings) -> str | None:
    """The first file option that cannot be opened, named with the reason (the TLS library's own
    errors name no path, and a missing file found later would end in a traceback)."""
    for opt in OPTIONS:
        value = getattr(settings, opt.name) if opt.path else None
        if value:
            try:
                with open(value, "rb"):
                    pass
            except OSError as exc:
                return f"{opt.flag}: {os_error_line(exc)}"
    return None


def load_keys(settings: Settings) -> KeyCache:
    """The keys, unwrapped once at start-up through the configured provider (no keys, no start) and
    re-verified in the background within the cache's bounds; every provider call is counted."""
    from proxy.web.metrics import CountedProvider

    return KeyCache(settings.keyring, CountedProvider(provider_from_settings(settings)), settings_bounds(settings))


def serve(settings: Settings) -> int:
    if settings.workers > 1:
        from proxy.supervisor import supervise

        return supervise(settings)
    return run_worker(settings, reuse_port=False)


def _warn(settings: Settings, policy: CompiledPolicy) -> None:
    if settings.auth == "none":
        log.warning(
            "DEVELOPMENT MODE: --auth none decrypts every element for every caller; never expose this proxy",
            extra={"event": "auth-disabled"},
        )
    elif policy.access is None:
        log.warning(
            "the policy has no access rules: authenticated callers get every element masked",
            extra={"event": "no-access-rules"},
        )
    if not settings.audit_trail and not settings.audit_fhir:
        log.warning("no audit trail (--audit-trail): decryptions are not recorded", extra={"event": "no-audit"})


def die_with_parent() -> None:
    """A worker must not outlive its supervisor (even one killed with SIGKILL): Linux's PR_SET_PDEATHSIG."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_worker(settings: Settings, reuse_port: bool) -> int:
    from proxy.web.app import create_app
    from proxy.web.tls import server_tls

    policy = compile_file(settings.policy)
    policy.require_configured()
    keys = load_keys(settings)
    keyring = keys.current()
    _warn(settings, policy)
    app = create_app(settings, policy, keys)
    gctune.tune(settings.gc_threshold)
    log.info(
        "starting",
        extra={
            "event": "start",
            "listen": f"{settings.host}:{settings.port}",
            "policy": policy.name,
            "policy_sha256": policy.digest,
            "primary_key": keyring.primary_id,
            "key_provider": keys.provider_health().provider,
            "tls": bool(settings.tls_cert),
            "client_certificates": settings.tls_client_auth,
        },
    )
    asyncio.run(_serve(app, settings, server_tls(settings), reuse_port))
    return 0


async def _serve(app, settings: Settings, tls, reuse_port: bool) -> None:
    from aiohttp import web

    from proxy.web.drain import drain, grace
    from proxy.web.httperrors import FhirErrorsRunner
    from proxy.web.readiness import READINESS

    # aiohttp's shutdown_timeout is only the backstop for connections left after our own drain
    margin = grace(settings.shutdown_timeout)
    runner = FhirErrorsRunner(app, access_log=None, handle_signals=False, shutdown_timeout=margin)
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.host,
        settings.port,
        ssl_context=tls.listener if tls else None,
        reuse_port=reuse_port or None,
    )
    await site.start()
    runners = [runner]
    if settings.ops_port is not None:
        from proxy.web.app import ops_app

        ops = FhirErrorsRunner(ops_app(app), access_log=None, handle_signals=False, shutdown_timeout=margin)
        await ops.setup()
        await web.TCPSite(ops, settings.ops_host, settings.ops_port, reuse_port=reuse_port or None).start()
        runners.append(ops)  # closed after the drain: /readyz says 'draining' while requests finish
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, app, settings, tls)
    log.info("listening", extra={"event": "listening", "listen": f"{settings.host}:{settings.port}"})
    await stop.wait()
    app[READINESS].draining = True
    log.info(
        "draining: no new connections, waiting for requests in flight",
        extra={"event": "draining", "deadline_s": settings.shutdown_timeout},
    )
    # One deadline in total (the orchestrator's grace period is sized on it): close the listener and
    # every connection after its current request, wait until the deadline less a margin, cut what is
    # left, then close the (idle) connections
    for each in runner.sites:
        await each.stop()
    runner.server.pre_shutdown()
    cut = await drain(app, settings.shutdown_timeout - margin, margin / 2)
    if cut:
        log.warning("requests cut at the drain deadline", extra={"event": "requests-cut", "count": cut})
    for closing in runners:
        await closing.cleanup()
    log.info("stopped", extra={"event": "stopped"})


def reload(app, settings: Settings, tls) -> bool:
    """SIGHUP: everything is loaded first; only when all of it loads is anything swapped."""
    from proxy.auth.certificates import IdentityError
    from proxy.web import metrics
    from proxy.web.app import apply_reload
    from proxy.web.tls import upstream_context

    try:
        policy = compile_file(settings.policy)
        policy.require_configured()
    except (PolicyError, OSError) as exc:
        metrics.RELOADS.labels("rejected").inc()
        log.error(
            f"reload rejected, the previous policy keeps serving: {exc}",
            extra={"event": "reload-rejected", "part": "policy"},
        )
        return False
    try:
        upstream_context(settings)  # the upstream CA and client certificate load
        new_tls = tls.build() if tls else None
        apply_reload(app, policy)
    except (OSError, ssl.SSLError, IdentityError) as exc:
        metrics.RELOADS.labels("rejected").inc()
        log.error(
            "reload rejected, the previous certificates and policy keep serving: "
            f"a certificate, key or identities file does not load ({type(exc).__name__})",
            extra={"event": "reload-rejected", "part": "certificates"},
        )
        return False
    if tls:
        tls.current = new_tls
    metrics.RELOADS.labels("ok").inc()
    log.info(
        "reloaded",
        extra={"event": "reloaded", "policy": policy.name, "policy_sha256": policy.digest, "tls": bool(tls)},
    )
    return True
