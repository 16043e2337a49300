"""Forward a prepared request through the one upstream client, and transform the answer for the caller.

The answer is judged by the request's access decision before anything is decrypted (resources the
caller may not see are removed or refused), decrypted or masked resource by resource, stripped of
the proxy's artefacts and of links that lead away from the upstream, and rewritten to the proxy's
own base.
"""

from __future__ import annotations

import logging
import time

import orjson
from aiohttp import web

from proxy.outcome import FhirError
from proxy.transform import guard, subset
from proxy.transform.bodies import decrypt_body, serialise_for_client, untouched
from proxy.web import headers as hdr
from proxy.web import metrics
from proxy.web.access import alarm, watch_canaries
from proxy.web.auditing import audited_references, reference_of
from proxy.web.binaries import binary_content
from proxy.web.call import Call
from proxy.web.discovery import secure_capabilities
from proxy.web.paging import has_page_links, sign_page_links
from proxy.web.patientkeys import PATIENT_KEY_MARK
from proxy.web.runtime import Runtime
from proxy.web.upstream import drop_foreign_links, has_foreign_links, leads_elsewhere, upstream_resource

log = logging.getLogger("fhircrypt")


def _rewrite_urls(rt: Runtime):
    up, pub = rt.upstream_base, rt.public_base.rstrip("/")

    def rewrite(value: str) -> str | None:
        if leads_elsewhere(value, up):
            return None
        return pub + value[len(up) :] if value.startswith(up) else value

    return rewrite


def _upstream_url(call: Call) -> str:
    """The upstream URL: the rewritten query when the proxy took it over, else the client's as sent."""
    request, forwarding, exchange = call.request, call.forwarding, call.exchange
    if call.upstream_url is not None:  # a page of an earlier search: its link as the proxy signed it
        exchange.forwarded_query = call.upstream_url.partition("?")[2] or None
        return call.upstream_url
    url = call.rt.upstream_base + "/" + "/".join(call.segments)
    if forwarding is not None and forwarding.query is not None:
        if forwarding.query:
            exchange.forwarded_query = guard.encode_query(forwarding.query)
            url += "?" + exchange.forwarded_query
    elif request.query_string:
        exchange.forwarded_query = request.raw_path.split("?", 1)[1]
        url += "?" + exchange.forwarded_query
    return url


async def forward(call: Call) -> web.Response:
    rt, request, it, exchange, forwarding = call.rt, call.request, call.interaction, call.exchange, call.forwarding
    assert rt.client is not None and forwarding is not None
    url = _upstream_url(call)
    headers = hdr.upstream_request_headers(
        request.headers, call.request_id, request.remote, request.scheme, request.host, call.body is not None
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
            method, url, data=call.body, headers=headers, caller_authorization=request.headers.get("Authorization")
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
    out_headers = hdr.client_response_headers(up_headers, _rewrite_urls(rt))
    out_headers["X-Request-ID"] = call.request_id
    if not raw:
        return web.Response(status=status, headers=out_headers)
    if ctype not in hdr.JSON_TYPES:
        raise FhirError(502, "not-supported", "the upstream answered with a body that is not FHIR JSON")
    try:
        as_sent = _as_sent(call, forwarding, raw, status, out_headers)
        return as_sent or await _answer(call, forwarding, upstream_resource(raw), raw, status, out_headers)
    except (RecursionError, orjson.JSONEncodeError):  # nesting no FHIR resource has; costs nothing when absent
        raise FhirError(502, "structure", "the upstream answered with JSON nested too deeply") from None


def _as_sent(call: Call, forwarding: guard.Forwarding, raw: bytes, status: int, out_headers) -> web.Response | None:
    """The upstream's own bytes, its URLs rewritten to the proxy's base, when the answer needs nothing else
    from the proxy (None otherwise): nothing in it the policy acts on (``bodies.untouched``), nothing the
    proxy took over (a subset, a Binary's content, the capability statement), no canary to watch, no page
    link to sign or foreign link to drop, and nothing the access decision removes. It is still parsed, to
    be judged and audited (plain orjson: the parse is not serialised again), and the bytes that go out are
    the bytes that were judged."""
    rt, it = call.rt, call.interaction
    if (
        it.kind == "capabilities"
        or forwarding.subset is not None
        or forwarding.raw_binary
        or rt.policy.canaries
        or not untouched(raw, rt.policy)
    ):
        return None
    view = upstream_resource(raw, parse=orjson.loads)
    if call.decided.screen(view, it) or has_foreign_links(view, rt.upstream_base) or has_page_links(rt, view):
        return None  # the parsing path judges a fresh parse again and changes what it must
    call.exchange.references = audited_references(rt.audit, view)
    out = _to_public(rt, raw)
    return web.Response(status=status, body=out, headers=out_headers, content_type=hdr.FHIR_JSON, charset="utf-8")


def _to_public(rt: Runtime, body: bytes) -> bytes:
    return body.replace(rt.upstream_base.encode(), rt.public_base.rstrip("/").encode())


async def _answer(
    call: Call, forwarding: guard.Forwarding, payload: dict, raw: bytes, status: int, out_headers
) -> web.Response:
    """Judge and decrypt an upstream answer for the caller, apply what the proxy took over, serialise it."""
    rt, it, decision, exchange = call.rt, call.interaction, call.decided, call.exchange
    report = exchange.report
    hits: list[str] = []
    if PATIENT_KEY_MARK in raw:
        await rt.prefetch_patient_keys(payload)
    if it.kind == "capabilities" and payload.get("resourceType") == "CapabilityStatement":
        secure_capabilities(payload, rt.verifier.openid_configuration if rt.verifier else None, rt.policy)
    decision.screen(payload, it)  # before decryption: only what stays in the clear is judged
    decrypt_body(payload, rt.policy, rt.read_keys, watch_canaries(rt, decision, hits), report)
    exchange.references = audited_references(rt.audit, payload)
    if hits:
        alarm(rt, exchange, hits, call.request_id)
    drop_foreign_links(payload, rt.upstream_base)
    sign_page_links(rt, payload, exchange.caller.subject if exchange.caller else None, it)
    if forwarding.subset is not None and status < 300:
        subset.apply_to_body(payload, forwarding.subset)
    if forwarding.raw_binary and status == 200:
        content_type, data = binary_content(payload, report)
        return web.Response(status=200, body=data, headers=out_headers, content_type=content_type)
    out = serialise_for_client(payload, report, it.label())
    out = _to_public(rt, out)
    if report.failures:
        out_headers["X-Fhircrypt-Integrity"] = f"failed; issues={len(report.failures)}"
        log.warning(
            "integrity",
            extra={
                "event": "integrity-failure",
                "request_id": call.request_id,
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
