"""The aiohttp application: its wiring, and the one pipeline every FHIR request goes through.

A reader follows a GET or a POST in :func:`handle`: classified, authenticated and decided
(``proxy.web.access``, ``proxy.auth.decision``), the request transformed (``proxy.web.prepare``),
forwarded and the answer transformed (``proxy.web.forward``), all accounted for by one
middleware (``proxy.web.accounting``). Every decision about FHIR content is made by the pure
core in ``proxy.transform`` and ``proxy.auth.decision``.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.audit.poster import FhirAuditPoster
from proxy.audit.trail import AsyncAuditSink, AuditTrail
from proxy.auth.certificates import CertificateIdentities
from proxy.auth.tokens import Introspector, JwtSettings, JwtVerifier
from proxy.keymgmt.keycache import KeyCache
from proxy.keymgmt.keyring import Keyring
from proxy.keymgmt.patientkeys import PatientKeyCache
from proxy.keystore import open_store
from proxy.outcome import FhirError
from proxy.policy.compiler import CompiledPolicy
from proxy.settings import Settings
from proxy.transform import guard
from proxy.transform.interactions import classify
from proxy.web import bulk, drain, metrics
from proxy.web import headers as hdr
from proxy.web.access import authorize
from proxy.web.accounting import FHIR_ROUTE, account
from proxy.web.call import call_of
from proxy.web.discovery import smart_configuration_handler
from proxy.web.forward import forward
from proxy.web.keyrefresh import refresh_keys_ctx
from proxy.web.paging import PAGE, open_page_link
from proxy.web.patientkeys import PatientKeyService
from proxy.web.prepare import guard_query, prepare_request
from proxy.web.readiness import READINESS, Readiness, readiness
from proxy.web.runtime import RUNTIME, Runtime
from proxy.web.tls import upstream_context
from proxy.web.upstream import (
    client_for,
    upstream_problem,
)

log = logging.getLogger("fhircrypt")


def _segments(rt: Runtime, request: web.Request) -> list[str]:
    """Path segments below the proxy's FHIR base; refuses encoded or relative tricks."""
    raw = request.raw_path.split("?", 1)[0]
    if "%" in raw or "\\" in raw or "//" in raw or ";" in raw:
        raise FhirError(400, "invalid", "the URL path contains encoded, empty or parameter segments")
    base = URL(rt.public_base).path.rstrip("/")
    if raw != base and not raw.startswith(base + "/"):
        raise FhirError(404, "not-found", "not a FHIR endpoint of this proxy")
    segments = [s for s in raw[len(base) :].split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise FhirError(400, "invalid", "the URL path contains relative segments")
    return segments


async def handle(request: web.Request) -> web.StreamResponse:
    """One FHIR request: classify → authenticate and decide → transform the request → forward →
    transform the answer. Refusals, the audit record, metrics and the log line are the accounting
    middleware's (``proxy.web.accounting``); what each step does lives in its own module."""
    call = call_of(request)
    rt = call.rt
    call.segments = segments = _segments(rt, request)
    link = len(segments) == 3 and segments[0] == bulk.LINKS
    page = link and segments[1] == PAGE
    if page:  # the next page of a search: decided again for the type searched, for the same caller only
        minted_for, it, call.upstream_url, call.page_names = open_page_link(rt, segments[2])
    else:
        it = bulk.EXPORT if link else classify(request.method, segments, bool(request.query_string))
    call.it = it
    call.decision = await authorize(rt, request, it, call.request_id, call.exchange)
    if rt.settings.audit_mode == "fail-closed" and not all(sink.available for sink in rt.audit):
        raise FhirError(
            503,
            "transient",
            "the audit trail is unavailable: requests are refused until it recovers",
            headers={"Retry-After": "5"},
        )
    if page:
        caller = call.exchange.caller
        if request.method != "GET" or (rt.verifier is not None and (caller is None or caller.subject != minted_for)):
            raise FhirError(404, "not-found", "unknown or expired paging link")  # another caller's: not revealed
        call.forwarding = guard.Forwarding()
        return await forward(call)
    if link:
        return await bulk.follow(rt, request, segments[1], segments[2], call.decision, call.request_id, call.exchange)
    params = guard.parse_query(request.raw_path.split("?", 1)[1] if "?" in request.raw_path else "")
    if it.kind == "operation" and it.operation == "export":
        return await bulk.kickoff(rt, request, segments, params, call.decision, call.request_id, call.exchange)
    guard_query(call, params)
    await prepare_request(call)
    return await forward(call)


async def health(request: web.Request) -> web.Response:
    """The process answers: liveness only (a restart would not fix a missing upstream)."""
    return web.json_response({"status": "ok"})


def apply_reload(app: web.Application, policy: CompiledPolicy) -> None:
    """Swap in a newly compiled policy, the identities file and a new upstream pool (with the TLS files
    as they are now). Requests already running keep the runtime they started with."""
    rt = app[RUNTIME]
    identities = CertificateIdentities.load(rt.settings.client_identities) if rt.settings.client_identities else None
    if rt.client is not None:
        rt.client.reload(upstream_context(rt.settings))
    rt.policy, rt.identities = policy, identities


def _add_probes(app: web.Application, with_metrics: bool) -> None:
    app.router.add_get("/healthz", health)
    app.router.add_get("/readyz", readiness)
    if with_metrics:
        app.router.add_get("/metrics", metrics.metrics_handler)


def ops_app(app: web.Application) -> web.Application:
    """Probes and metrics on their own plain-HTTP port (``ops_listen``): kubelets and Prometheus need no
    client certificate, and FHIR clients cannot read operational data off the FHIR port."""
    ops = web.Application()
    ops.on_response_prepare.append(hdr.name_the_server)
    ops[RUNTIME], ops[READINESS] = app[RUNTIME], app[READINESS]
    _add_probes(ops, app[RUNTIME].settings.metrics)
    return ops


def default_public_base(settings: Settings) -> str:
    scheme = "https" if settings.tls_cert else "http"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{scheme}://{host}:{settings.port}{URL(settings.upstream).path.rstrip('/')}"


def _audit_poster(settings: Settings, client, outside, on_upstream_origin: bool) -> FhirAuditPoster | None:
    """The FHIR audit destination: on the upstream's origin through the upstream client (its credential),
    elsewhere through its own session with ``audit_fhir_token``."""
    if not settings.audit_fhir:
        return None
    if on_upstream_origin:
        return FhirAuditPoster(client.request, settings.audit_fhir)
    auth = {"Authorization": f"Bearer {settings.audit_fhir_token}"} if settings.audit_fhir_token else None
    return FhirAuditPoster(outside.request, settings.audit_fhir, headers=auth)


def create_app(settings: Settings, policy: CompiledPolicy, keys: Keyring | KeyCache) -> web.Application:
    """``keys``: a :class:`KeyCache` (re-verified in the background) or a fixed :class:`Keyring`."""
    rt = Runtime(
        settings,
        policy,
        keys if isinstance(keys, KeyCache) else KeyCache.of(keys),
        URL(settings.upstream),
        (settings.public_base or default_public_base(settings)).rstrip("/"),
    )
    if settings.patient_key_store:
        cache = PatientKeyCache(settings.patient_key_cache, settings.patient_key_ttl)
        rt.patient_keys = PatientKeyService(open_store(settings.patient_key_store), lambda: rt.keyring, cache)
    elif policy.per_patient_keys:
        raise ValueError("the policy sets keys.per_patient: configure a patient key store (--patient-key-store)")
    problem = upstream_problem(settings)
    if problem:
        raise ValueError(problem)
    rt.client = client_for(settings)
    audit_upstream = settings.audit_fhir is not None and rt.client.owns(settings.audit_fhir)
    app = web.Application(client_max_size=settings.max_body, middlewares=[drain.track, account])
    app.on_response_prepare.append(hdr.name_the_server)
    app[drain.IN_FLIGHT] = set()
    app[RUNTIME] = rt
    app[READINESS] = Readiness()
    if settings.auth == "jwt":
        if not settings.audience:
            raise ValueError("--auth jwt needs --audience")
        if settings.introspection_url:
            rt.introspector = Introspector(
                settings.introspection_url,
                settings.introspection_client_id or "",
                settings.introspection_secret or "",
                settings.audience,
                leeway=settings.clock_skew,
            )
        rt.verifier = JwtVerifier(
            JwtSettings(
                audience=settings.audience,
                issuer=settings.token_issuer,
                oidc_issuer=settings.oidc_issuer,
                jwks_url=settings.jwks_url,
                leeway=settings.clock_skew,
            )
        )

    if settings.client_identities:
        rt.identities = CertificateIdentities.load(settings.client_identities)

    async def session_ctx(app: web.Application):
        assert rt.client is not None
        rt.client.open()
        # system CAs for the identity provider and an audit server that is not the upstream
        outside = aiohttp.ClientSession() if rt.verifier or (settings.audit_fhir and not audit_upstream) else None
        trail = AuditTrail(settings.audit_trail).open() if settings.audit_trail else None
        try:
            if rt.verifier and outside:
                await rt.verifier.start(outside)  # no keys, no start: the proxy fails closed
                if rt.introspector:
                    rt.introspector.start(outside)
            poster = _audit_poster(settings, rt.client, outside, audit_upstream)
            targets = [t for t in (trail, poster) if t]
            for target in targets:
                sink = AsyncAuditSink(target, max_backlog=settings.audit_max_backlog, mode=settings.audit_mode)
                await sink.start()
                rt.audit.append(sink)
            yield
        finally:
            for sink in rt.audit:
                await sink.close()
            if trail is not None:
                trail.close()
            await rt.client.close()
            if outside:
                await outside.close()
            if rt.patient_keys is not None:
                rt.patient_keys.store.close()

    app.cleanup_ctx.append(session_ctx)
    app.cleanup_ctx.append(refresh_keys_ctx)
    _add_probes(app, settings.metrics and settings.ops_port is None)
    base_path = URL(rt.public_base).path.rstrip("/")
    app.router.add_get(base_path + "/.well-known/smart-configuration", smart_configuration_handler)
    app.router.add_route("*", "/{tail:.*}", handle, name=FHIR_ROUTE)
    return app
