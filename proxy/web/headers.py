"""Which headers cross the proxy, in each direction.

Allow-lists, not deny-lists: an unknown request header could carry PHI (a custom
``X-Patient-NIK``), so only headers with a known FHIR or HTTP meaning are forwarded.
Hop-by-hop headers never cross.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import fhirgrammar as fg
from proxy.transform.sentinel import detect

# Authorization is not here: the upstream client sends the proxy's own credential (proxy.upstream.client)
REQUEST_HEADERS = (
    "If-Match",
    "If-None-Match",
    "If-Modified-Since",
    "If-None-Exist",
    "Prefer",
    "Accept-Language",
    "User-Agent",
    "Cache-Control",
    "traceparent",  # W3C trace context: ids only, so a tracing upstream joins the caller's trace
    "tracestate",
)
RESPONSE_HEADERS = (
    "ETag",
    "Last-Modified",
    "Location",
    "Content-Location",
    "Retry-After",
    "WWW-Authenticate",
    "Cache-Control",
    "Expires",
    "Vary",
    "X-Progress",
)
SERVER = "fhircrypt"  # the Server header of every answer: no product versions for an attacker to match
FHIR_JSON = "application/fhir+json"
JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})


def media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def safe_request_id(value: str | None) -> str | None:
    """The client's correlation id, if it is one: short, of id characters, and nothing the PHI sentinel
    recognises. It is logged, audited and sent upstream, so a NIK or a phone number put there by a
    client (or an EMR that uses the patient's number as its correlation id) is replaced by the
    proxy's own id rather than spread."""
    return value if value and fg.REQUEST_ID.match(value) and detect(value) is None else None


def accepts_json(accept: str | None) -> bool:
    if not accept:
        return True
    for part in accept.split(","):
        mt = media_type(part)
        if mt in JSON_TYPES or mt in ("*/*", "application/*"):
            return True
    return False


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    request_id: str,
    forwarded_for: str | None,
    proto: str,
    host: str | None,
    has_body: bool,
) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name in REQUEST_HEADERS:
        for value in incoming.getall(name, ()):
            if detect(value) is None:  # a header is no place for a NIK or a phone number: not passed on
                out.add(name, value)
    out["Accept"] = FHIR_JSON
    if has_body:
        out["Content-Type"] = FHIR_JSON + "; charset=utf-8"
    out["X-Request-ID"] = request_id
    prior = incoming.get("X-Forwarded-For")
    if forwarded_for:
        out["X-Forwarded-For"] = f"{prior}, {forwarded_for}" if prior else forwarded_for
    out["X-Forwarded-Proto"] = proto
    if host:
        out["X-Forwarded-Host"] = host
    return out


def client_response_headers(upstream: CIMultiDictProxy[str], rewrite: Callable[[str], str | None]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name in RESPONSE_HEADERS:
        for value in upstream.getall(name, ()):
            sent = rewrite(value) if name in ("Location", "Content-Location") else value
            if sent is not None:  # None: a location the proxy will not send the client to
                out.add(name, sent)
    return out


async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: aiohttp's default ``Server: Python/3.x aiohttp/3.y`` discloses versions."""
    response.headers["Server"] = SERVER
