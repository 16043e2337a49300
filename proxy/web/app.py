"""The aiohttp application: classify, check, encrypt, forward, decrypt, answer.

This module only moves bytes and headers; every decision about FHIR content is made
by the pure core in ``proxy.transform``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import traceback
import uuid

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from proxy.audit.poster import FhirAuditPoster
from proxy.audit.trail import AsyncAuditSink, AuditTrail
from proxy.auth.certificates import CertificateIdentities
from proxy.auth.decision import Decision
from proxy.auth.tokens import Introspector, JwtSettings, JwtVerifier
from proxy.crypto.kek import KeyringError
from proxy.crypto.keycache import KeyCache
from proxy.crypto.keyring import Keyring
from proxy.crypto.patientkeys import PatientKeyCache
from proxy.keystore import open_store
from proxy.logs import REQUEST_ID
from proxy.outcome import FhirError
from proxy.policy.compiler import CompiledPolicy
from proxy.settings import Settings
from proxy.transform import guard, jsonnum, subset
from proxy.transform.bodies import decrypt_body, serialise_for_client
from proxy.transform.interactions import Interaction, classify
from proxy.transform.markers import CIPHERTEXT_URL
from proxy.transform.search import Searcher
from proxy.web import bulk, drain, metrics
from proxy.web import headers as hdr
from proxy.web.access import alarm, authorize, watch_canaries
from proxy.web.auditing import Exchange, record, reference_of, references_in
from proxy.web.binaries import binary_content
from proxy.web.bundles import deleted_by, prepare_bundle
from proxy.web.discovery import secure_capabilities, smart_configuration_handler
from proxy.web.keyrefresh import refresh_keys_ctx
from proxy.web.patientkeys import PATIENT_KEY_MARK, PatientKeyService
from proxy.web.readiness import READINESS, Readiness, readiness
from proxy.web.requests import PatchOps, prepare_body
from proxy.web.runtime import RUNTIME, Runtime
from proxy.web.tls import upstream_context
from proxy.web.upstream import (
    client_for,
    drop_foreign_links,
    leads_elsewhere,
    read_limited,
    upstream_problem,
    upstream_resource,
)
from proxy.web.writes import apply_patch, check_scope, prepare_operation, prepare_write

log = logging.getLogger("fhircrypt")
CUT = 0  # the status logged, counted and audited ('no HTTP outcome') for a request cut before its answer
CIPHERTEXT_BYTES = CIPHERTEXT_URL.encode()


def _respond_error(err: FhirError, request_id: str) -> web.Response:
    headers = {"X-Request-ID": request_id, **err.headers}
    return web.Response(
        status=err.status,
        body=orjson.dumps(err.outcome()),
        headers=headers,
        content_type=hdr.FHIR_JSON,
        charset="utf-8",
    )


async def _read_body(request: web.Request, limit: int) -> bytes:
    too_big = FhirError(413, "too-costly", f"request body exceeds the limit of {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    try:
        body = await read_limited(request.content, limit)
    except (web.RequestPayloadError, ConnectionResetError):  # a broken chunked/compressed body, or a hang-up
        raise FhirError(400, "structure", "the request body is incomplete or its transfer encoding is broken") from None
    if body is None:
        raise too_big
    return body


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


def _rewrite_urls(rt: Runtime):
    up, pub = rt.upstream_base, rt.public_base.rstrip("/")

    def rewrite(value: str) -> str | None:
        if leads_elsewhere(value, up):
            return None
        return pub + value[len(up) :] if value.startswith(up) else value

    return rewrite


async def _forward(
    rt: Runtime,
    request: web.Request,
    it: Interaction,
    segments: list[str],
    body: bytes | None,
    request_id: str,
    forwarding: guard.Forwarding,
    decision: Decision,
    exchange: Exchange,
) -> web.Response:
    assert rt.client is not None
    url = rt.upstream_base + "/" + "/".join(segments)
    if forwarding.query is not None:
        if forwarding.query:
            exchange.forwarded_query = guard.encode_query(forwarding.query)
            url += "?" + exchange.forwarded_query
    elif request.query_string:
        exchange.forwarded_query = request.raw_path.split("?", 1)[1]
        url += "?" + exchange.forwarded_query
    headers = hdr.upstream_request_headers(
        request.headers, request_id, request.remote, request.scheme, request.host, body is not None
    )
    if it.kind == "search" and request.method == "POST":
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if it.kind == "patch" and forwarding.method is None:
        headers["Content-Type"] = "application/json-patch+json"
    if forwarding.if_none_exist is not None:
        headers["If-None-Exist"] = forwarding.if_none_exist
    if forwarding.if_match is not None:
        headers["If-Match"] = forwarding.if_match
    method = forwarding.method or request.method
    sent = time.perf_counter()
    try:
        async with rt.client.request(
            method, url, data=body, headers=headers, caller_authorization=request.headers.get("Authorization")
        ) as resp:
            raw = await rt.client.read(resp)
            status, up_headers = resp.status, resp.headers
            ctype = hdr.media_type(resp.headers.get("Content-Type"))
    finally:
        exchange.upstream_seconds = time.perf_counter() - sent
        metrics.UPSTREAM_LATENCY.labels(it.label()).observe(exchange.upstream_seconds)
    if raw is None:
        raise FhirError(502, "too-costly", "the upstream response exceeds the proxy's response size limit")
    location = reference_of(up_headers.get("Location") or up_headers.get("Content-Location"))
    if location is not None:  # a create or update answered without a body (Prefer: return=minimal)
        exchange.targets.append(location)
    rewrite = _rewrite_urls(rt)
    out_headers = hdr.client_response_headers(up_headers, rewrite)
    out_headers["X-Request-ID"] = request_id
    if not raw:
        return web.Response(status=status, headers=out_headers)
    if ctype not in hdr.JSON_TYPES:
        raise FhirError(502, "not-supported", "the upstream answered with a body that is not FHIR JSON")
    payload = upstream_resource(raw)
    try:
        return await _answer(rt, it, payload, raw, status, out_headers, forwarding, decision, exchange, request_id)
    except (RecursionError, orjson.JSONEncodeError):  # nesting no FHIR resource has; costs nothing when absent
        raise FhirError(502, "structure", "the upstream answered with JSON nested too deeply") from None


async def _answer(
    rt: Runtime,
    it: Interaction,
    payload: dict,
    raw: bytes,
    status: int,
    out_headers,
    forwarding: guard.Forwarding,
    decision: Decision,
    exchange: Exchange,
    request_id: str,
) -> web.Response:
    """Decrypt an upstream answer for the caller, apply what the proxy took over, and serialise it."""
    report = exchange.report
    hits: list[str] = []
    if PATIENT_KEY_MARK in raw:
        await rt.prefetch_patient_keys(payload)
    if it.kind == "capabilities" and rt.verifier is not None and payload.get("resourceType") == "CapabilityStatement":
        secure_capabilities(payload, rt.verifier.openid_configuration)
    decision.screen(payload, it)  # before decryption: only what stays in the clear is judged
    decrypt_body(payload, rt.policy, rt.read_keys, watch_canaries(rt, decision, hits), report)
    exchange.references = references_in(payload)
    if hits:
        alarm(rt, exchange, hits, request_id)
    drop_foreign_links(payload, rt.upstream_base)
    if forwarding.subset is not None and status < 300:
        subset.apply_to_body(payload, forwarding.subset)
    if forwarding.raw_binary and status == 200:
        content_type, data = binary_content(payload, report)
        out_headers["X-Request-ID"] = request_id
        return web.Response(status=200, body=data, headers=out_headers, content_type=content_type)
    out = serialise_for_client(payload, report, it.label())
    out = out.replace(rt.upstream_base.encode(), rt.public_base.rstrip("/").encode())
    if report.failures:
        out_headers["X-Fhircrypt-Integrity"] = f"failed; issues={len(report.failures)}"
        log.warning(
            "integrity",
            extra={
                "event": "integrity-failure",
                "request_id": request_id,
                "interaction": it.label(),
                "resource_type": it.resource_type,
                "failures": report.failures[:20],
            },
        )
    if report.masked:
        out_headers["X-Fhircrypt-Masked"] = str(report.masked)
    if report.shredded:
        out_headers["X-Fhircrypt-Shredded"] = str(report.shredded)
    return web.Response(status=status, body=out, headers=out_headers, content_type=hdr.FHIR_JSON, charset="utf-8")


async def handle(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME].snapshot()
    request_id = hdr.safe_request_id(request.headers.get("X-Request-ID")) or uuid.uuid4().hex
    REQUEST_ID.set(request_id)
    metrics.IN_FLIGHT.inc()
    started = time.perf_counter()
    it: Interaction | None = None
    status = 500
    exchange = Exchange()
    try:
        segments = _segments(rt, request)
        link = segments[0] == bulk.LINKS and len(segments) == 3 if segments else False
        it = bulk.EXPORT if link else classify(request.method, segments, bool(request.query_string))
        decision = await authorize(rt, request, it, request_id, exchange)
        if rt.settings.audit_mode == "fail-closed" and not all(sink.available for sink in rt.audit):
            raise FhirError(
                503,
                "transient",
                "the audit trail is unavailable: requests are refused until it recovers",
                headers={"Retry-After": "5"},
            )
        if link:
            response = await bulk.follow(rt, request, segments[1], segments[2], decision, request_id, exchange)
            status = response.status
            return response
        params = guard.parse_query(request.raw_path.split("?", 1)[1] if "?" in request.raw_path else "")
        if it.kind == "operation" and it.operation == "export":
            response = await bulk.kickoff(rt, request, segments, params, decision, request_id, exchange)
            status = response.status
            return response
        searcher = Searcher(rt.policy.resources, rt.keyring.indexer, decision.searchable)
        forwarding = guard.check_request(it, params, request.headers, searcher, rt.policy.operations)
        if decision.constraint is not None:  # the caller's compartment, ANDed to its search
            forwarding = dataclasses.replace(forwarding, query=[*(forwarding.query or ()), decision.constraint])
        if not hdr.accepts_json(request.headers.get("Accept")) and not any(k == "_format" for k, _ in params):
            if it.resource_type != "Binary" or it.kind not in ("read", "vread"):
                raise FhirError(406, "not-supported", "only FHIR JSON responses are supported (Accept)")
            forwarding = dataclasses.replace(forwarding, raw_binary=True)
        body = None
        if it.kind == "delete" and rt.verifier is not None and it.resource_type in rt.policy.resources:
            await check_scope(rt, it, exchange.grants, "delete", None, request_id, request.headers.get("Authorization"))
        if request.method in ("POST", "PUT", "PATCH"):
            prepared = prepare_body(rt, it, request, await _read_body(request, rt.settings.max_body), searcher)
            if isinstance(prepared, PatchOps):
                patched, extra = await apply_patch(
                    rt,
                    it,
                    prepared.ops,
                    decision,
                    exchange.grants,
                    rt.verifier is not None,
                    request.headers,
                    request_id,
                )
                body = jsonnum.dumps(patched)
                forwarding = dataclasses.replace(forwarding, if_match=extra.get("If-Match"), method="PUT")
            elif isinstance(prepared, dict) and it.kind == "batch":
                await prepare_bundle(
                    rt,
                    prepared,
                    searcher,
                    decision,
                    exchange.grants,
                    rt.verifier is not None,
                    request.headers,
                    request_id,
                )
                exchange.targets.extend(deleted_by(prepared))
                body = jsonnum.dumps(prepared)
            elif isinstance(prepared, dict) and it.kind == "operation":
                await prepare_operation(
                    rt, it, prepared, exchange.grants, rt.verifier is not None, request.headers, request_id
                )
                body = jsonnum.dumps(prepared)
            elif isinstance(prepared, dict):
                extra = await prepare_write(
                    rt,
                    it,
                    prepared,
                    exchange.grants,
                    rt.verifier is not None,
                    request.headers,
                    request_id,
                )
                body = jsonnum.dumps(prepared)
                forwarding = dataclasses.replace(forwarding, if_match=extra.get("If-Match"))
            else:
                body = prepared
            if body is not None and it.resource_type in rt.policy.resources:
                metrics.ELEMENTS.labels("encrypted").inc(body.count(CIPHERTEXT_BYTES))
        elif request.can_read_body:
            raise FhirError(400, "invalid", f"{request.method} requests carry no body")
        response = await _forward(rt, request, it, segments, body, request_id, forwarding, decision, exchange)
        status = response.status
        return response
    except bulk.StreamAborted:
        status = 502
        raise  # the response has started: aiohttp cuts the connection, so the client never sees a clean end
    except asyncio.CancelledError:  # cut (the drain deadline): no answer was sent, so no HTTP status
        status = CUT
        raise
    except FhirError as err:
        status = err.status
        if err.status >= 400:
            metrics.REFUSALS.labels(err.reason).inc()
            log.info(
                "refused",
                extra={
                    "event": "refused",
                    "request_id": request_id,
                    "status": err.status,
                    "reason": err.reason,
                    "interaction": it.label() if it else None,
                },
            )
        return _respond_error(err, request_id)
    except KeyringError as exc:  # keys expired or a master key used up: messages carry no key material
        status = 503
        log.error("keys unavailable", extra={"event": "keys-unavailable", "request_id": request_id, "error": str(exc)})
        return _respond_error(FhirError(503, "transient", str(exc), headers={"Retry-After": "30"}), request_id)
    except Exception as exc:  # never a traceback (or a value inside an exception message) to the client
        log.error(
            "internal error",
            extra={
                "event": "internal-error",
                "request_id": request_id,
                "error": type(exc).__name__,
                "trace": traceback.format_tb(exc.__traceback__),
            },
        )
        return _respond_error(FhirError(500, "exception", "internal error in the proxy"), request_id)
    finally:
        if rt.audit:
            record(
                rt.audit, f"{rt.policy.name}@{rt.policy.digest[:12]}", request_id, it, status, exchange, request.remote
            )
        _measure(rt, it, status, exchange, time.perf_counter() - started)
        log.info(
            "request cut before its answer" if status == CUT else "request",
            extra={
                "event": "request",
                "request_id": request_id,
                "method": request.method,
                "interaction": it.label() if it else None,
                "resource_type": it.resource_type if it else None,
                "status": status,
                **({"cut": "no answer was sent"} if status == CUT else {}),
                "ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )


def _measure(rt: Runtime, it: Interaction | None, status: int, exchange: Exchange, seconds: float) -> None:
    """Metrics of one request: labels are interaction kinds, status codes and counts only."""
    label = it.label() if it else "unclassified"
    metrics.IN_FLIGHT.dec()
    metrics.REQUESTS.labels(label, str(status)).inc()
    metrics.OVERHEAD.labels(label).observe(max(seconds - exchange.upstream_seconds, 0.0))
    report = exchange.report
    if report.decrypted:
        metrics.ELEMENTS.labels("decrypted").inc(report.decrypted)
    if report.masked:
        metrics.ELEMENTS.labels("masked").inc(report.masked)
    if report.failures:
        metrics.INTEGRITY_FAILURES.inc(len(report.failures))
    metrics.AUDIT_BACKLOG.set(sum(sink.backlog for sink in rt.audit))


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
    audit_upstream = bool(settings.audit_fhir) and rt.client.owns(settings.audit_fhir)
    app = web.Application(client_max_size=settings.max_body, middlewares=[drain.track])
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
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
