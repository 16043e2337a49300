"""Compile an element's ``search:`` settings into blind-index specifications.

An element lists the standard search parameters that must keep working on it::

    - path: identifier.where(system='https://fhir.kemkes.go.id/id/nik').value
      id: nik
      search: {params: [identifier], normalize: digits}
    - path: name
      id: name
      search: {params: [name, family, given], prefix: 3}
    - path: birthDate
      id: birthdate
      search: {params: [birthdate], year: true}
    - path: name
      id: name
      search: {params: [name, family, given], prefix: 3, chain: true}   # prefixes as a chain in the name

``chain: true`` (a whole HumanName only) answers the string parameters with a chain of keyed
prefix hashes stored in the encrypted name's own parts, instead of one identifier per prefix
(``proxy/transform/namechain.py``); ``:exact`` keeps its identifier tokens.

Each parameter is resolved against the R4 search parameter table: the parameter's
expression must read the element, the element itself, something inside it, or (for an
identifier's or contact point's ``value`` selected by ``system``) the token around it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from proxy.policy import definitions as defs
from proxy.policy.searchparams import element_paths, search_param

if TYPE_CHECKING:
    from proxy.policy.compiler import CompiledElement

INDEXABLE_TYPES = ("string", "token", "date")
NORMALIZE = ("exact", "digits")
DEFAULT_PREFIX = 3


class IndexError_(ValueError):
    """A ``search`` setting that cannot be honoured; the message names the parameter."""


@dataclass(frozen=True)
class IndexSpec:
    param: str  # search parameter code
    param_type: str  # string | token | date
    label: str  # <type>/<field id>/<param>: names the HMAC key and the index identifier system
    value_type: str  # FHIR type of the values that are indexed (HumanName, Identifier, date, ...)
    sub_path: tuple[str, ...] = ()  # from the element's value down to the indexed values
    criteria: tuple[tuple[str, str], ...] = ()  # the parameter's own filter (telecom.where(system='phone'))
    token_system: str | None = None  # the element is the value of a token whose system the policy fixed
    prefix_min: int | None = None  # string: prefixes of at least this length are tokens
    year: bool = False  # date: also a year token
    normalize: str = "exact"  # token codes: exact or digits
    chain: bool = False  # string on a HumanName: prefixes as a chain in the stored name, not identifiers
    # index format v2: a parameter that is another one of the element restricted to one system (phone,
    # email on telecom) stores nothing of its own; it is answered with <system>|<value> under that label
    v2_via: str | None = None
    # identifier=S| is answered by the server from the identifier's clear system (defaults.identifier_system_search:
    # server), OR-ed with S|* tokens that are then stored only for identifiers whose system is spelled otherwise
    system_in_clear: bool = False


def type_at(rtype: str, keys: tuple[str, ...]) -> str | None:
    """The FHIR type at a path of element names (choices by base name need a single type)."""
    owner, prefix = rtype, ""
    type_name: str | None = None
    for key in keys:
        d = defs.element(owner, f"{prefix}.{key}" if prefix else key)
        if d is None:
            return None
        if d.content_ref:
            owner_prefix = d.content_ref
            type_name, prefix = "BackboneElement", owner_prefix
            continue
        if len(d.types) != 1:
            return None
        type_name = d.types[0]
        if type_name in defs.BACKBONE_TYPES:
            prefix = d.path
        else:
            owner, prefix = type_name, ""
    return type_name


def compile_indexes(
    rtype: str, el: CompiledElement, settings: dict[str, Any], server_system_search: bool = False
) -> tuple[IndexSpec, ...]:
    params = settings.get("params")
    if not isinstance(params, list) or not params or not all(isinstance(p, str) for p in params):
        raise IndexError_("search.params must list search parameter codes")
    normalize = settings.get("normalize", "exact")
    if normalize not in NORMALIZE:
        raise IndexError_(f"search.normalize must be one of {', '.join(NORMALIZE)}")
    prefix = settings.get("prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, int) or prefix < 1:
        raise IndexError_("search.prefix must be a positive number of characters")
    year = bool(settings.get("year", False))
    chain = settings.get("chain", False)
    if chain not in (True, False):
        raise IndexError_("search.chain must be true or false")
    if defs.element(rtype, "identifier") is None or search_param(rtype, "identifier") is None:
        raise IndexError_(f"{rtype} has no identifier element to carry blind indexes")
    if el.kind.value.startswith("choice") or el.kind.value == "narrative":
        raise IndexError_("choice elements and narratives cannot carry a blind index")
    keys = (*(h.key for h in el.nav), el.terminal.key)
    if chain and (el.kind.value != "complex" or type_at(rtype, keys) != "HumanName" or "prefix" not in settings):
        raise IndexError_("search.chain needs a whole HumanName element (e.g. path: name) and a prefix length")
    specs = tuple(_spec(rtype, el, keys, code, normalize, prefix, year) for code in params)
    specs = tuple(dataclasses.replace(s, chain=True) if chain and s.param_type == "string" else s for s in specs)
    return tuple(
        dataclasses.replace(s, v2_via=_whole(s, specs), system_in_clear=server_system_search and _clear_system(s))
        for s in specs
    )


_SEARCH_SPECIAL = frozenset("\\,$|")  # characters FHIR search escapes in a token value


def _clear_system(spec: IndexSpec) -> bool:
    """Whether the server can answer a system-only search on this identifier value from its clear
    ``system``, OR-ed with index tokens in the same ``identifier`` parameter. Only ``identifier``
    qualifies: every other parameter (``telecom`` on ``telecom.where(system='phone').value``) is itself
    answered through ``identifier`` tokens, and a second parameter would be AND-ed, not OR-ed. A system
    FHIR search would have to escape is not sent as it is either."""
    system = spec.token_system
    return system is not None and spec.param == "identifier" and not _SEARCH_SPECIAL.intersection(system)


def _whole(spec: IndexSpec, specs: tuple[IndexSpec, ...]) -> str | None:
    """The label of a parameter of the same element that reads the same values without the
    system filter of ``spec`` (``telecom`` for ``phone``): its ``<system>|<value>`` texts are
    exactly what ``spec`` would store, so in index format v2 ``spec`` needs no tokens of its own."""
    if spec.param_type != "token" or len(spec.criteria) != 1 or spec.criteria[0][0] != "system":
        return None
    if spec.value_type not in ("ContactPoint", "Identifier"):
        return None
    return next(
        (
            w.label
            for w in specs
            if w.param_type == "token"
            and not w.criteria
            and w.token_system is None
            and (w.value_type, w.sub_path, w.normalize) == (spec.value_type, spec.sub_path, spec.normalize)
        ),
        None,
    )


def _relative_criteria(
    criteria: tuple[tuple[str, str], ...], base: tuple[str, ...], code: str
) -> tuple[tuple[str, str], ...]:
    dotted = ".".join(base) + "."
    out = []
    for key, literal in criteria:
        rest = key[len(dotted) :] if key.startswith(dotted) else ""
        if not rest or "." in rest or "(" in rest:
            raise IndexError_(f"search parameter '{code}' filters on '{key}', which a blind index cannot follow")
        out.append((rest, literal))
    return tuple(out)


def _spec(
    rtype: str, el: CompiledElement, keys: tuple[str, ...], code: str, normalize: str, prefix: int, year: bool
) -> IndexSpec:
    sp = search_param(rtype, code)
    if sp is None:
        raise IndexError_(f"'{code}' is not an R4 search parameter of {rtype}")
    if sp.type not in INDEXABLE_TYPES:
        raise IndexError_(f"'{code}' is a {sp.type} parameter; blind indexes serve string, token and date")
    paths = element_paths(sp)
    if paths is None:
        raise IndexError_(f"the expression of '{code}' cannot be analysed")
    spec = partial(
        IndexSpec,
        param=code,
        param_type=sp.type,
        label=f"{rtype}/{el.field_id}/{code}",
        prefix_min=prefix if sp.type == "string" else None,
        year=year,
        normalize=normalize,
    )
    for p in paths:
        if p.choice_type is not None:
            continue
        if p.path[: len(keys)] == keys:  # the parameter reads the element or something inside it
            base = p.path
            value_type = type_at(rtype, p.path)
            if value_type is None:
                continue
            if sp.type == "date" and value_type not in ("date", "dateTime", "instant"):
                raise IndexError_(
                    f"'{code}' reads a {value_type}; date blind indexes serve date, dateTime and instant elements only"
                )
            return spec(
                value_type=value_type,
                sub_path=p.path[len(keys) :],
                criteria=_relative_criteria(p.criteria, base, code),
            )
        if keys[: len(p.path)] == p.path and len(keys) == len(p.path) + 1 and keys[-1] == "value":
            outer = type_at(rtype, p.path)
            system = dict(el.nav[-1].criteria).get("system") if el.nav else None
            if outer in ("Identifier", "ContactPoint") and system is not None and sp.type == "token":
                return spec(value_type="string", token_system=system)
    where = ".".join(keys)
    raise IndexError_(
        f"search parameter '{code}' does not read {rtype}.{where} (or reads it in a way a blind "
        "index cannot follow: index the whole element, or select identifiers by system)"
    )


def index_warnings(el: CompiledElement) -> list[str]:
    """Frequency leakage of blind indexes that a policy author should weigh."""
    out = []
    for spec in el.indexes:
        if spec.year:
            out.append(
                f"blind index '{spec.param}' with year: true - equal tokens show which resources share a "
                "year (a few dozen distinct values)"
            )
        if spec.param_type == "token" and spec.value_type in ("CodeableConcept", "Coding", "code"):
            out.append(
                f"blind index '{spec.param}' on codes - codes repeat across resources, so token frequencies "
                "reveal how common each (unknown) code is"
            )
        if spec.param_type == "string" and spec.prefix_min is not None and spec.prefix_min < 3:
            out.append(
                f"blind index '{spec.param}' with prefix {spec.prefix_min} - short prefixes are shared by "
                "many values and reveal their distribution"
            )
        if spec.chain and spec is next(s for s in el.indexes if s.chain):  # once per element
            out.append(
                "string blind indexes as a name chain - shared prefixes and part lengths are visible as with "
                "prefix tokens, and a search may (rarely, 25-bit chunks) return a name that does not match: "
                "results are not yet checked against the decrypted name"
            )
        if spec.param_type == "date" and not spec.year:
            out.append(f"blind index '{spec.param}' on a date - equal days are visible as equal tokens")
    return out
