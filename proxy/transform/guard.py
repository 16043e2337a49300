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

from proxy import fhirgrammar as fg
from proxy.outcome import FhirError
from proxy.policy.operations import OperationRule
from proxy.policy.searchparams import search_param
from proxy.transform import search, sentinel
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
_TOKEN = r"[A-Za-z0-9\-_.=]{1,200}"  # server-chosen paging handles
_PREFIXED_DATE = re.compile(rf"^{fg.SEARCH_PREFIX_RE}{fg.DATE_RE}\Z")
_INCLUDE = re.compile(rf"^(\*|{fg.TYPE_RE}:{fg.SEARCH_PARAM_RE}(:{fg.TYPE_RE})?)\Z")
# What each control parameter's value may look like: anything else could be a value from a record
# (a name in _id, a NIK in _count) and would reach the server in the clear.
_CONTROL_VALUES = {
    "_count": re.compile(r"^\d{1,7}$"),
    "_offset": re.compile(r"^\d{1,9}$"),
    "_getpagesoffset": re.compile(r"^\d{1,9}$"),
    "_total": re.compile(r"^(none|estimate|accurate)$"),
    "_since": fg.DATE,
    "_at": _PREFIXED_DATE,
    "_lastUpdated": _PREFIXED_DATE,
    "_page": re.compile(f"^{_TOKEN}$"),
    "_getpages": re.compile(f"^{_TOKEN}$"),
    "_bundletype": re.compile(r"^[a-z\-]{1,32}$"),
    "_id": re.compile(rf"^{fg.ID_RE}(,{fg.ID_RE})*\Z"),
    "_include": _INCLUDE,
    "_revinclude": _INCLUDE,
    "_pretty": re.compile(r"^(true|false)$"),
}


def check_control_value(raw: str, value: str, where: str = "query") -> None:
    """Refuse a control parameter whose value does not have its parameter's shape (never echoes the value)."""
    pattern = _CONTROL_VALUES.get(raw.partition(":")[0])
    if pattern is not None and not pattern.match(value):
        raise FhirError(
            400, "invalid", f"{where}: the value of '{raw}' does not have the form that parameter takes", [raw]
        )


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
# GraphQL can reach any element; Bulk export is handled on its own routes.
_REFUSED_OPERATIONS = frozenset({"graphql", "export"})
# What any operation may carry without the policy saying so: paging, control and a period.
_OPERATION_PARAMS = _CONTROL_PARAMS | {"start", "end"}


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


def check_format(params: list[tuple[str, str]]) -> None:
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
    anything that could carry or match plaintext of encrypted elements, the rest as is; the PHI
    sentinel looks at every value forwarded unchanged (a NIK in ``address-city`` where the address
    is clear)."""
    out = _check_search(rtype, params, ctx, where)
    cfg = ctx.sentinel
    if cfg.active:
        for (raw, value), sent in zip(params, out, strict=True):
            if sent[1] is value and _param_name(raw)[0] not in _CONTROL_PARAMS:
                sentinel.check_text(cfg, f"{where}: search parameter '{raw}'", value)
    return out


def _check_search(
    rtype: str | None, params: list[tuple[str, str]], ctx: search.Searcher, where: str
) -> list[tuple[str, str]]:
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
            check_control_value(raw, value, where)
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
    raw_binary: bool = False  # a Binary read in its own content type: the proxy unwraps the decrypted data


def encode_query(params: list[tuple[str, str]]) -> str:
    return urlencode(params, safe="|,:$", quote_via=quote)


def check_request(
    it: Interaction,
    params: list[tuple[str, str]],
    headers: Mapping[str, str],
    ctx: search.Searcher,
    operations: Mapping[str, OperationRule] | None = None,
) -> Forwarding:
    """Raise FhirError for anything that could send plaintext of a covered element upstream;
    otherwise say what to forward (search values on encrypted elements become blind indexes)."""
    check_format(params)
    _check_subset_params(params)
    rtype = it.resource_type
    subset = None
    subsettable = it.kind in ("search", "read", "vread", "history") and not it.conditional
    if subsettable and (rtype is None or rtype in ctx.policies):  # the server would drop our envelope
        values = {name: value for name, value in params if name in ("_summary", "_elements")}
        if values and values.get("_summary") != "count":
            subset = parse_subset(values.get("_summary"), values.get("_elements"))
            params = [(name, value) for name, value in params if name not in ("_summary", "_elements")]
        elif values:  # a count returns no elements: _elements means nothing, and its text is not forwarded
            params = [(name, value) for name, value in params if name != "_elements"]
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
        _check_operation(it, params, operations or {})
        return Forwarding(None, if_none_exist)
    allowed = _READ_PARAMS.get(it.kind, _FORMAT_PARAMS)
    if subsettable or rtype not in ctx.policies:  # applied by the proxy, or harmless at the server
        allowed = allowed | {"_summary", "_elements"}
    for raw, value in params:
        name = _param_name(raw)[0]
        if name not in allowed:
            raise FhirError(400, "not-supported", f"query parameter '{raw}' is not supported on {it.label()}", [raw])
        check_control_value(raw, value)
    return Forwarding(params if subset else None, if_none_exist, subset)


def _check_subset_params(params: list[tuple[str, str]]) -> None:
    """``_summary`` and ``_elements`` at most once each and without a modifier: the proxy applies them
    itself on encrypted types, and a second copy or a ``_summary:x`` would otherwise travel unchecked
    (with any text in it) beside the one it applied."""
    seen: set[str] = set()
    for raw, _ in params:
        name, modifier = _param_name(raw)
        if name not in ("_summary", "_elements"):
            continue
        if modifier is not None or name in seen:
            raise FhirError(400, "invalid", f"query: '{name}' may be given once, without a modifier", [name])
        seen.add(name)


def operation_rule(it: Interaction, operations: Mapping[str, OperationRule]) -> OperationRule:
    """The policy's rule for this operation (defaults when it lists none); refuses what is never allowed."""
    op = it.operation or ""
    rule = operations.get(op) or OperationRule(op)
    if op in _REFUSED_OPERATIONS or rule.refuse:
        raise FhirError(501, "not-supported", f"${op} is not supported through this proxy", [f"${op}"])
    return rule


def operation_parameter_allowed(rule: OperationRule, name: str) -> bool:
    return name in _OPERATION_PARAMS or name in rule.parameters


def check_operation_date(rule: OperationRule, name: str, value: object) -> None:
    """``start`` and ``end`` are allowed everywhere because they are dates: make sure they are."""
    if name in ("start", "end") and not (type(value) is str and fg.DATE.match(value)):
        raise FhirError(400, "invalid", f"${rule.name}: parameter '{name}' must be a date", [name])


def _check_operation(it: Interaction, params: list[tuple[str, str]], operations: Mapping[str, OperationRule]) -> None:
    rule = operation_rule(it, operations)
    for raw, value in params:
        check_operation_date(rule, raw, value)
        check_control_value(raw, value, f"${rule.name}")
        if not operation_parameter_allowed(rule, _param_name(raw)[0]):
            raise FhirError(
                501,
                "not-supported",
                f"${rule.name}: parameter '{raw}' is not allowed by the policy's operations block "
                "(it could carry plaintext of encrypted elements)",
                [raw],
            )
