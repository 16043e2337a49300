"""Closed defaults: identifiers under systems and extensions under URLs that the policy does not name.

A policy lists the identifier systems and extension URLs it encrypts; an EMR writes whatever
it has. ``identifiers.unlisted_systems`` and ``extensions.unlisted`` decide what happens to
the rest on every covered type: ``encrypt`` (a catch-all element, compiled here once per
location), ``refuse`` (the same catch-all, which refuses the write instead) or ``allow``
(no catch-all at all: nothing extra on the hot path). Systems and URLs are compared in a
canonical form so that one letter's case or a trailing slash cannot turn a NIK into an
"unlisted" identifier that stays in the clear.

This module does not import the compiler (the compiler imports it); it works on compiled
elements through their attributes and ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from proxy.policy import definitions as defs

if TYPE_CHECKING:
    from proxy.policy.compiler import CompiledElement

MODES = ("encrypt", "refuse", "allow")
IDENTIFIER_FIELD = "*identifier"  # field ids of the catch-alls: '*' is never the start of a policy id
EXTENSION_FIELD = "*extension"
RESERVED_PREFIX = "https://fhircrypt.dev/fhir/"  # markers.CANONICAL: fhircrypt's own extensions are never unlisted

_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_CACHE: dict[str, str] = {}
_CACHE_MAX = 8192


def _unescape(m: re.Match[str]) -> str:
    ch = unquote(m.group(0))
    return ch if ch in _UNRESERVED else m.group(0).upper()


def canonical(uri: str) -> str:
    """The form two systems (or URLs) are compared in: case-folded, percent-escapes of unreserved
    characters decoded (others upper-cased), one trailing slash ignored.

    The whole text is case-folded, not only scheme and host: ``.../id/NIK`` and ``.../id/nik``
    are the same identifier to every human reader, so they must be the same system here.
    Cached: the hot path meets the same few systems over and over.
    """
    out = _CACHE.get(uri)
    if out is None:
        out = _ESCAPE.sub(_unescape, uri) if "%" in uri else uri
        out = out.casefold()
        if out.endswith("/") and not out.endswith("://"):
            out = out[:-1]
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[uri] = out
    return out


def same_uri(a: object, b: str) -> bool:
    """``a`` (from a request or a stored resource) names the same system or URL as ``b``."""
    return a == b or (type(a) is str and canonical(a) == canonical(b))


@dataclass(frozen=True)
class Unlisted:
    """On a hop: keep only the items whose ``key`` (``system`` or ``url``) the policy does not name."""

    key: str
    listed: frozenset[str]  # canonical forms
    action: str  # encrypt | refuse
    reference: bool = False  # an identifier inside a Reference: read by no search parameter

    def admits(self, item: dict[str, Any]) -> bool:
        value = item.get(self.key)
        if type(value) is not str:
            return True  # no system: not named by the policy
        if self.key == "url" and value.startswith(RESERVED_PREFIX):
            return False
        return canonical(value) not in self.listed


@dataclass(frozen=True)
class Closure:
    """The compiled ``identifiers`` and ``extensions`` blocks."""

    identifiers: str = "allow"
    identifier_group: str | None = None
    clear_systems: frozenset[str] = frozenset()  # canonical
    extensions: str = "allow"
    extension_group: str | None = None
    clear_urls: frozenset[str] = frozenset()  # canonical
    nested_extensions: bool = True  # false: the resource's own extension list only (as fhircrypt 0.1)


CompilePath = Callable[..., "CompiledElement"]


def identifier_locations(rtype: str) -> list[tuple[str, bool]]:
    """Paths of every Identifier the type can hold, with whether it lies inside a Reference:
    its own Identifier elements (backbones and choices included), ``Reference.identifier`` of
    each of its references, and ``Identifier.assigner.identifier`` (through reference_paths)."""
    out = []
    for path, row in defs.elements(rtype).items():
        if "m" in row[3] or len(row) > 4 or "Identifier" not in row[0]:
            continue
        out.append((defs.choice_json_name(path[:-3], "Identifier") if path.endswith("[x]") else path, False))
    out += [(f"{ref}.identifier", True) for ref in defs.reference_paths(rtype)]
    return out


# Data types whose extensions a profile may define (Address.extension: administrativeCode) and that a
# resource holds directly. Not Meta (fhircrypt's own envelope of a Binary lives there), Narrative
# (the narrative setting decides it), Extension (an extension's own extensions go with it) or
# BackboneElement (its ``.extension`` is listed in the element table itself).
_NOT_EXTENDED = frozenset({"Meta", "Narrative", "Extension", "BackboneElement", "Resource"})


def extension_locations(rtype: str) -> list[str]:
    """Paths of every element of the type whose ``extension`` a writer may fill: the resource itself
    (``""``), each backbone element, and each element of a complex data type one level down
    (``address``, ``contact.name``, ``location.period``). Extensions nested deeper, inside a data
    type's own parts (``code.coding[0].extension``), are left to the PHI sentinel."""
    rows = defs.elements(rtype)
    out = [""] if "extension" in rows else []
    for path, row in rows.items():
        if path.endswith(".extension"):
            out.append(path[: -len(".extension")])
        elif (
            "m" not in row[3]
            and len(row) <= 4
            and not path.endswith("[x]")
            and len(row[0]) == 1
            and row[0][0][:1].isupper()
            and row[0][0] not in _NOT_EXTENDED
        ):
            out.append(path)
    return out


def _extensions_at(loc: tuple[str, ...], explicit: list[CompiledElement]) -> tuple[frozenset[str], bool]:
    """(canonical URLs that explicit entries encrypt at the extension location ``loc``, whether an entry
    encrypts the location, or an element holding it, whole)."""
    urls: set[str] = set()
    depth = len(loc)
    for el in explicit:
        if el.display_copy:
            continue
        hops = (*el.nav, el.terminal)
        keys = tuple(h.key for h in hops)
        if len(keys) < depth and loc[: len(keys)] == keys and not el.terminal.criteria:
            return frozenset(), True  # an ancestor encrypted whole
        if keys[:depth] != loc:
            continue
        url = [v for k, v in hops[depth - 1].criteria if k == "url"]
        if not url:
            return frozenset(), True  # the extensions there encrypted whole
        urls.add(canonical(url[0]))
    return frozenset(urls), False


def _keys(el: CompiledElement) -> tuple[str, ...]:
    return (*(h.key for h in el.nav), el.terminal.key)


def _coverage_at(loc: tuple[str, ...], explicit: list[CompiledElement]) -> tuple[set[str], bool, bool]:
    """(systems encrypted at ``loc`` by explicit entries, whole location covered, partly covered
    by a where() on something other than the system)."""
    systems: set[str] = set()
    for el in explicit:
        if el.display_copy:
            continue
        keys = _keys(el)
        if el.choices and keys[:-1] == loc[:-1] and loc[-1] in {n for n, _ in el.choices}:
            return systems, True, False
        if keys == loc:
            criteria = el.terminal.criteria
        elif keys == (*loc, "value"):
            criteria = el.nav[-1].criteria
        elif len(keys) < len(loc) and loc[: len(keys)] == keys and not el.terminal.criteria:
            return systems, True, False  # an ancestor encrypted whole
        else:
            continue
        if not criteria:
            return systems, True, False
        if len(criteria) != 1 or criteria[0][0] != "system":
            return systems, False, True
        systems.add(canonical(criteria[0][1]))
    return systems, False, False


def close(
    rtype: str, explicit: list[CompiledElement], closure: Closure, compile_path: CompilePath
) -> tuple[list[CompiledElement], list[str]]:
    """The catch-all elements of one covered type, and warnings about locations left open."""
    out: list[CompiledElement] = []
    warnings: list[str] = []
    if closure.identifiers != "allow":
        groups = frozenset({closure.identifier_group}) if closure.identifiers == "encrypt" else frozenset()
        for path, in_reference in identifier_locations(rtype):
            el = compile_path(rtype, f"{path}.value", IDENTIFIER_FIELD, groups)
            systems, whole, partial = _coverage_at(tuple(h.key for h in el.nav), explicit)
            if whole:
                continue
            if partial:
                warnings.append(
                    f"{rtype}.{path}: an entry selects these identifiers by something other than their "
                    "system, so identifiers.unlisted_systems cannot apply here; unlisted systems stay in the clear"
                )
                continue
            unlisted = Unlisted("system", frozenset(systems) | closure.clear_systems, closure.identifiers, in_reference)
            nav = (*el.nav[:-1], dataclasses.replace(el.nav[-1], unlisted=unlisted))
            out.append(dataclasses.replace(el, nav=nav, source=f"{path}.value (unlisted systems)"))
    if closure.extensions != "allow":
        groups = frozenset({closure.extension_group}) if closure.extensions == "encrypt" else frozenset()
        for path in [p for p in extension_locations(rtype) if closure.nested_extensions or not p]:
            where = f"{path}.extension" if path else "extension"
            el = compile_path(rtype, f"{where}('urn:x')", EXTENSION_FIELD, groups)
            urls, whole = _extensions_at((*(h.key for h in el.nav), el.terminal.key), explicit)
            if whole:
                continue
            unlisted = Unlisted("url", urls | closure.clear_urls, closure.extensions)
            terminal = dataclasses.replace(el.terminal, criteria=(), unlisted=unlisted)
            out.append(dataclasses.replace(el, terminal=terminal, source=f"{where} (unlisted URLs)"))
    return out, warnings


def collisions(literals: list[tuple[str, str]]) -> tuple[str, str, str] | None:
    """Two spellings of one system or URL in a policy: (where, first spelling, second spelling)."""
    seen: dict[str, str] = {}
    for where, text in literals:
        first = seen.setdefault(canonical(text), text)
        if first != text:
            return where, first, text
    return None
