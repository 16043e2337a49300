"""Rewrite one search parameter on encrypted elements into a blind-index search.

``Patient?identifier=https://fhir.kemkes.go.id/id/nik|3201...`` becomes
``Patient?identifier=<index system>|<token>``: the upstream's own ``identifier`` token
search finds the index identifiers the proxy stored on write, and never sees the NIK.
Every value of a parameter (comma = OR) becomes tokens in one ``identifier`` parameter (a
system-only ``identifier=S|`` on an identifier whose system stays clear at rest is also sent as it
is, OR-ed with the ``S|*`` tokens: see ``IndexSpec.system_in_clear``);
repeated parameters stay separate (AND). What a blind index cannot answer exactly -
modifiers, date ranges, prefixes shorter than indexed - is refused, never forwarded
and never answered with a silently different result.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from proxy.crypto.blindindex import BlindIndexer
from proxy.outcome import FhirError
from proxy.policy.affects import touched_elements
from proxy.policy.closed import canonical, same_uri
from proxy.policy.compiler import CompiledElement, ResourcePolicy
from proxy.policy.indexing import IndexSpec
from proxy.policy.searchparams import SearchParam, search_param
from proxy.policy.sentinel import SentinelSettings
from proxy.transform import markers as mk
from proxy.transform import namechain
from proxy.transform.namechain import chain_label, chains
from proxy.transform.namefilter import READS, Clause, Recorder, Target
from proxy.transform.normalize import EXACT, NORMALISERS, PREFIX_MAX, fold

_DATE = re.compile(r"^(eq)?(\d{4})(-\d{2}-\d{2})?$")
_COMMA = re.compile(r"(?<!\\),")
_TOKEN_V1 = re.escape(mk.BLIND_INDEX_BASE) + r"[A-Za-z]+/[^|]+/[a-z0-9-]+\|[0-9a-f]{32}"
_TOKEN_V2 = re.escape(mk.INDEX_BASE) + r"[^|]+/[a-z0-9-]+\|[a-z2-7]{26}"
_TOKEN = re.compile(f"^(?:{_TOKEN_V1}|{_TOKEN_V2})$")


def _refuse(where: str, raw: str, why: str) -> FhirError:
    return FhirError(400, "not-supported", f"{where}: search parameter '{raw}' {why}", [raw])


def query_tokens(spec: IndexSpec, value: str, where: str, raw: str, modifier: str | None = None) -> list[str] | None:
    """Index texts for one search value; None when this spec cannot match the value at all."""
    if modifier == "exact":
        return [EXACT + unicodedata.normalize("NFC", value)]
    if spec.param_type == "string":
        folded = fold(value)
        if not folded or (spec.prefix_min and len(folded) < spec.prefix_min):
            raise _refuse(
                where,
                raw,
                f"needs at least {spec.prefix_min} characters on an encrypted element "
                "(shorter prefixes are not indexed)",
            )
        return [folded]  # longer than normalize.PREFIX_MAX: matches whole parts equal to it only
    if spec.param_type == "date":
        m = _DATE.match(value)
        if not m:
            raise _refuse(
                where,
                raw,
                "supports only an exact day (YYYY-MM-DD) or year on an encrypted date; "
                "ranges and other prefixes are not indexed",
            )
        if m.group(3):
            return [f"day:{m.group(2)}{m.group(3)}"]
        if not spec.year:
            raise _refuse(where, raw, "supports only an exact day on this encrypted date (no year index)")
        return [f"year:{m.group(2)}"]
    norm = NORMALISERS[spec.normalize]
    system, bar, code = value.rpartition("|") if "|" in value else ("", "", value)
    if spec.token_system is not None:
        if bar and not same_uri(system, spec.token_system):
            return None  # another system (or none): this encrypted identifier cannot match
        return [f"{spec.token_system}|{norm(code)}" if code else f"{spec.token_system}|*"]
    if bar and spec.value_type in ("code", "string", "uri"):
        raise _refuse(where, raw, "searches a plain code element: give the code without a system")
    if bar and not code:
        if not system:
            raise _refuse(where, raw, "needs a system or a code")
        return [f"{system}|*"]
    return [f"{system}|{norm(code)}" if bar else f"*|{norm(code)}"]


@dataclass(frozen=True)
class Searcher:
    """What rewriting needs: the policy, the index keys, and the groups the caller may search by; rewriting
    records there the chained name values of the search, which the answer is post-filtered against."""

    policies: dict[str, ResourcePolicy]
    indexer: BlindIndexer
    searchable: frozenset[str] | None = None  # None: every group (development mode)
    sentinel: SentinelSettings = field(default_factory=SentinelSettings)  # on values forwarded as they are
    chained: Recorder = field(default_factory=Recorder, compare=False)  # for the post-filter of the answer


def rewrite(
    rp: ResourcePolicy, sp: SearchParam, raw: str, modifier: str | None, value: str, ctx: Searcher, where: str
) -> tuple[str, str] | None:
    """The blind-index parameter replacing ``raw=value``, or None to forward it unchanged."""
    touched = touched_elements(rp, sp)
    if touched is None:
        raise _refuse(where, raw, f"cannot be checked against the encrypted elements of {rp.type}")
    if not touched:
        return None
    specs: list[IndexSpec] = []
    owners: dict[str, CompiledElement] = {}
    closing = [el.closing for el in touched if el.closing is not None]  # identifiers under unlisted systems
    for el in touched:
        if el.closing is not None:
            continue
        spec = next((s for s in el.indexes if s.param == sp.code), None)
        if spec is None:
            raise _refuse(
                where,
                raw,
                f"reads {rp.type}.{el.source}, which is encrypted without a blind index "
                "for it; forwarding it would send plaintext to the server",
            )
        specs.append(spec)
        owners[spec.label] = el
    if modifier is not None and not (modifier == "exact" and all(s.param_type == "string" for s in specs)):
        raise _refuse(where, raw, f"with the modifier ':{modifier}' cannot be answered on encrypted elements")
    if modifier is None and any(s.chain for s in specs):
        return _rewrite_chained(rp, sp, raw, value, specs, owners, ctx, where)
    out: list[str] = []
    for item in _COMMA.split(value):
        if mk.mentions_reserved(item):  # a token from a paging link, or an attempt to smuggle a value
            if not _TOKEN.match(item):
                raise _refuse(
                    where, raw, "uses fhircrypt's reserved blind-index system with a value that is not a token"
                )
            check_token_groups([item], rp, ctx, where, raw)
            out.append(item)
            continue
        texts = [(spec, query_tokens(spec, item.replace("\\,", ","), where, raw, modifier)) for spec in specs]
        matching = [(spec, t) for spec, t in texts if t is not None]
        if not matching:  # e.g. identifier=<system that is not encrypted>|value
            if item.startswith("|"):
                raise _refuse(
                    where,
                    raw,
                    "cannot search '|value' (no system) where identifiers are encrypted: "
                    "the value would reach the server in plaintext",
                )
            system, bar, _ = item.rpartition("|")
            if closing and not (bar and all(canonical(system) in c.listed for c in closing)):
                raise _refuse(
                    where,
                    raw,
                    "names an identifier system the policy does not list (identifiers.unlisted_systems): "
                    "its values are encrypted without a blind index, and the value would reach the server",
                )
            if sp.code != "identifier":
                raise _refuse(where, raw, "mixes encrypted and clear values, which cannot be searched together")
            out.append(item)
            continue
        for spec, tokens in matching:
            _check_group(owners[spec.label], rp, ctx, where, raw)
            if spec.system_in_clear and item.endswith("|"):  # system only: the server matches the clear system
                out.append(f"{spec.token_system}|")
            out.extend(_query_identifiers(ctx.indexer, spec, tokens))
    return "identifier", ",".join(dict.fromkeys(out))  # a paging link brings its rewritten values back


def _rewrite_chained(
    rp: ResourcePolicy,
    sp: SearchParam,
    raw: str,
    value: str,
    specs: list[IndexSpec],
    owners: dict[str, CompiledElement],
    ctx: Searcher,
    where: str,
) -> tuple[str, str]:
    """A string search on chained names: the same parameter, each value replaced by its chain (comma = OR)."""
    if not all(s.chain for s in specs):
        raise _refuse(where, raw, "reads chained and token-indexed names at once, which cannot be searched together")
    out: list[str] = []
    texts: list[str] = []
    as_chains: list[str] = []  # values that came as chains: their text is not known here
    for item in _COMMA.split(value):
        if mk.mentions_reserved(item):  # a chain from a paging link (the marker is reserved: never a name)
            if not namechain.CHAIN.fullmatch(item):
                raise _refuse(
                    where, raw, "uses fhircrypt's reserved name-chain marker with a value that is not a chain"
                )
            for spec in specs:
                _check_group(owners[spec.label], rp, ctx, where, raw)
            out.append(item)
            as_chains.append(item)
            continue
        folded = fold(item.replace("\\,", ","))
        texts.append(folded)
        # a chain holds prefixes up to PREFIX_MAX characters: a longer value is searched by the chain of its
        # first PREFIX_MAX and proven whole by the post-filter (namefilter.py), which only a parameter of the
        # searched type itself gets
        longest = None if raw == sp.code and sp.code in READS else PREFIX_MAX
        for spec in specs:
            if not folded or len(folded) < (spec.prefix_min or 1) or (longest and len(folded) > longest):
                raise _refuse(
                    where,
                    raw,
                    f"needs {spec.prefix_min} to {PREFIX_MAX} characters on an encrypted name "
                    "(other lengths are not indexed)"
                    if longest
                    else f"needs at least {spec.prefix_min} characters on an encrypted name",
                )
            _check_group(owners[spec.label], rp, ctx, where, raw)
            label = chain_label(rp.type, owners[spec.label].field_id)
            out += chains(ctx.indexer, label, [folded], spec.prefix_min or 1)
    if raw == sp.code and sp.code in READS:  # a parameter of the searched type itself, not one inside a chain
        els = [(owners[spec.label], spec.prefix_min or 1) for spec in specs]
        targets = tuple(Target(el.source, chain_label(rp.type, el.field_id), n) for el, n in els)
        ctx.chained.clauses.append(Clause(rp.type, READS[sp.code], targets, tuple(texts), tuple(as_chains)))
    return sp.code, ",".join(dict.fromkeys(out))


def _check_group(
    el: CompiledElement, rp: ResourcePolicy, ctx: Searcher, where: str, raw: str, verb: str = "reads"
) -> None:
    if ctx.searchable is not None and not el.groups <= ctx.searchable:
        # searching by a value the caller may not read would reveal who has it (an existence oracle)
        raise FhirError(
            403,
            "forbidden",
            f"{where}: search parameter '{raw}' {verb} {rp.type}.{el.source}, which this caller may not decrypt",
            [raw],
        )


def _query_identifiers(indexer: BlindIndexer, spec: IndexSpec, texts: list[str]) -> list[str]:
    """The ``system|token`` values a search sends for index texts: the v2 token (what writes store) and
    the v1 token, OR-ed, so that data written before index format v2 is found until it is re-encrypted."""
    v1 = [f"{mk.BLIND_INDEX_BASE}{spec.label}|{t}" for t in indexer.tokens(spec.label, texts)]
    label, own = spec.label, texts
    if spec.v2_via is not None:  # phone=X is telecom's phone|X in index format v2
        label, only = spec.v2_via, spec.criteria[0][1]
        own = [f"{only}|{rest}" for system, _, rest in (t.partition("|") for t in texts) if system in ("*", only)]
    v2 = [f"{mk.index_system(label)}|{t}" for t in indexer.tokens_v2(label, own)]
    return v2 + v1


def _label(token: str, rtype: str) -> str:
    """The label ``<type>/<field id>/<parameter>`` a token's system names (v1 names the type, v2 does not)."""
    system = token.partition("|")[0]
    if system.startswith(mk.BLIND_INDEX_BASE):
        return system[len(mk.BLIND_INDEX_BASE) :]
    return f"{rtype}/{system[len(mk.INDEX_BASE) :]}"


def is_rewritten(name: str, value: str, rp: ResourcePolicy, ctx: Searcher, where: str) -> bool:
    """A parameter this proxy produced (paging links carry them back): only index tokens, each of a field
    the caller may search by (a token copied from someone else's query is no way around the rule)."""
    values = _COMMA.split(value)
    if name != "identifier" or not all(_TOKEN.match(v) for v in values):
        return False
    check_token_groups(values, rp, ctx, where, name)
    return True


def check_token_groups(tokens: list[str], rp: ResourcePolicy, ctx: Searcher, where: str, raw: str) -> None:
    """Tokens name their field in their system: it must be exactly one this proxy mints for the type
    (a variant the server might still match, such as another letter case, is no token of ours), and
    the caller must be allowed to search by that field."""
    labels = {_label(t, rp.type) for t in tokens}
    owners = {spec.label: el for el in rp.content_elements for spec in el.indexes}
    for label in labels:
        el = owners.get(label)
        if el is None:
            raise _refuse(where, raw, f"carries a blind-index token that is not one of {rp.type}'s index fields")
        _check_group(el, rp, ctx, where, raw, "searches")  # a token copied from a caller who may


def rewrite_chain(rtype: str | None, raw: str, value: str, ctx: Searcher, where: str) -> tuple[str, str]:
    """Chained (``subject:Patient.identifier``) and reverse-chained (``_has:Observation:patient:code``)
    parameters: the inner parameter is rewritten on its own resource type's policy."""
    if rtype is None:
        raise _refuse(where, raw, "chains need a resource type")
    if raw.startswith("_has:"):
        parts = raw.split(":")
        if len(parts) == 5 and "." not in raw:
            raise _refuse(where, raw, "has a modifier inside _has, which is not supported on encrypted data")
        if len(parts) != 4 or "." in raw:
            raise _refuse(where, raw, "is not a single-level _has:<type>:<reference>:<parameter>")
        _, source, ref, inner = parts
        ref_param = search_param(source, ref)
        if ref_param is None or ref_param.type != "reference" or (ref_param.targets and rtype not in ref_param.targets):
            raise _refuse(where, raw, f"names no reference from {source} to {rtype}")
        rewritten = _inner(source, inner, None, value, ctx, where, raw)
        return (f"_has:{source}:{ref}:{rewritten[0]}", rewritten[1]) if rewritten else (raw, value)
    head, _, tail = raw.partition(".")
    if "." in tail:
        raise _refuse(where, raw, "chains more than one level, which is not supported on encrypted data")
    ref, _, type_modifier = head.partition(":")
    inner, _, inner_modifier = tail.partition(":")
    ref_param = search_param(rtype, ref)
    if ref_param is None or ref_param.type != "reference":
        raise _refuse(where, raw, f"does not start with a reference parameter of {rtype}")
    targets = [type_modifier] if type_modifier else list(ref_param.targets)
    # one of several targets without the inner parameter cannot match through the chain: nothing to rewrite there
    results = [
        (t, _inner(t, inner, inner_modifier or None, value, ctx, where, raw))
        for t in targets
        if len(targets) == 1 or search_param(t, inner) is not None
    ]
    touched = [(t, r) for t, r in results if r is not None]
    if not touched:
        return raw, value
    if len(targets) > 1:
        names = ", ".join(t for t, _ in touched)
        raise _refuse(
            where,
            raw,
            f"reads encrypted data of {names}; name the target type "
            f"({ref}:{touched[0][0]}.{inner}) so that it can be rewritten",
        )
    target, (name, token_value) = touched[0]
    return f"{ref}:{target}.{name}", token_value


def _inner(
    rtype: str, code: str, modifier: str | None, value: str, ctx: Searcher, where: str, raw: str
) -> tuple[str, str] | None:
    rp = ctx.policies.get(rtype)
    sp = search_param(rtype, code)
    if rp is None or not rp.search_sensitive:
        return None
    if sp is None:
        raise _refuse(where, raw, f"names '{code}', which is not a search parameter of {rtype}")
    return rewrite(rp, sp, raw, modifier, value, ctx, where)
