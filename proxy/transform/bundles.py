"""Batch and transaction Bundles: each entry is checked and rewritten as if it were its own request.

An entry's ``request.url`` is a relative FHIR URL (``Patient``, ``Patient/123``,
``Patient?identifier=...``) and its ``ifNoneExist`` a query: both are classified and
rewritten by the same rules as a top-level request (``guard.check_request``), so search
values on encrypted elements become blind-index tokens and anything that cannot be
handled is refused before the Bundle leaves the proxy. Search URLs inside the entries'
resources (conditional references, stored queries) are rewritten by
``proxy.transform.search_urls``.

This module is pure: entries that need the stored resource (masked write-back, PATCH,
patient-scoped writes) are completed by ``proxy.web.bundles``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from proxy.outcome import FhirError
from proxy.policy.operations import OperationRule
from proxy.transform import guard
from proxy.transform.interactions import Interaction, classify
from proxy.transform.jsontypes import JSON
from proxy.transform.search import Searcher

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
_NO_BODY = frozenset({"GET", "HEAD", "DELETE"})


@dataclass
class Entry:
    """One entry's request, classified; ``resource`` is the body of POST, PUT and PATCH entries."""

    index: int
    entry: JSON
    method: str
    interaction: Interaction
    resource: JSON | None

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"


def parse_bundle(bundle: JSON) -> list[Entry]:
    """Classify every entry of a batch or transaction; refuses shapes the proxy cannot check."""
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("batch", "transaction"):
        raise FhirError(400, "invalid", "POST to the base needs a batch or transaction Bundle", ["Bundle.type"])
    entries = bundle.get("entry", [])
    if type(entries) is not list:
        raise FhirError(400, "structure", "Bundle.entry must be a list", ["Bundle.entry"])
    return [_parse_entry(i, entry) for i, entry in enumerate(entries)]


def _parse_entry(i: int, entry: object) -> Entry:
    where = f"Bundle.entry[{i}]"
    if type(entry) is not dict or type(entry.get("request")) is not dict:
        raise FhirError(400, "structure", f"{where}.request is missing", [f"{where}.request"])
    request = entry["request"]
    method, url = request.get("method"), request.get("url")
    if method not in _METHODS:
        raise FhirError(400, "invalid", f"{where}.request.method is not an HTTP verb of FHIR", [f"{where}.request"])
    if type(url) is not str or not url:
        raise FhirError(400, "structure", f"{where}.request.url is missing", [f"{where}.request.url"])
    path, _, query = url.partition("?")
    if ":" in path or path.startswith("/") or "#" in url:
        raise FhirError(
            400, "not-supported", f"{where}.request.url must be relative to the FHIR base", [f"{where}.request.url"]
        )
    segments = path.split("/") if path else []
    if any(s in ("", ".", "..") or "%" in s or ";" in s or "\\" in s for s in segments):
        raise FhirError(
            400, "invalid", f"{where}.request.url has empty, encoded or relative segments", [f"{where}.request.url"]
        )
    try:
        it = classify("GET" if method == "HEAD" else method, segments, bool(query))
    except FhirError as exc:
        raise exc.located(f"{where}.request.url") from None
    if it.kind == "batch":
        raise FhirError(400, "not-supported", f"{where}: a Bundle entry cannot be a batch", [f"{where}.request"])
    resource = entry.get("resource")
    if method in _NO_BODY:
        resource = None
    elif type(resource) is not dict:
        raise FhirError(400, "structure", f"{where}: a {method} entry needs a resource", [f"{where}.resource"])
    return Entry(i, entry, method, it, resource)


def rewrite_request(
    entry: Entry,
    searcher: Searcher,
    operations: Mapping[str, OperationRule] | None = None,
    constraint: tuple[str, str] | None = None,
) -> guard.Forwarding:
    """Check the entry's URL and ``ifNoneExist`` like a request of its own and rewrite them in place;
    ``constraint`` (the caller's compartment) is ANDed to a search entry."""
    request = entry.entry["request"]
    path, _, query = request["url"].partition("?")
    headers = {}
    if "ifNoneExist" in request:
        if type(request["ifNoneExist"]) is not str:
            raise FhirError(400, "structure", f"{entry.where}.request.ifNoneExist must be a string")
        headers["If-None-Exist"] = request["ifNoneExist"]
    try:
        forwarding = guard.check_request(entry.interaction, guard.parse_query(query), headers, searcher, operations)
    except FhirError as exc:
        raise exc.located(f"{entry.where}.request") from None
    if forwarding.subset is not None:
        raise FhirError(
            400,
            "not-supported",
            f"{entry.where}.request.url: _summary and _elements are not supported in Bundle entries "
            f"on {entry.interaction.resource_type or 'the system level'} (search the type directly)",
            [f"{entry.where}.request.url"],
        )
    if constraint is not None and entry.interaction.kind == "search":
        forwarding = replace(forwarding, query=[*(forwarding.query or ()), constraint])
    if forwarding.query is not None:
        request["url"] = path + ("?" + guard.encode_query(forwarding.query) if forwarding.query else "")
    if forwarding.if_none_exist is not None:
        request["ifNoneExist"] = forwarding.if_none_exist
    return forwarding
