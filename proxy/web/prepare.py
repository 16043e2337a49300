"""Transform the request before it is forwarded: the query guarded and rewritten to blind indexes, the
access decision's constraint added, and a body checked, judged and encrypted by its kind.

Nothing here decides who may do what: that was decided once (``call.decision``); this step applies it.
"""

from __future__ import annotations

import dataclasses

from aiohttp import web

from proxy.outcome import FhirError
from proxy.transform import guard, jsonnum
from proxy.transform import markers as mk
from proxy.transform.search import Searcher
from proxy.web import headers as hdr
from proxy.web import metrics
from proxy.web.auditing import MAX_REFERENCES
from proxy.web.bundles import deleted_by, prepare_bundle
from proxy.web.call import Call
from proxy.web.requests import PatchOps, prepare_body
from proxy.web.upstream import read_limited
from proxy.web.writes import apply_patch, check_scope, prepare_operation, prepare_write

# what each sealed element leaves in a write's body, counted for the elements metric: its ciphertext
# extension (format v1), or the mask marker where its group's ciphertext holds it (v2)
SEALED_MARKS = {"v1": mk.CIPHERTEXT_URL.encode(), "v2": jsonnum.dumps(mk.dar_masked())[1:-1]}


def guard_query(call: Call, params: list[tuple[str, str]]) -> None:
    """What of the query may go upstream (search values become blind-index tokens), with the caller's
    compartment ANDed to a confined search; 406 for a non-JSON Accept (but Binary reads)."""
    rt, request, it, decision = call.rt, call.request, call.interaction, call.decided
    call.searcher = Searcher(rt.policy.resources, rt.keyring.indexer, decision.searchable, rt.policy.sentinel)
    forwarding = guard.check_request(it, params, request.headers, call.searcher, rt.policy.operations)
    if decision.constraint is not None:
        forwarding = dataclasses.replace(forwarding, query=[*(forwarding.query or ()), decision.constraint])
    if not hdr.accepts_json(request.headers.get("Accept")) and not any(k == "_format" for k, _ in params):
        if it.resource_type != "Binary" or it.kind not in ("read", "vread"):
            raise FhirError(406, "not-supported", "only FHIR JSON responses are supported (Accept)")
        forwarding = dataclasses.replace(forwarding, raw_binary=True)
    call.forwarding = forwarding


async def prepare_request(call: Call) -> None:
    """Judge a delete against what is stored; check, judge and encrypt a body (``call.body``)."""
    rt, request, it = call.rt, call.request, call.interaction
    if it.kind == "delete" and rt.verifier is not None:
        await check_scope(rt, it, call.exchange.grants, "delete", None, call.request_id, _authorization(call))
    if it.kind == "delete" and it.conditional:
        call.exchange.targets.extend(await _matching(call))
    if request.method in ("POST", "PUT", "PATCH"):
        await _prepare_body(call, await _read_body(request, rt.settings.max_body))
    elif request.can_read_body:
        raise FhirError(400, "invalid", f"{request.method} requests carry no body")


async def _prepare_body(call: Call, raw: bytes) -> None:
    rt, it, exchange = call.rt, call.interaction, call.exchange
    assert call.searcher is not None and call.forwarding is not None
    restricted = rt.verifier is not None
    headers, request_id = call.request.headers, call.request_id
    prepared = prepare_body(rt, it, call.request, raw, call.searcher)
    if isinstance(prepared, PatchOps):  # on an encrypted type: executed here, forwarded as a PUT of the result
        patched, extra = await apply_patch(
            rt, it, prepared.ops, call.decided, exchange.grants, restricted, headers, request_id
        )
        call.body = jsonnum.dumps(patched)
        call.forwarding = dataclasses.replace(call.forwarding, if_match=extra.get("If-Match"), method="PUT")
    elif isinstance(prepared, dict) and it.kind == "batch":
        call.entry_names = await prepare_bundle(
            rt, prepared, call.searcher, call.decided, exchange.grants, restricted, headers, request_id
        )
        exchange.targets.extend(deleted_by(prepared))
        call.body = jsonnum.dumps(prepared)
    elif isinstance(prepared, dict) and it.kind == "operation":
        await prepare_operation(rt, it, prepared, exchange.grants, restricted, headers, request_id)
        call.body = jsonnum.dumps(prepared)
    elif isinstance(prepared, dict):
        extra = await prepare_write(rt, it, prepared, exchange.grants, restricted, headers, request_id)
        call.body = jsonnum.dumps(prepared)
        call.forwarding = dataclasses.replace(call.forwarding, if_match=extra.get("If-Match"))
    else:
        call.body = prepared
    rp = rt.policy.resources.get(it.resource_type)  # type: ignore[arg-type]
    if call.body is not None and rp is not None:
        metrics.ELEMENTS.labels("encrypted").inc(call.body.count(SEALED_MARKS[rp.at_rest_format]))


async def _matching(call: Call) -> list[str]:
    """The resources a conditional delete is about to delete, for its audit record (a delete's answer
    names none): the same rewritten criteria, searched first, ids only. Nothing of it reaches the caller."""
    assert call.forwarding is not None and call.rt.client is not None
    it, client = call.interaction, call.rt.client
    query = [*(call.forwarding.query or ()), ("_elements", "id"), ("_count", str(MAX_REFERENCES))]
    url = f"{it.resource_type}?{guard.encode_query(query)}"
    headers = {"Accept": hdr.FHIR_JSON, "X-Request-ID": call.request_id}
    async with client.request("GET", url, headers=headers, caller_authorization=_authorization(call)) as resp:
        raw = await client.read(resp) if resp.status == 200 else None
    try:
        bundle = jsonnum.loads(raw) if raw else {}
    except ValueError:
        bundle = {}
    entries = bundle.get("entry") if type(bundle) is dict else None
    found = (e.get("resource") for e in entries or () if type(e) is dict)
    return [f"{it.resource_type}/{r['id']}" for r in found if type(r) is dict and type(r.get("id")) is str]


def _authorization(call: Call) -> str | None:
    return call.request.headers.get("Authorization")


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
