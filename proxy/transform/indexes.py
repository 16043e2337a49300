"""Blind-index tokens of a resource (on write) and of a search value (on search).

Both sides go through :func:`value_tokens`, so a search finds exactly the resources
whose stored tokens equal the query's. Tokens are stored as extra identifiers
``{"system": <index system>, "value": <token>}`` that the upstream's standard
``identifier`` token search can match; readers never see them. Writes store index format
v2 (short system, base32 token); searches also send the v1 token, so data written before
(until ``fhircrypt reencrypt`` has moved it) is still found.

An identifier value selected by the policy's system ``S`` keeps ``system`` in the clear at rest,
so a server whose token index keeps an identifier without a value answers ``identifier=S|``
itself: with ``defaults.identifier_system_search: server`` (``IndexSpec.system_in_clear``) the
``S|*`` token is stored only for an identifier whose system is spelled otherwise than ``S``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from proxy.crypto.blindindex import BlindIndexer
from proxy.crypto.encoding import b32_128
from proxy.policy.compiler import CompiledElement, Kind, ResourcePolicy
from proxy.policy.indexing import IndexSpec
from proxy.transform import markers as mk
from proxy.transform.jsontypes import JSON
from proxy.transform.normalize import EXACT, NORMALISERS, date_tokens, string_tokens
from proxy.transform.records import _matches, _parents

_STRING_PARTS = {
    "HumanName": ("text", "family", "given", "prefix", "suffix"),
    "Address": ("text", "line", "city", "district", "state", "postalCode", "country"),
}


def _as_list(value: object) -> list[Any]:
    return value if type(value) is list else [] if value is None else [value]


def _descend(values: list[Any], sub_path: tuple[str, ...], criteria: tuple[tuple[str, str], ...]) -> list[Any]:
    """Values below ``sub_path``; ``criteria`` filter the items of the first step."""
    for i, key in enumerate(sub_path):
        nxt: list[Any] = []
        for v in values:
            if type(v) is dict:
                nxt.extend(
                    x
                    for x in _as_list(v.get(key))
                    if not (i == 0 and criteria and not (type(x) is dict and _matches(x, criteria)))
                )
        values = nxt
    if not sub_path and criteria:
        values = [v for v in values if type(v) is dict and _matches(v, criteria)]
    return values


def value_tokens(spec: IndexSpec, value: object, stored_system: object = None) -> list[str]:
    """Normalised token texts for one plaintext value of the indexed type; ``stored_system`` is the
    ``system`` written next to an identifier value (the policy's ``S`` or a canonically equal spelling)."""
    t = spec.value_type
    if spec.param_type == "string":
        parts: list[object] = [value]
        if type(value) is dict:
            parts = [p for key in _STRING_PARTS.get(t, ()) for p in _as_list(value.get(key))]
        return [tok for p in parts if type(p) is str for tok in string_tokens(p, spec.prefix_min)]
    if spec.param_type == "date":
        return date_tokens(value, spec.year) if type(value) is str else []
    norm = NORMALISERS[spec.normalize]
    if spec.token_system is not None:  # the element is an identifier's or contact point's value
        system = spec.token_system
        if type(value) is not str:
            return []
        if stored_system == system and spec.system_in_clear:  # the server finds it by its clear system
            return [f"{system}|{norm(value)}"]
        return [f"{system}|{norm(value)}", f"{system}|*"]  # spelled otherwise: the server would miss it
    if type(value) is str:
        return [f"*|{norm(value)}"]
    if type(value) is not dict:
        return []
    if t in ("Identifier", "ContactPoint"):
        pairs = [(value.get("system"), value.get("value"))]
    else:
        codings = _as_list(value.get("coding")) if t == "CodeableConcept" else [value]
        pairs = [(c.get("system"), c.get("code")) for c in codings if type(c) is dict]
    out = []
    for given, code in pairs:
        if type(code) is str:
            system = given if type(given) is str else ""  # "|code" is how FHIR searches a system-less code
            out += [f"{system}|{norm(code)}", f"*|{norm(code)}"] + ([f"{system}|*"] if system else [])
    return out


def _element_values(resource: JSON, el: CompiledElement) -> Iterator[tuple[JSON, object]]:
    """Each value of the element with the object holding it (an identifier value's own identifier)."""
    key = el.terminal.key
    for parent, _ in _parents(resource, el.nav, strict=True):
        if el.kind in (Kind.CHOICE, Kind.CHOICE_MASKED):
            names = [n for n, _ in el.choices if n in parent]
            values = [parent[n] for n in names]
        else:
            values = _as_list(parent.get(key))
        for value in values:
            if (
                el.kind is Kind.COMPLEX
                and el.terminal.criteria
                and not (type(value) is dict and _matches(value, el.terminal.criteria))
            ):
                continue
            if value is not None:
                yield parent, value


def spec_texts(
    resource: JSON, rp: ResourcePolicy, every_system_token: bool = True
) -> Iterator[tuple[IndexSpec, set[str]]]:
    """Every index spec with the normalised texts of a plaintext resource: all that index format v1 (and
    v2 before system-only searches went to the clear system) stored, or without ``every_system_token``
    no ``S|*`` text where the server finds the identifier by its clear system (``IndexSpec.system_in_clear``)."""
    for el in rp.elements:
        if not el.indexes:
            continue
        found = list(_element_values(resource, el))
        values = [v for _, v in found]
        for spec in el.indexes:
            if spec.token_system is None:
                texts = {tok for v in _descend(values, spec.sub_path, spec.criteria) for tok in value_tokens(spec, v)}
            else:  # an identifier's value: the system stored next to it decides on S|*
                texts = set()
                for parent, v in found:
                    texts.update(value_tokens(spec, v, None if every_system_token else parent.get("system")))
            yield spec, texts


def index_texts(resource: JSON, rp: ResourcePolicy) -> dict[str, set[str]]:
    """The texts index format v2 stores, by label (what is keyed and hashed into tokens): not those of a
    parameter answered under another label (``IndexSpec.v2_via``), of a chained name only the
    ``:exact`` texts (its prefixes live in the name itself, namechain.py), and ``S|*`` only where the
    server cannot answer ``identifier=S|`` itself."""
    return {
        spec.label: {t for t in texts if t.startswith(EXACT)} if spec.chain else texts
        for spec, texts in spec_texts(resource, rp, every_system_token=False)
        if spec.v2_via is None
    }


def index_identifiers(resource: JSON, rp: ResourcePolicy, indexer: BlindIndexer) -> list[JSON]:
    """The index identifiers (format v2) for a plaintext resource (computed before it is encrypted)."""
    labels, digests = [], []
    for label, texts in index_texts(resource, rp).items():
        found = list(indexer.digests(2, label, texts))
        labels.append((label, len(found)))
        digests += found
    tokens = iter(b32_128(digests))  # one batch for the whole resource: base32 costs per call, not per token
    out: list[JSON] = []
    for label, n in labels:
        system = mk.index_system(label)
        # sorted by token, so the order reveals nothing about the plaintexts (prefix lengths, names)
        out.extend({"system": system, "value": t} for t in sorted(next(tokens) for _ in range(n)))
    return out
