"""What the proxy does to an upstream answer before the caller sees it, read whole or streamed.

An answer is judged by the request's access decision before anything is decrypted (resources the
caller may not see are removed or refused), decrypted or masked resource by resource, the matches of a
chained name search checked against their decrypted names (``proxy.transform.namefilter``), stripped of
the proxy's artefacts and of links that lead away from the upstream, and rewritten to the proxy's
own base. :func:`judge` does all of it on a parsed body; a small answer is judged whole
(:func:`answer_whole`), a large search page in parts (``proxy.web.pagestream``: its top-level members,
then its entries a batch at a time inside a Bundle shell), through this same function, so the two
paths cannot drift apart.
"""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.transform import guard, subset
from proxy.transform.bodies import decrypt_body, serialise_for_client
from proxy.transform.namechain import CHAIN
from proxy.transform.namefilter import READS, NameQuery
from proxy.transform.search import Searcher
from proxy.web import headers as hdr
from proxy.web import metrics
from proxy.web.access import alarm, watch_canaries
from proxy.web.auditing import MAX_REFERENCES, audited_references
from proxy.web.binaries import binary_content
from proxy.web.call import Call
from proxy.web.discovery import secure_capabilities
from proxy.web.paging import PAGED, sign_page_links
from proxy.web.runtime import Runtime
from proxy.web.upstream import drop_foreign_links

log = logging.getLogger("fhircrypt")


def total_waits(bundle: dict, call: Call) -> bool:
    """Whether a Bundle's ``total`` is written after its entries: a searchset or history whose entries the
    decision may screen, or the name filter may remove, loses its ``total`` when it loses an entry (it would
    count what the caller may not see, or what did not match), which a streamed answer knows only after its
    last entry. Both paths write it there, so a page reads the same whichever path it took (JSON member
    order carries no meaning in FHIR)."""
    return bundle.get("type") in PAGED and not (call.decided.hides_nothing() and name_query(call) is None)


def name_query(call: Call) -> NameQuery | None:
    """The post-filter of a search with chained name values (``proxy.transform.namefilter``), None for any
    other request. Its values are those recorded when the query was rewritten; a next page has only the
    chained parameters its signed link names, which are checked again for this caller (recording them)."""
    it = call.interaction
    if it.kind != "search" or it.resource_type is None:
        return None
    if call.searcher is None and call.upstream_url is not None:
        rt = call.rt
        call.searcher = Searcher(rt.policy.resources, rt.keyring.indexer, call.decided.searchable, rt.policy.sentinel)
        guard.check_search(it.resource_type, _page_names(call), call.searcher, "paging link")
    return call.searcher.chained.query(it.resource_type) if call.searcher is not None else None


def _page_names(call: Call) -> list[tuple[str, str]]:
    """The chained name parameters of the search a page continues: as its link names them (for a link minted
    before links named them: the name parameters of its upstream URL)."""
    assert call.upstream_url is not None
    if call.page_names is not None:
        return call.page_names
    return [(k, v) for k, v in guard.parse_query(call.upstream_url.partition("?")[2]) if k in READS]


def _chained_params(call: Call, forwarding: guard.Forwarding) -> list[tuple[str, str]]:
    """The chained name parameters of this search as they went upstream (chains only), for its paging links."""
    if name_query(call) is None:
        return []
    if call.upstream_url is not None:
        return _page_names(call)
    sent = forwarding.query or []
    return [(k, v) for k, v in sent if k in READS and all(CHAIN.fullmatch(x) for x in v.split(","))]


def _filter_names(call: Call, payload: dict) -> int:
    """The name post-filter on the searchsets of an answer: the answer of a search with chained name values,
    or those a batch or transaction's entries hold for its searches (the answer's entries are in the
    order of the request's); the number of entries removed, also counted for :func:`account_name_filter`."""
    names = name_query(call)
    pages: list[tuple[NameQuery, dict]] = [(names, payload)] if names is not None else []
    entries = payload.get("entry") if payload.get("resourceType") == "Bundle" else None
    for i, entry_names in call.entry_names.items():
        entry = entries[i] if type(entries) is list and i < len(entries) else None
        found = entry.get("resource") if type(entry) is dict else None
        if type(found) is dict and found.get("resourceType") == "Bundle" and found.get("type") == "searchset":
            pages.append((entry_names, found))
    removed = sum(q.filter_page(page, call.rt.keyring.indexer) for q, page in pages)
    if call.searcher is not None:
        call.searcher.chained.removed += removed
    return removed


def account_name_filter(call: Call) -> None:
    """One log line and the metric for the entries the name filter removed from a whole answer (no values)."""
    removed = call.searcher.chained.removed if call.searcher is not None else 0
    if removed:
        metrics.NAME_FILTERED.inc(removed)
        log.warning(
            "name search matches removed",
            extra={
                "event": "name-filter",
                "request_id": call.request_id,
                "resource_type": call.interaction.resource_type,
                "removed": removed,
            },
        )


async def judge(
    call: Call, forwarding: guard.Forwarding, payload: dict, status: int, hits: list[str], patient_keys: bool = True
) -> int:
    """Judge and decrypt ``payload`` for the caller (in place); the number of entries the screen and the name
    filter removed.
    ``hits``: canary resources decrypted (the caller raises the alarm: a stream before it writes them).
    ``patient_keys`` False: the body names no patient key, none is looked up."""
    rt, it, decision, exchange = call.rt, call.interaction, call.decided, call.exchange
    if patient_keys:
        await rt.prefetch_patient_keys(payload)
    if it.kind == "capabilities" and payload.get("resourceType") == "CapabilityStatement":
        secure_capabilities(payload, rt.verifier.openid_configuration if rt.verifier else None, rt.policy)
    removed = decision.screen(payload, it)  # before decryption: only what stays in the clear is judged
    decrypt_body(payload, rt.policy, rt.read_keys, watch_canaries(rt, decision, hits), exchange.report)
    if status < 300:  # before a subset could take the name out
        removed += _filter_names(call, payload)
    if len(exchange.references) < MAX_REFERENCES:
        seen = [*exchange.references, *audited_references(rt.audit, payload)]
        exchange.references = list(dict.fromkeys(seen))[:MAX_REFERENCES]
    drop_foreign_links(payload, rt.upstream_base)
    chained = _chained_params(call, forwarding)
    sign_page_links(rt, payload, exchange.caller.subject if exchange.caller else None, it, chained)
    if forwarding.subset is not None and status < 300:
        subset.apply_to_body(payload, forwarding.subset)
    if payload.get("resourceType") == "Bundle" and "total" in payload and total_waits(payload, call):
        payload["total"] = payload.pop("total")
    return removed


def to_public(rt: Runtime, body: bytes) -> bytes:
    """The upstream's base rewritten to the proxy's own in serialised JSON."""
    return body.replace(rt.upstream_base.encode(), rt.public_base.rstrip("/").encode())


def serialise(call: Call, value: object) -> bytes:
    """JSON for the client of a judged body or part of one (``bodies.serialise_for_client``), in the
    proxy's base."""
    return to_public(call.rt, serialise_for_client(value, call.exchange.report, call.interaction.label()))


def log_integrity(call: Call) -> None:
    """The integrity failures of the answer, by path and reason (never values), for the operator."""
    it = call.interaction
    log.warning(
        "integrity",
        extra={
            "event": "integrity-failure",
            "request_id": call.request_id,
            "interaction": it.label(),
            "resource_type": it.resource_type,
            "failures": call.exchange.report.failures[:20],
        },
    )


async def answer_whole(
    call: Call, forwarding: guard.Forwarding, payload: dict, status: int, out_headers, patient_keys: bool = True
) -> web.Response:
    """Judge and decrypt a whole upstream answer for the caller, apply what the proxy took over, serialise it;
    what was masked, shredded or failed its integrity check is counted in response headers."""
    rt, report = call.rt, call.exchange.report
    hits: list[str] = []
    await judge(call, forwarding, payload, status, hits, patient_keys)
    account_name_filter(call)
    if hits:
        alarm(rt, call.exchange, hits, call.request_id)
    if forwarding.raw_binary and status == 200:
        content_type, data = binary_content(payload, report)
        return web.Response(status=200, body=data, headers=out_headers, content_type=content_type)
    out = serialise(call, payload)
    if report.failures:
        out_headers["X-Fhircrypt-Integrity"] = f"failed; issues={len(report.failures)}"
        log_integrity(call)
    if report.masked:
        out_headers["X-Fhircrypt-Masked"] = str(report.masked)
    if report.shredded:
        out_headers["X-Fhircrypt-Shredded"] = str(report.shredded)
    return web.Response(status=status, body=out, headers=out_headers, content_type=hdr.FHIR_JSON, charset="utf-8")
