"""The aiohttp application: classify, check, encrypt, forward, decrypt, answer.

This module only moves bytes and headers; every decision about FHIR content is made
by the pure core in ``proxy.transform``.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import time
import traceback
import uuid

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from proxy.audit.poster import FhirAuditPoster
from proxy.audit.trail import AsyncAuditSink, AuditTrail
from proxy.auth.tokens import Introspector, JwtSettings, JwtVerifier
from proxy.crypto.keyring import Keyring
from proxy.outcome import FhirError
from proxy.policy.compiler import CompiledPolicy
from proxy.settings import Settings
from proxy.transform import guard, subset
from proxy.transform.bodies import MAX_DEPTH, GrantsFor, decrypt_body, too_deep
from proxy.transform.interactions import Interaction, classify
from proxy.transform.markers import CANONICAL, CIPHERTEXT_URL, ENVELOPE_URL
from proxy.transform.records import scrub_markers
from proxy.transform.search import Searcher
from proxy.web import headers as hdr
from proxy.web.access import alarm, authorize, watch_canaries
from proxy.web.auditing import Exchange, record, references_in
from proxy.web.requests import PatchOps, prepare_body
from proxy.web.runtime import RUNTIME, Runtime
from proxy.web.writes import apply_patch, check_scope, prepare_write

log = logging.getLogger("fhircrypt")
_CANONICAL_BYTES = CANONICAL.encode()
_CIPHERTEXT_BYTES = CIPHERTEXT_URL.encode()
_ENVELOPE_BYTES = ENVELOPE_URL.encode()


def _respond_error(err: FhirError, request_id: str) -> web.Response:
    headers = {"X-Request-ID": request_id, **err.headers}
    return web.Response(
        status=err.status,
        body=orjson.dumps(err.outcome()),
        headers=headers,
        content_type=hdr.FHIR_JSON,
        charset="utf-8",
    )


async def read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole stream, or None as soon as it exceeds ``limit`` bytes."""
    chunks, total = [], 0
    async for chunk in stream.iter_chunked(1 << 16):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


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

    def rewrite(value: str) -> str:
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
    grants_for: GrantsFor | None,
    exchange: Exchange,
) -> web.Response:
    assert rt.session is not None
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
    try:
        async with rt.session.request(
            forwarding.method or request.method,
            URL(url, encoded=True),
            data=body,
            headers=headers,
            allow_redirects=False,
        ) as resp:
            raw = await read_limited(resp.content, rt.settings.max_response)
            status, up_headers = resp.status, resp.headers
            ctype = hdr.media_type(resp.headers.get("Content-Type"))
    except TimeoutError:
        raise FhirError(504, "timeout", "the upstream FHIR server did not answer in time") from None
    except aiohttp.ClientError:
        raise FhirError(502, "transient", "the upstream FHIR server cannot be reached") from None
    if raw is None:
        raise FhirError(502, "too-costly", "the upstream response exceeds the proxy's response size limit")
    rewrite = _rewrite_urls(rt)
    out_headers = hdr.client_response_headers(up_headers, rewrite)
    out_headers["X-Request-ID"] = request_id
    if not raw:
        return web.Response(status=status, headers=out_headers)
    if ctype not in hdr.JSON_TYPES:
        raise FhirError(502, "not-supported", "the upstream answered with a body that is not FHIR JSON")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FhirError(502, "structure", "the upstream answered with invalid JSON") from None
    if type(payload) is not dict or too_deep(payload, MAX_DEPTH + 40):
        raise FhirError(502, "structure", "the upstream answered with JSON that is not a FHIR resource")
    report = exchange.report
    hits: list[str] = []
    decrypt_body(payload, rt.policy, rt.keyring, watch_canaries(rt, grants_for, hits), report)
    exchange.references = references_in(payload)
    if hits:
        alarm(rt, exchange, hits, request_id)
    if forwarding.subset is not None and status < 300:
        subset.apply_to_body(payload, forwarding.subset)
    out = orjson.dumps(payload)
    if _CIPHERTEXT_BYTES in out or _ENVELOPE_BYTES in out:
        report.fail(it.label(), f"{scrub_markers(payload)} ciphertext(s) outside the policy's elements removed")
        out = orjson.dumps(payload)
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
    return web.Response(status=status, body=out, headers=out_headers, content_type=hdr.FHIR_JSON, charset="utf-8")


async def handle(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    request_id = hdr.safe_request_id(request.headers.get("X-Request-ID")) or uuid.uuid4().hex
    started = time.perf_counter()
    it: Interaction | None = None
    status = 500
    exchange = Exchange()
    try:
        segments = _segments(rt, request)
        it = classify(request.method, segments, bool(request.query_string))
        grants_for = await authorize(rt, request, it, request_id, exchange)
        if rt.settings.audit_mode == "fail-closed" and not all(sink.available for sink in rt.audit):
            raise FhirError(
                503,
                "transient",
                "the audit trail is unavailable: requests are refused until it recovers",
                headers={"Retry-After": "5"},
            )
        params = guard.parse_query(request.raw_path.split("?", 1)[1] if "?" in request.raw_path else "")
        searchable = None if rt.verifier is None else exchange.grants.groups if exchange.grants else frozenset()
        searcher = Searcher(rt.policy.resources, rt.keyring.indexer, searchable)
        forwarding = guard.check_request(it, params, request.headers, searcher)
        if not hdr.accepts_json(request.headers.get("Accept")) and not any(k == "_format" for k, _ in params):
            raise FhirError(406, "not-supported", "only FHIR JSON responses are supported (Accept)")
        body = None
        if it.kind == "delete" and rt.verifier is not None and it.resource_type in rt.policy.resources:
            await check_scope(rt, it, exchange.grants, "delete", None, request_id, request.headers.get("Authorization"))
        if request.method in ("POST", "PUT", "PATCH"):
            prepared = prepare_body(rt, it, request, await _read_body(request, rt.settings.max_body), searcher)
            if isinstance(prepared, PatchOps):
                body, extra = await apply_patch(
                    rt,
                    it,
                    prepared.ops,
                    grants_for,
                    exchange.grants,
                    rt.verifier is not None,
                    request.headers,
                    request_id,
                )
                forwarding = dataclasses.replace(forwarding, if_match=extra.get("If-Match"), method="PUT")
            elif isinstance(prepared, dict):
                body, extra = await prepare_write(
                    rt,
                    it,
                    prepared,
                    exchange.grants,
                    rt.verifier is not None,
                    request.headers,
                    request_id,
                )
                forwarding = dataclasses.replace(forwarding, if_match=extra.get("If-Match"))
            else:
                body = prepared
        elif request.can_read_body:
            raise FhirError(400, "invalid", f"{request.method} requests carry no body")
        response = await _forward(rt, request, it, segments, body, request_id, forwarding, grants_for, exchange)
        status = response.status
        return response
    except FhirError as err:
        status = err.status
        if err.status >= 400:
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
        log.info(
            "request",
            extra={
                "event": "request",
                "request_id": request_id,
                "method": request.method,
                "interaction": it.label() if it else None,
                "resource_type": it.resource_type if it else None,
                "status": status,
                "ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _client_ssl(settings: Settings) -> ssl.SSLContext | None:
    if not settings.upstream.startswith("https://"):
        return None
    ctx = ssl.create_default_context(cafile=settings.upstream_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_ssl(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx


def default_public_base(settings: Settings) -> str:
    scheme = "https" if settings.tls_cert else "http"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{scheme}://{host}:{settings.port}{URL(settings.upstream).path.rstrip('/')}"


def create_app(settings: Settings, policy: CompiledPolicy, keyring: Keyring) -> web.Application:
    rt = Runtime(
        settings,
        policy,
        keyring,
        URL(settings.upstream),
        (settings.public_base or default_public_base(settings)).rstrip("/"),
    )
    app = web.Application(client_max_size=settings.max_body)
    app[RUNTIME] = rt
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

    async def session_ctx(app: web.Application):
        timeout = aiohttp.ClientTimeout(total=settings.upstream_timeout, connect=settings.connect_timeout)
        connector = aiohttp.TCPConnector(limit=settings.upstream_connections, ssl=_client_ssl(settings) or True)
        rt.session = aiohttp.ClientSession(
            timeout=timeout, connector=connector, auto_decompress=True, skip_auto_headers=("Accept-Encoding",)
        )
        # system CAs for the identity provider and the audit server: neither is the upstream
        outside = aiohttp.ClientSession() if rt.verifier or settings.audit_fhir else None
        trail = AuditTrail(settings.audit_trail).open() if settings.audit_trail else None
        try:
            if rt.verifier and outside:
                await rt.verifier.start(outside)  # no keys, no start: the proxy fails closed
                if rt.introspector:
                    rt.introspector.start(outside)
            auth = {"Authorization": f"Bearer {settings.audit_fhir_token}"} if settings.audit_fhir_token else None
            poster = FhirAuditPoster(outside, settings.audit_fhir, headers=auth) if settings.audit_fhir else None
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
            await rt.session.close()
            if outside:
                await outside.close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/healthz", health)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
