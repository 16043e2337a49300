"""Request bodies: check what a client sends before anything reaches the upstream."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web

from proxy.outcome import FhirError
from proxy.policy.compiler import CompiledPolicy
from proxy.transform import guard, jsonnum, sentinel
from proxy.transform.bodies import MAX_DEPTH, too_deep
from proxy.transform.interactions import Interaction
from proxy.transform.markers import mentions_reserved
from proxy.transform.search import Searcher
from proxy.transform.search_urls import rewrite_search_urls
from proxy.web import headers as hdr
from proxy.web.binaries import FHIR_XML, binary_resource
from proxy.web.runtime import Runtime


def parse_json(body: bytes, what: str, shape: type = dict):
    try:
        value = jsonnum.loads(body)
    except orjson.JSONDecodeError:
        raise FhirError(400, "structure", f"{what} is not valid JSON") from None
    if type(value) is not shape:
        raise FhirError(400, "structure", f"{what} must be a JSON {'object' if shape is dict else 'array'}")
    if too_deep(value):
        raise FhirError(400, "structure", f"{what} is nested more than {MAX_DEPTH} levels deep")
    return value


@dataclass(frozen=True)
class PatchOps:
    """A JSON Patch on an encrypted type, to be executed by the proxy."""

    ops: list


def prepare_body(
    rt: Runtime, it: Interaction, request: web.Request, body: bytes, searcher: Searcher
) -> bytes | dict | PatchOps:
    """Check a request body; returns what may be sent upstream, or the resource of a create or update."""
    ctype = hdr.media_type(request.headers.get("Content-Type"))
    if it.kind == "search":
        if ctype != "application/x-www-form-urlencoded":
            raise FhirError(415, "not-supported", "POST _search needs application/x-www-form-urlencoded")
        try:
            form = body.decode("utf-8")
        except UnicodeDecodeError:
            raise FhirError(400, "invalid", "the form body is not UTF-8") from None
        params = guard.parse_query(form)
        subset = [name for name, _ in params if name in ("_summary", "_elements")]
        if subset and (it.resource_type is None or it.resource_type in rt.policy.resources):
            raise FhirError(  # the server would drop the envelope; the proxy applies these only from the URL
                400, "not-supported", f"POST _search: put {subset[0]} in the URL, not in the form body", subset[:1]
            )
        params = guard.check_search(it.resource_type, params, searcher, "body")
        return guard.encode_query(params).encode()
    if it.kind == "patch":
        if ctype not in ("application/json-patch+json",):
            raise FhirError(
                415,
                "not-supported",
                "PATCH needs JSON Patch (application/json-patch+json); FHIRPath Patch is not supported",
            )
        return patch_document(body, it, rt.policy, searcher)
    raw = ctype and ctype not in hdr.JSON_TYPES and ctype not in FHIR_XML
    if raw and it.resource_type == "Binary" and it.kind in ("create", "update"):
        return binary_resource(it, ctype, body)  # a raw upload: wrapped, then encrypted like any Binary
    if ctype not in hdr.JSON_TYPES:
        if "xml" in ctype:
            raise FhirError(415, "not-supported", "XML is not supported; send application/fhir+json")
        raise FhirError(415, "not-supported", "send application/fhir+json")
    resource = parse_json(body, "the request body")
    _refuse_reserved(resource)
    if it.kind in ("create", "update"):
        check_target(it, resource, "the body")
        rewrite_search_urls(resource, searcher, it.resource_type or "")
    return resource


def check_target(it: Interaction, resource: dict, where: str) -> None:
    """A created or updated resource must be of the type (and for an update, have the id) its URL names."""
    rtype = resource.get("resourceType")
    if rtype is None:
        raise FhirError(
            400, "required", f"{where}: resourceType is missing (expected {it.resource_type})", ["resourceType"]
        )
    if rtype != it.resource_type:
        raise FhirError(
            400, "invalid", f"{where}: resourceType does not match the URL ({it.resource_type})", ["resourceType"]
        )
    if it.kind == "update" and not it.conditional and resource.get("id") != it.id:
        raise FhirError(400, "invalid", f"{where}: the id must match the id in the URL", [f"{rtype}.id"])


def patch_document(body: bytes, it: Interaction, policy: CompiledPolicy, searcher: Searcher) -> bytes | PatchOps:
    """A JSON Patch: executed by the proxy on encrypted types, otherwise forwarded once it is known not to
    carry a resource of an encrypted type. Search URLs in its values are rewritten like searches."""
    patch = parse_json(body, "the patch document", list)
    _refuse_reserved(patch)
    for i, op in enumerate(patch):
        if type(op) is dict:
            rewrite_search_urls(op, searcher, f"the patch document[{i}]")
    if it.resource_type in policy.resources:
        return PatchOps(patch)  # executed by the proxy: the server cannot patch ciphertext
    _refuse_covered_mentions(patch, policy)
    for i, op in enumerate(patch):
        if type(op) is dict:
            sentinel.check_value(policy.sentinel, op.get("value"), f"the patch document[{i}].value")
    return jsonnum.dumps(patch)  # what was checked: the raw bytes may read otherwise upstream (duplicate keys)


def _refuse_reserved(parsed: object) -> None:
    """Checked on the parsed document, so JSON escapes (``\\u002f``) cannot hide the URL, and in any
    spelling a server might treat as the same (case, percent-encoding, slashes)."""
    out = jsonnum.dumps(parsed)
    if (b"%" in out or b"fhircrypt" in out.lower()) and mentions_reserved(out.decode()):
        raise FhirError(
            400,
            "invalid",
            "the body contains fhircrypt's reserved extensions or tags; they are written by the proxy only",
        )


def _refuse_covered_mentions(value: object, policy: CompiledPolicy) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            if item.get("resourceType") in policy.resources:
                raise FhirError(501, "not-supported", "the patch carries a resource of an encrypted type")
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
