"""Fail-closed request rules: what may be forwarded, and what is refused, before anything
reaches the upstream.

Query strings and some headers carry search values, and a search value on an
encrypted element is plaintext PHI. Such parameters are rewritten to blind-index
searches (``proxy.transform.search``) or refused with an OperationOutcome naming the
parameter; parameters that cannot touch encrypted elements are forwarded as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode

from proxy.outcome import FhirError
from proxy.policy.compiler import CompiledPolicy
from proxy.policy.searchparams import search_param
from proxy.transform import search
from proxy.transform.bodies import nested_resources
from proxy.transform.interactions import Interaction
from proxy.transform.subset import Subset
from proxy.transform.subset import parse as parse_subset

JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})
# Parameters that carry no element values; safe on every interaction.
_FORMAT_PARAMS = frozenset({"_format", "_pretty"})
# Paging and result control: values are counts, dates of the server's own metadata, ids or parameter names.
_CONTROL_PARAMS = _FORMAT_PARAMS | {
    "_count",
    "_offset",
    "_total",
    "_since",
    "_at",
    "_page",
    "_getpages",
    "_getpagesoffset",
    "_bundletype",
    "_lastUpdated",
    "_id",
    "_include",
    "_revinclude",
}
_READ_PARAMS = {
    "read": _FORMAT_PARAMS,
    "vread": _FORMAT_PARAMS,
    "create": _FORMAT_PARAMS,
    "update": _FORMAT_PARAMS,
    "delete": _FORMAT_PARAMS,
    "capabilities": _FORMAT_PARAMS | {"mode"},
    "history": _CONTROL_PARAMS,
    "batch": _FORMAT_PARAMS,
}
# Parameters that search narrative or free text, or express arbitrary queries.
_TEXT_PARAMS = frozenset({"_text", "_content", "_filter", "_query", "_has", "_list", "_type"})
# Operations that must not run through the proxy until they are handled (issue: whole REST surface).
_REFUSED_OPERATIONS = frozenset(
    {"export", "graphql", "process-message", "validate", "match", "apply", "populate", "transform", "convert"}
)


def parse_query(query_string: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(
            query_string,
            keep_blank_values=True,
            strict_parsing=bool(query_string),
            errors="strict",
            max_num_fields=1000,
        )
    except (ValueError, UnicodeDecodeError):
        raise FhirError(400, "invalid", "the query string cannot be parsed") from None


def check_format(params: list[tuple[str, str]], is_write: bool) -> None:
    for name, value in params:
        if name == "_format" and value.split(";")[0].strip().lower() not in JSON_FORMATS:
            raise FhirError(
                406, "not-supported", "_format: only JSON is supported (application/fhir+json)", ["_format"]
            )


def _param_name(raw: str) -> tuple[str, str | None]:
    name, _, modifier = raw.partition(":")
    return name, modifier or None


def check_search(
    rtype: str | None, params: list[tuple[str, str]], ctx: search.Searcher, where: str
) -> list[tuple[str, str]]:
    """The parameters to forward: blind-index rewrites for encrypted elements, refusals for
    anything that could carry or match plaintext of encrypted elements, the rest as is."""
    rp = ctx.policies.get(rtype) if rtype else None
    sensitive = rtype is None or (rp is not None and rp.search_sensitive)
    out: list[tuple[str, str]] = []
    for raw, value in params:
        out.append((raw, value))
        name, modifier = _param_name(raw)
        if name in _FORMAT_PARAMS or (rp is not None and search.is_rewritten(raw, value, rp, ctx, where)):
            continue
        if name in ("_summary", "_elements"):
            continue  # taken out by check_request where the proxy must apply them itself
        if name == "_sort":
            fields = {f.lstrip("-") for f in value.split(",")}
            if rp is not None and not fields <= {"_id", "_lastUpdated"}:
                raise FhirError(
                    400,
                    "not-supported",
                    f"{where}: _sort is only supported on _id and _lastUpdated "
                    f"for {rtype}, whose elements may be encrypted",
                    ["_sort"],
                )
            continue
        if name in _CONTROL_PARAMS:
            continue
        if raw.startswith("_has:") or ("." in raw and not name.startswith("_")):
            out[-1] = search.rewrite_chain(rtype, raw, value, ctx, where)
            continue
        if name in _TEXT_PARAMS or "." in raw or modifier in ("identifier", "text", "contains"):
            raise FhirError(
                400,
                "not-supported",
                f"{where}: search parameter '{raw}' can reach encrypted data "
                "(text, filter and logical-identifier searches are not supported yet)",
                [raw],
            )
        sp = search_param(rtype, name) if rtype else None
        if rp is not None and sp is not None:
            rewritten = search.rewrite(rp, sp, raw, modifier, value, ctx, where)
            if rewritten is not None:
                out[-1] = rewritten
            continue
        if sensitive:
            target = rtype or "the system level"
            raise FhirError(
                400,
                "not-supported",
                f"{where}: search parameter '{raw}' on {target} is not supported "
                "yet: it may match encrypted elements, and forwarding it would send plaintext to "
                "the server",
                [raw],
            )
    return out


@dataclass(frozen=True)
class Forwarding:
    """What may go upstream: the query (None = unchanged) and a rewritten If-None-Exist."""

    query: list[tuple[str, str]] | None = None
    if_none_exist: str | None = None
    subset: Subset | None = None  # _summary/_elements the proxy applies after decryption
    if_match: str | None = None  # set by a masked write-back or a patch: the version the proxy read
    method: str | None = None  # a PATCH executed by the proxy goes upstream as PUT


def encode_query(params: list[tuple[str, str]]) -> str:
    return urlencode(params, safe="|,:$", quote_via=quote)


def check_request(
    it: Interaction, params: list[tuple[str, str]], headers: Mapping[str, str], ctx: search.Searcher
) -> Forwarding:
    """Raise FhirError for anything that could send plaintext of a covered element upstream;
    otherwise say what to forward (search values on encrypted elements become blind indexes)."""
    check_format(params, it.is_write)
    rtype = it.resource_type
    subset = None
    subsettable = it.kind in ("search", "read", "vread", "history") and not it.conditional
    if subsettable and (rtype is None or rtype in ctx.policies):  # the server would drop our envelope
        values = {name: value for name, value in params if name in ("_summary", "_elements")}
        if values and values.get("_summary") != "count":
            subset = parse_subset(values.get("_summary"), values.get("_elements"))
            params = [(name, value) for name, value in params if name not in ("_summary", "_elements")]
    if_none_exist = None
    if "If-None-Exist" in headers:
        criteria = check_search(rtype, parse_query(headers["If-None-Exist"]), ctx, "If-None-Exist")
        if_none_exist = encode_query(criteria)
    if it.kind == "patch" and it.conditional and rtype in ctx.policies:
        raise FhirError(
            501, "not-supported", f"conditional PATCH on {rtype} is not supported: patch the resource by id", [rtype]
        )
    if it.kind == "search" or it.conditional:
        return Forwarding(check_search(rtype, params, ctx, "query"), if_none_exist, subset)
    if it.kind == "operation":
        _check_operation(it, params)
        return Forwarding(None, if_none_exist)
    allowed = _READ_PARAMS.get(it.kind, _FORMAT_PARAMS)
    if subsettable or rtype not in ctx.policies:  # applied by the proxy, or harmless at the server
        allowed = allowed | {"_summary", "_elements"}
    for raw, _ in params:
        name = _param_name(raw)[0]
        if name not in allowed:
            raise FhirError(400, "not-supported", f"query parameter '{raw}' is not supported on {it.label()}", [raw])
    return Forwarding(params if subset else None, if_none_exist, subset)


# $everything's start and end are dates; anything else in them could be a value from the record.
_OPERATION_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def _check_operation(it: Interaction, params: list[tuple[str, str]]) -> None:
    op = it.operation or ""
    if op in _REFUSED_OPERATIONS:
        raise FhirError(501, "not-supported", f"${op} is not supported by this fhircrypt version", [f"${op}"])
    for raw, value in params:
        if raw in ("start", "end") and not _OPERATION_DATE.match(value):
            raise FhirError(400, "invalid", f"${op}: parameter '{raw}' must be a date", [raw])
        if _param_name(raw)[0] not in _CONTROL_PARAMS | {"start", "end"}:
            raise FhirError(
                501,
                "not-supported",
                f"${op}: parameter '{raw}' is not supported yet (it could carry plaintext of encrypted elements)",
                [raw],
            )


def check_operation_body(it: Interaction) -> None:
    """Operation requests with bodies may carry covered data anywhere; refused until handled."""
    raise FhirError(
        501,
        "not-supported",
        f"POST ${it.operation} with a body is not supported yet: its parameters "
        "could carry plaintext of encrypted elements",
        [f"${it.operation}"],
    )


def check_bundle(bundle: dict, policy: CompiledPolicy) -> None:
    """Batch/transaction: refuse any entry that involves a type with encrypted elements."""
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("batch", "transaction"):
        raise FhirError(400, "invalid", "POST to the base needs a batch or transaction Bundle", ["Bundle.type"])
    entries = bundle.get("entry") or []
    if type(entries) is not list:
        raise FhirError(400, "structure", "Bundle.entry must be a list", ["Bundle.entry"])
    for resource, where in nested_resources(bundle, "Bundle"):
        if resource.get("resourceType") in policy.resources:
            raise FhirError(
                501,
                "not-supported",
                f"{where}: {resource.get('resourceType')} in a batch/transaction "
                "is not supported yet (it would be stored unencrypted)",
                [where],
            )
    for i, entry in enumerate(entries):
        request = entry.get("request") if type(entry) is dict else None
        url = request.get("url") if type(request) is dict else None
        if type(url) is not str:
            raise FhirError(400, "structure", f"Bundle.entry[{i}].request.url is missing", [f"Bundle.entry[{i}]"])
        if "://" in url or url.startswith("/") or request.get("method") == "PATCH":
            raise FhirError(
                501,
                "not-supported",
                f"Bundle.entry[{i}].request: absolute URLs and PATCH entries are not supported yet in batches",
                [f"Bundle.entry[{i}].request"],
            )
        path, _, query = url.partition("?")
        target = path.split("/")[0]
        if target in policy.resources or query or "ifNoneExist" in request:
            what = target or "the system level"
            raise FhirError(
                501,
                "not-supported",
                f"Bundle.entry[{i}].request: this entry touches {what} or is "
                "conditional, which is not supported yet in batches",
                [f"Bundle.entry[{i}].request"],
            )
