"""Batch and transaction Bundles: every entry checked, encrypted and authorized like a request of its own.

The pure rewriting of entry URLs and conditional references lives in
``proxy.transform.bundles``; this module adds what needs the upstream: write-scope
checks against stored resources, masked write-back and PATCH entries on encrypted
types, which the proxy executes (read, decrypt, apply, encrypt) and turns into a PUT
with ``ifMatch`` on the version it read, so the transaction fails instead of losing
a concurrent update.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import replace

from proxy.auth.decision import Decision, decide
from proxy.outcome import FhirError
from proxy.policy.access import CallerGrants
from proxy.policy.operations import read_only
from proxy.transform import sentinel
from proxy.transform.bundles import Entry, parse_bundle, rewrite_request
from proxy.transform.namefilter import NameQuery, Recorder
from proxy.transform.search import Searcher
from proxy.transform.search_urls import rewrite_search_urls
from proxy.web.requests import PatchOps, check_target, patch_document
from proxy.web.runtime import Runtime
from proxy.web.writes import apply_patch, check_scope, prepare_write

_JSON_PATCH = "application/json-patch+json"


async def prepare_bundle(
    rt: Runtime,
    bundle: dict,
    searcher: Searcher,
    decision: Decision,
    grants: CallerGrants | None,
    restricted: bool,
    request_headers: Mapping[str, str],
    request_id: str,
) -> dict[int, NameQuery]:
    """Rewrite a batch or transaction Bundle in place so that it carries no plaintext of covered elements;
    returns the post-filters of its searches with chained name values, by entry index (the answer's
    entries are in the same order).

    Each entry is decided like a request of its own (:func:`proxy.auth.decision.decide`): refused
    entries refuse the Bundle, and a confined caller's searches get its compartment added."""
    authorization = request_headers.get("Authorization")
    entries = parse_bundle(bundle)
    name_queries: dict[int, NameQuery] = {}
    names = sentinel.names_of(rt.policy.sentinel, (e.resource for e in entries if e.resource is not None))
    for entry in entries:
        it = entry.interaction
        entry_decision = decision
        if grants is not None and restricted:
            try:
                entry_decision = decide(grants, it, read_only(rt.policy.operations))
            except FhirError as exc:
                raise exc.located(f"{entry.where}.request") from None
        entry_searcher = replace(searcher, searchable=entry_decision.searchable, chained=Recorder())
        rewrite_request(entry, entry_searcher, rt.policy.operations, entry_decision.constraint)
        chained = entry_searcher.chained.query(it.resource_type) if it.kind == "search" else None
        if chained is not None:
            name_queries[entry.index] = chained
        headers = {"Authorization": authorization} if authorization else {}
        if_match = entry.entry["request"].get("ifMatch")
        if type(if_match) is str:
            headers["If-Match"] = if_match
        if it.kind == "operation" and entry.resource is not None:
            raise FhirError(
                501,
                "not-supported",
                f"{entry.where}: operations with a body are not supported in Bundles "
                "(their parameters could carry plaintext of encrypted elements)",
                [f"{entry.where}.request"],
            )
        if it.kind == "delete" and restricted and it.resource_type in rt.policy.resources:
            await check_scope(rt, it, grants, "delete", None, request_id, authorization)
        elif entry.method == "PATCH":
            await _patch(rt, entry, entry_searcher, entry_decision, grants, restricted, headers, request_id)
        elif entry.resource is not None:
            check_target(it, entry.resource, f"{entry.where}.resource")
            rewrite_search_urls(entry.resource, entry_searcher, f"{entry.where}.resource")
            extra = await prepare_write(rt, it, entry.resource, grants, restricted, headers, request_id, names=names)
            if "If-Match" in extra:
                entry.entry["request"]["ifMatch"] = extra["If-Match"]
    return name_queries


def deleted_by(bundle: dict) -> list[str]:
    """``Type/id`` of every resource a checked batch or transaction deletes by id (for the audit record:
    a delete's response names nothing)."""
    return [
        f"{e.interaction.resource_type}/{e.interaction.id}"
        for e in parse_bundle(bundle)
        if e.interaction.kind == "delete" and e.interaction.id
    ]


async def _patch(
    rt: Runtime,
    entry: Entry,
    searcher: Searcher,
    decision: Decision,
    grants: CallerGrants | None,
    restricted: bool,
    headers: dict[str, str],
    request_id: str,
) -> None:
    """A PATCH entry carries its JSON Patch as a Binary; on an encrypted type it becomes a PUT of the result."""
    binary = entry.resource or {}
    where = f"{entry.where}.resource"
    if binary.get("resourceType") != "Binary" or binary.get("contentType") != _JSON_PATCH:
        raise FhirError(
            415,
            "not-supported",
            f"{where}: a PATCH entry must carry a JSON Patch as a Binary ({_JSON_PATCH}); "
            "FHIRPath Patch is not supported",
            [where],
        )
    try:
        document = base64.b64decode(binary.get("data") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise FhirError(400, "structure", f"{where}.data is not base64", [f"{where}.data"]) from None
    try:
        prepared = patch_document(document, entry.interaction, rt.policy, searcher)
    except FhirError as exc:
        raise exc.located(where) from None
    if not isinstance(prepared, PatchOps):
        return  # no encrypted type involved: the server applies it
    it = entry.interaction
    patched, extra = await apply_patch(rt, it, prepared.ops, decision, grants, restricted, headers, request_id)
    request = entry.entry["request"]
    request["method"], request["url"] = "PUT", f"{it.resource_type}/{it.id}"
    if "If-Match" in extra:
        request["ifMatch"] = extra["If-Match"]
    entry.entry["resource"] = patched
