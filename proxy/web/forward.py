"""Forward a prepared request through the one upstream client, and hand the answer to the path that
transforms it for the caller (``proxy.web.answers``).

An answer the policy does not act on goes out as the upstream's own bytes (``_as_sent``); one up to
``stream_threshold`` bytes is read and transformed whole (``answers.answer_whole``, the faster path);
a larger search page, history or ``$everything`` answer is transformed entry by entry while it
arrives (``proxy.web.pagestream``), so memory holds one entry, not the page; any other larger answer
is read whole up to ``max_response``.
"""

from __future__ import annotations

import logging
import time

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.outcome import FhirError
from proxy.transform import guard
from proxy.transform.bodies import untouched
from proxy.web import headers as hdr
from proxy.web import metrics, pagestream
from proxy.web.answers import answer_whole, name_query, to_public
from proxy.web.auditing import audited_references, reference_of
from proxy.web.call import Call
from proxy.web.paging import has_page_links
from proxy.web.patientkeys import names_patient_key
from proxy.web.runtime import Runtime
from proxy.web.upstream import has_foreign_links, leads_elsewhere, untouched_view, upstream_resource

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


async def forward(call: Call) -> web.StreamResponse:
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
            head, whole = await rt.client.read_head(resp, rt.settings.stream_threshold)
            exchange.upstream_seconds = time.perf_counter() - sent
            status, up_headers = resp.status, resp.headers
            ctype = hdr.media_type(resp.headers.get("Content-Type"))
            out_headers = _client_headers(call, up_headers)
            raw: bytes | None = head
            if not whole:  # larger than the stream threshold: a search page is answered while it arrives
                streamed = await pagestream.answer(call, forwarding, resp, head, status, ctype, out_headers)
                if streamed is not None:
                    return streamed
                raw = await rt.client.read(resp, head)
                exchange.upstream_seconds = time.perf_counter() - sent
    finally:
        metrics.UPSTREAM_LATENCY.labels(it.label()).observe(exchange.upstream_seconds)
    if raw is None:
        raise FhirError(502, "too-costly", "the upstream response exceeds the proxy's response size limit")
    if not raw:
        return web.Response(status=status, headers=out_headers)
    if ctype not in hdr.JSON_TYPES:
        raise FhirError(502, "not-supported", "the upstream answered with a body that is not FHIR JSON")
    try:
        as_sent = _as_sent(call, forwarding, raw, status, out_headers)
        return as_sent or await answer_whole(
            call, forwarding, upstream_resource(raw), status, out_headers, names_patient_key(raw)
        )
    except (RecursionError, orjson.JSONEncodeError):  # nesting no FHIR resource has; costs nothing when absent
        raise FhirError(502, "structure", "the upstream answered with JSON nested too deeply") from None


def _client_headers(call: Call, up_headers) -> CIMultiDict[str]:
    """The upstream's headers the client may see, in the proxy's base; a resource the answer names only
    in a header (a create answered ``Prefer: return=minimal``) is noted for the audit."""
    location = reference_of(up_headers.get("Location") or up_headers.get("Content-Location"))
    if location is not None:
        call.exchange.targets.append(location)
    out_headers = hdr.client_response_headers(up_headers, _rewrite_urls(call.rt))
    out_headers["X-Request-ID"] = call.request_id
    return out_headers


def _as_sent(call: Call, forwarding: guard.Forwarding, raw: bytes, status: int, out_headers) -> web.Response | None:
    """The upstream's own bytes, its URLs rewritten to the proxy's base, when the answer needs nothing else
    from the proxy (None otherwise): nothing in it the policy acts on (``bodies.untouched``), nothing the
    proxy took over (a subset, a Binary's content, the capability statement), no canary to watch, no name
    filter to apply, no page link to sign or foreign link to drop, and nothing the access decision removes.
    It is still judged and audited, on its outline or a plain parse (``upstream.untouched_view``), and the
    bytes that go out are the bytes that were judged."""
    rt, it = call.rt, call.interaction
    if (
        it.kind == "capabilities"
        or forwarding.subset is not None
        or forwarding.raw_binary
        or rt.policy.canaries
        or name_query(call) is not None  # a chained name search: its matches are checked after decryption
        or not untouched(raw, rt.policy)
    ):
        return None
    view = untouched_view(raw, call.decided)
    if call.decided.screen(view, it) or has_foreign_links(view, rt.upstream_base) or has_page_links(rt, view):
        return None  # the parsing path judges a fresh parse again and changes what it must
    call.exchange.references = audited_references(rt.audit, view)
    out = to_public(rt, raw)
    return web.Response(status=status, body=out, headers=out_headers, content_type=hdr.FHIR_JSON, charset="utf-8")
