"""Bulk Data export through the proxy: kick-off, status polling and NDJSON files streamed and decrypted.

The upstream chooses the status and file URLs. The client gets signed proxy links instead
(``[base]/$fhircrypt-link/<kind>/<token>``, see ``proxy.crypto.urlsign``), so every poll and
every file goes through the proxy, which follows only links it minted, and only to the
upstream's own origin (the upstream client refuses any other: a hostile upstream cannot send
the proxy elsewhere). Every answer, files and relayed errors alike, is decrypted for the caller's
grants and no further. Files are decrypted line by line while they stream.
"""

from __future__ import annotations

import logging

import aiohttp
import orjson
from aiohttp import web

from proxy.auth.decision import Decision
from proxy.outcome import FhirError
from proxy.transform import bulk, jsonnum
from proxy.transform.bodies import decrypt_body, serialise_for_client, untouched
from proxy.transform.interactions import Interaction
from proxy.transform.outline import outlines
from proxy.web import headers as hdr
from proxy.web.access import alarm, watch_canaries
from proxy.web.auditing import MAX_REFERENCES, Exchange, audited_references
from proxy.web.patientkeys import names_patient_key
from proxy.web.runtime import Runtime
from proxy.web.upstream import drop_foreign_links, untouched_view, upstream_resource

log = logging.getLogger("fhircrypt")
LINKS = "$fhircrypt-link"
EXPORT = Interaction("operation", "system", operation="export")
_STATUS, _FILE, _OPEN = "status", "file", "open"  # open: a pre-signed file, fetched without the token
NDJSON = "application/fhir+ndjson"


class StreamAborted(Exception):
    """A file failed after its first bytes were sent: the connection is cut, never finished cleanly."""


def _link(rt: Runtime, kind: str, url: str) -> str:
    """A signed proxy link to ``url``, which must be on the upstream's origin (else 502, nothing minted)."""
    assert rt.client is not None
    url = str(rt.client.resolve(url))
    return f"{rt.public_base}/{LINKS}/{kind}/{rt.keyring.link_signer.sign(f'{kind} {url}')}"


def _target(rt: Runtime, kind: str, token: str) -> str:
    signed = rt.keyring.link_signer.open(token)
    if signed is None or not signed.startswith(kind + " "):
        raise FhirError(404, "not-found", "unknown or expired export link")
    return signed[len(kind) + 1 :]


def _headers(request: web.Request, request_id: str) -> dict[str, str]:
    return dict(
        hdr.upstream_request_headers(request.headers, request_id, request.remote, request.scheme, request.host, False)
    )


def _relay(
    rt: Runtime, status: int, raw: bytes, out_headers, decision: Decision, exchange: Exchange, request_id: str
) -> web.Response:
    """An upstream answer that is not a manifest or a file (an OperationOutcome, or whatever a hostile
    upstream sends): decrypted for the caller's grants like any body, never beyond them."""
    if not raw:
        return web.Response(status=status, headers=out_headers)
    try:
        payload = jsonnum.loads(raw)
    except orjson.JSONDecodeError:
        payload = None
    if type(payload) is not dict:
        raise FhirError(502, "structure", f"the upstream answered the export request with {status} and no FHIR JSON")
    hits: list[str] = []
    decision.screen(payload, EXPORT)
    decrypt_body(payload, rt.policy, rt.read_keys, watch_canaries(rt, decision, hits), exchange.report)
    if len(exchange.references) < MAX_REFERENCES:
        exchange.references.extend(audited_references(rt.audit, payload))
    if hits:
        alarm(rt, exchange, hits, request_id)
    drop_foreign_links(payload, rt.upstream_base)  # and links into the upstream's base lead to the proxy:
    body = serialise_for_client(payload, exchange.report, "export")
    body = body.replace(rt.upstream_base.encode(), rt.public_base.encode())
    return web.Response(status=status, body=body, headers=out_headers, content_type=hdr.FHIR_JSON, charset="utf-8")


async def kickoff(
    rt: Runtime,
    request: web.Request,
    segments: list[str],
    params,
    decision: Decision,
    request_id: str,
    exchange: Exchange,
) -> web.Response:
    """``$export`` at system, Patient or Group level; the status URL comes back as a proxy link."""
    if request.method != "GET":
        raise FhirError(501, "not-supported", "$export: only the GET kick-off is supported", ["$export"])
    bulk.check_kickoff(params)
    if "respond-async" not in request.headers.get("Prefer", ""):
        raise FhirError(400, "invalid", "$export needs the header Prefer: respond-async", ["Prefer"])
    url = rt.upstream_base + "/" + "/".join(segments)
    if "?" in request.raw_path:
        exchange.forwarded_query = request.raw_path.split("?", 1)[1]
        url += "?" + exchange.forwarded_query
    assert rt.client is not None
    async with rt.client.request(
        "GET", url, headers=_headers(request, request_id), caller_authorization=request.headers.get("Authorization")
    ) as resp:
        raw = await rt.client.read(resp) or b""
        status, location = resp.status, resp.headers.get("Content-Location")
        out_headers = {"X-Request-ID": request_id}
    if status != 202:
        return _relay(rt, status, raw, out_headers, decision, exchange, request_id)
    if not location:
        raise FhirError(502, "structure", "the upstream accepted the export without a status URL")
    out_headers["Content-Location"] = _link(rt, _STATUS, location)
    return web.Response(status=202, headers=out_headers)


async def follow(
    rt: Runtime,
    request: web.Request,
    kind: str,
    token: str,
    decision: Decision,
    request_id: str,
    exchange: Exchange,
) -> web.StreamResponse:
    """A proxy link: poll or cancel an export, or download one of its files."""
    if kind == _STATUS:
        if request.method not in ("GET", "DELETE"):
            raise FhirError(405, "not-supported", f"{request.method} is not allowed on an export status link")
        return await _status(rt, request, _target(rt, kind, token), decision, request_id, exchange)
    if kind in (_FILE, _OPEN):
        if request.method != "GET":
            raise FhirError(405, "not-supported", f"{request.method} is not allowed on an export file link")
        url = _target(rt, kind, token)
        return await _file(rt, request, url, kind == _FILE, decision, request_id, exchange)
    raise FhirError(404, "not-found", "unknown or expired export link")


async def _status(rt: Runtime, request: web.Request, url: str, decision: Decision, request_id: str, exchange: Exchange):
    assert rt.client is not None
    headers = _headers(request, request_id) | {"Accept": "application/json"}
    async with rt.client.request(
        request.method, url, headers=headers, caller_authorization=request.headers.get("Authorization")
    ) as resp:
        raw = await rt.client.read(resp)
        status, up_headers = resp.status, resp.headers
    if raw is None:
        raise FhirError(502, "too-costly", "the upstream's export manifest exceeds the response size limit")
    out_headers = hdr.client_response_headers(up_headers, lambda value: value)
    out_headers.popall("Content-Location", None)
    out_headers.popall("Location", None)
    out_headers["X-Request-ID"] = request_id
    if status != 200 or request.method != "GET":
        return _relay(rt, status, raw, out_headers, decision, exchange, request_id)
    try:
        manifest = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FhirError(502, "structure", "the upstream's export manifest is not JSON") from None

    def link(file_url: str, with_token: bool) -> str:
        return _link(rt, _FILE if with_token else _OPEN, file_url)

    bulk.rewrite_manifest(manifest, link, rt.policy.bulk_presigned)
    if type(manifest.get("request")) is str and manifest["request"].startswith(rt.upstream_base):
        manifest["request"] = rt.public_base + manifest["request"][len(rt.upstream_base) :]
    return web.Response(status=200, body=orjson.dumps(manifest), headers=out_headers, content_type="application/json")


async def _file(
    rt: Runtime,
    request: web.Request,
    url: str,
    with_token: bool,
    decision: Decision,
    request_id: str,
    exchange: Exchange,
) -> web.StreamResponse:
    """Stream one NDJSON file, each line decrypted for the caller; memory holds one chunk and one line.
    A pre-signed file (``with_token`` False) is fetched with no credential at all."""
    assert rt.client is not None
    headers = _headers(request, request_id) | {"Accept": f"{NDJSON}, application/ndjson"}
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=rt.settings.connect_timeout, sock_read=rt.settings.upstream_timeout
    )
    hits: list[str] = []
    watched = watch_canaries(rt, decision, hits)
    async with rt.client.request(
        "GET",
        url,
        headers=headers,
        timeout=timeout,
        caller_authorization=request.headers.get("Authorization"),
        with_credentials=with_token,
    ) as resp:
        if resp.status != 200:
            raw = await rt.client.read(resp) or b""
            return _relay(rt, resp.status, raw, {"X-Request-ID": request_id}, decision, exchange, request_id)
        if hdr.media_type(resp.headers.get("Content-Type")) not in bulk.NDJSON_TYPES:
            raise FhirError(502, "not-supported", "the upstream's export file is not NDJSON")
        out = web.StreamResponse(status=200, headers={"X-Request-ID": request_id, "Content-Type": NDJSON})
        await out.prepare(request)
        lines = bulk.LineSplitter(rt.settings.max_body)
        try:
            async for chunk in resp.content.iter_chunked(1 << 16):
                batch = lines.feed(chunk)
                if batch:
                    await out.write(await _decrypt_lines(rt, batch, watched, exchange))
            tail = lines.close()
            if tail:
                await out.write(await _decrypt_lines(rt, tail, watched, exchange))
        except (FhirError, aiohttp.ClientError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, FhirError) else type(exc).__name__
            log.error(
                "export file aborted", extra={"event": "export-aborted", "request_id": request_id, "reason": reason}
            )
            raise StreamAborted(reason) from None
    if exchange.report.failures:
        log.warning(
            "integrity",
            extra={"event": "integrity-failure", "request_id": request_id, "failures": exchange.report.failures[:20]},
        )
    if hits:
        try:
            alarm(rt, exchange, hits, request_id)
        except FhirError:
            raise StreamAborted("canary") from None  # the caller is blocked: no clean end of file either
    await out.write_eof()
    return out


async def _decrypt_lines(rt: Runtime, lines: list[bytes], decision: Decision, exchange: Exchange) -> bytes:
    """Each line judged for the caller and decrypted; a line holding nothing the policy acts on
    (``bodies.untouched``, and no canary to watch) goes out as it came, judged on its outline."""
    plain = not rt.policy.canaries
    # one look at the whole batch usually answers for every line (a match across a line break only
    # makes it say "no": then each line is looked at on its own), and one call outlines them all
    batch = b"\n".join(lines)
    all_untouched = plain and untouched(batch, rt.policy)
    views = outlines(batch, len(lines)) if all_untouched and not decision.judges_content() else None
    if views is not None:
        pairs = zip(lines, views, strict=True)
        shown = [line.strip(_JSON_SPACE) for line, view in pairs if _shown(rt, view, decision, exchange)]
        return b"\n".join([*shown, b""])
    out, what = [], "an export file line is"
    for line in lines:
        as_sent = all_untouched or (plain and untouched(line, rt.policy))
        resource = untouched_view(line, decision, what) if as_sent else upstream_resource(line, what, jsonnum.loads)
        if not _shown(rt, resource, decision, exchange):
            continue
        if as_sent:
            out.append(line.strip(_JSON_SPACE))
            continue
        if names_patient_key(line):
            await rt.prefetch_patient_keys(resource)
        decrypt_body(resource, rt.policy, rt.read_keys, decision, exchange.report)
        out.append(serialise_for_client(resource, exchange.report, "export file"))
    out.append(b"")
    return b"\n".join(out)


def _shown(rt: Runtime, resource: dict, decision: Decision, exchange: Exchange) -> bool:
    """Whether the caller may see an export file's resource; if so, it is noted for the audit."""
    if not decision.visible(resource):
        return False
    if len(exchange.references) < MAX_REFERENCES:
        exchange.references.extend(audited_references(rt.audit, resource))
    return True


_JSON_SPACE = b" \t\r\n"
