"""Structural validation of writes: the R4 element table compiled once per type to plain dicts, walked iteratively.

Why it exists: once a write is encrypted the server can no longer check what it stores, and
an element the proxy does not know (a misspelt ``nmae``, an element in the wrong place)
would carry its value past the policy in the clear, to be stored or silently dropped. The
proxy must therefore know, before it encrypts, that every key of the body is an element R4
defines at that place and holds the JSON shape R4 gives it. fhir.resources (``validate:
full``) checks that at about 50 times the cost of parsing the body; this walker checks the
same structure with dictionary lookups and a few precompiled regular expressions.

What it checks, in every resource of the body (contained resources, ``Bundle.entry.resource``,
``Parameters.parameter.resource`` and ``part`` each by their own type):

- every key is an element of R4 at that place: choice elements only by their typed JSON names
  (``valueQuantity``), ``_name`` only beside a primitive; a key not shaped like an element name
  is refused without being quoted (it may be data);
- the JSON shape: an array for a repeating element and never for another, an object for a
  complex type or backbone element, the JSON type of each primitive (string, number, boolean),
  no null where a value belongs;
- the forms of primitives by the R4 regular expressions (id, code, uri, oid, uuid, date,
  dateTime, instant, time), calendar days, base64 that decodes, the integer ranges, finite
  decimals and non-empty strings;
- a primitive's ``_name`` twin is an object (for a repeating primitive an array, as long as the
  values', of objects or nulls) holding only ``id`` and ``extension``; a null in a repeating
  primitive only where its twin holds extensions;
- one type per choice element, required elements present (a primitive's extensions count),
  and the upper bound of cardinalities other than 1 and ``*``;
- the ``resourceType`` of every nested resource is an R4 resource type.

What it does not check, left to the server (which validates what it can see anyway):
terminology bindings, invariants (``ele-1``, ``dom-2``, ...), profiles, XHTML content and
extension definitions.

The element table (``r4_elements.json``) is derived from Medplum's R4 definitions, which add
a few non-R4 elements to ``Meta`` (``project``, ``author``, ...); those are left out, as
``r4_nonstandard_elements.json`` lists them (derived by comparison with fhir.resources' R4B
models, so that neither pydantic nor the models are loaded here).
"""

from __future__ import annotations

import binascii
import math
import re
import threading
from collections.abc import Callable
from datetime import date
from functools import cache
from typing import Any, NamedTuple

from proxy.fhirgrammar import ID
from proxy.outcome import Issue
from proxy.policy.definitions import (
    BACKBONE_TYPES,
    ElementDef,
    choice_json_name,
    elements,
    is_primitive,
    packaged_table,
    resource_types,
)
from proxy.transform.elementpath import Located, expected
from proxy.transform.jsonnum import Number
from proxy.transform.jsontypes import JSON
from proxy.transform.validation_messages import (
    EXTENSIONS,
    choice_conflict,
    invalid,
    issue,
    not_a_resource_type,
    required_missing,
    unknown_element,
    unknown_resource_type,
)

# What a slot holds; the walker branches on these.
_STRING, _BOOLEAN, _INTEGER, _DECIMAL, _OBJECT, _RESOURCE, _TWIN, _SKIP = range(8)  # primitives first

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_MONTH, _DAY = r"(0[1-9]|1[0-2])", r"(0[1-9]|[1-2][0-9]|3[0-1])"
_URI = r"\S+"
# The regular expressions of the R4 primitive types (http://hl7.org/fhir/R4/datatypes.html), whole-string matches
_FORMS: dict[str, str] = {
    "code": r"[^\s]+(\s[^\s]+)*",
    "uri": _URI,
    "url": _URI,
    "canonical": _URI,
    "oid": r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+",
    "uuid": r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "date": rf"{_YEAR}(-{_MONTH}(-{_DAY})?)?",
    "dateTime": rf"{_YEAR}(-{_MONTH}(-{_DAY}(T{_TIME}{_ZONE})?)?)?",
    "instant": rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_ZONE}",
    "time": _TIME,
}
_INT_MAX = 2**31 - 1
_RANGES = {"integer": (-(2**31), _INT_MAX), "unsignedInt": (0, _INT_MAX), "positiveInt": (1, _INT_MAX)}


Check = Callable[[str], object]  # a string's form: truthy if it holds


def _on_the_calendar(form: Check) -> Check:
    """A date, dateTime or instant form that also refuses days the calendar lacks (``2023-02-30``)."""

    def check(value: str) -> bool:
        return bool(form(value)) and (len(value) < 10 or _real_day(value[:10]))

    return check


def _real_day(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _base64(value: str) -> bool:
    """R4's alphabet, in whole quanta of four (a decoder refuses ``QUI``), whitespace allowed as R4 allows it."""
    if _BASE64_ALPHABET(value) is None:
        return False
    try:
        binascii.a2b_base64(value)
    except binascii.Error:
        return False
    return True


_BASE64_ALPHABET = re.compile(r"[A-Za-z0-9+/=\s]+").fullmatch  # R4's own regex forgets '/'


def _primitive(type_name: str) -> tuple[int, Any]:
    """(kind, target) of a primitive type: its form (None: any non-empty string) or its range."""
    if type_name == "boolean":
        return _BOOLEAN, None
    if type_name == "decimal":
        return _DECIMAL, None
    if type_name in _RANGES:
        return _INTEGER, _RANGES[type_name]
    if type_name == "id":
        return _STRING, ID.match  # anchored at both ends
    if type_name == "base64Binary":
        return _STRING, _base64
    form = _FORMS.get(type_name)
    if form is None:
        return _STRING, None
    check = re.compile(form).fullmatch
    return _STRING, _on_the_calendar(check) if type_name in ("date", "dateTime", "instant") else check


class _Slot(NamedTuple):
    """What R4 allows under one JSON key of one type."""

    kind: int
    many: bool  # a JSON array (repeating element)
    max: int  # upper bound of the array (0: none to check)
    target: Any  # _Shape (objects, twins), a resource type or None (resources), a form or range (primitives)
    choice: str | None  # the choice element (``deceased[x]``) this typed name belongs to
    expected: str  # what R4 expects under the key, as refusals say it
    item: str  # what R4 expects in one entry of the array


class _Shape:
    """One type, resource or backbone element compiled: JSON key -> slot, and its required elements."""

    __slots__ = ("choices", "fields", "required")

    def __init__(self) -> None:
        self.fields: dict[str, _Slot] = {}
        self.required: list[tuple[str, tuple[str, ...], str]] = []  # (element, JSON names, expected)
        self.choices: dict[str, tuple[str, ...]] = {}  # choice element -> its typed JSON names, in R4's order


_SHAPES: dict[str, _Shape] = {}


def _shape(key: str) -> _Shape:
    """The compiled shape of ``key``: a type or resource (``HumanName``), or a backbone (``Patient.contact``).

    Registered before it is filled, so recursive types (Extension in Extension) end in a lookup."""
    found = _SHAPES.get(key)
    if found is None:
        found = _SHAPES[key] = _Shape()
        owner, _, rel = key.partition(".")
        _fill(found, owner, rel)
    return found


@cache
def _children(owner: str) -> dict[str, list[tuple[str, list[Any]]]]:
    """The rows of ``owner`` grouped by their parent's relative path ("" for the top level)."""
    out: dict[str, list[tuple[str, list[Any]]]] = {}
    for path, row in elements(owner).items():
        parent, _, name = path.rpartition(".")
        out.setdefault(parent, []).append((name, row))
    return out


def _fill(shape: _Shape, owner: str, rel: str) -> None:
    is_resource = owner in resource_types()
    added = () if is_resource or rel else _nonstandard().get(owner, ())
    if is_resource and not rel:
        shape.fields["resourceType"] = _Slot(_SKIP, False, 0, None, None, "", "")
    for name, row in _children(owner).get(rel, []):
        path = f"{rel}.{name}" if rel else name
        types, low, high = tuple(row[0]), row[1], row[2]
        cref = row[4] if len(row) > 4 else None
        if is_resource and path == "id":
            types = ("id",)  # the table types every element id as string; a resource's id is an id
        el = ElementDef(path, types, low, high, "m" in row[3], cref)
        if not el.is_choice:
            if name in added:
                continue  # not R4: an addition of Medplum's definitions
            names = _add(shape, name, el, _target(owner, path, types[0] if types else "", cref), None)
        else:
            base, names = name[:-3], ()
            for t in types:
                one = ElementDef(path, (t,), low, high, el.modifier, None)
                names += _add(shape, choice_json_name(base, t), one, _target(owner, path, t, None), name)
            shape.choices[name] = tuple(n for n in names if not n.startswith("_"))
        if low >= 1:
            shape.required.append((name, names, expected(Located("", el, False, False))))


def _add(shape: _Shape, key: str, el: ElementDef, target: tuple[int, Any], choice: str | None) -> tuple[str, ...]:
    """The slot of ``key`` (and of its ``_key`` twin if it is a primitive); returns the JSON names added."""
    kind, what = target
    many, bound = el.repeating, el.max if el.max > 1 else 0
    shape.fields[key] = _Slot(
        kind, many, bound, what, choice, expected(Located("", el, False, False)), expected(Located("", el, True, False))
    )
    if kind in (_OBJECT, _RESOURCE):
        return (key,)
    twin = "an array of objects with id and extension, or null" if many else EXTENSIONS
    shape.fields["_" + key] = _Slot(_TWIN, many, bound, _shape("Element"), choice, twin, EXTENSIONS)
    return key, "_" + key


def _target(owner: str, path: str, type_name: str, cref: str | None) -> tuple[int, Any]:
    """(kind, target) of an element of ``type_name`` at ``owner``'s ``path``."""
    if cref is not None:
        return _OBJECT, _shape(f"{owner}.{cref}")
    if is_primitive(type_name):
        return _primitive(type_name)
    if type_name == "Resource" or type_name in resource_types():
        return _RESOURCE, None if type_name == "Resource" else type_name
    if type_name in BACKBONE_TYPES:
        return _OBJECT, _shape(f"{owner}.{path}")
    return _OBJECT, _shape(type_name)


@cache
def _nonstandard() -> dict[str, list[str]]:
    """Elements Medplum's definitions add to R4 data types (``scripts/derive_r4_nonstandard_elements.py``)."""
    return packaged_table("r4_nonstandard_elements.json")


_READY: dict[str, _Shape] = {}  # resource type -> its shape, published only once every shape it reaches is filled
_COMPILING = threading.Lock()


def resource_shape(resource_type: str) -> _Shape | None:
    """The compiled shape of an R4 resource type, or None if R4 has no such resource.

    Compiled under a lock and published when complete, so that a walk in another thread never
    sees a shape still being filled (it would refuse valid elements as unknown)."""
    shape = _READY.get(resource_type)
    if shape is None and resource_type in resource_types():
        with _COMPILING:
            shape = _READY[resource_type] = _shape(resource_type)
    return shape


# Where an issue is: the root path, or (parent, key, array index or -1) built up as the walk descends.
Loc = Any


def _path(loc: Loc) -> str:
    parts: list[str] = []
    while type(loc) is tuple:
        loc, key, i = loc
        parts.append(f".{key}[{i}]" if i >= 0 else f".{key}")
    return str(loc) + "".join(reversed(parts))


def check_structure(resource: JSON, max_issues: int = 20) -> None:
    """Raise FhirError 400 listing each structural problem (paths, never values); None for a valid resource."""
    rtype = resource.get("resourceType")
    shape = resource_shape(rtype) if type(rtype) is str else None
    if shape is None or type(rtype) is not str:  # the second test only tells mypy what the first proved
        raise unknown_resource_type()
    issues = _walk(resource, shape, rtype, max_issues)
    if issues:
        raise invalid(issues, max_issues)


def _walk(root: JSON, top: _Shape, where: str, limit: int) -> list[Issue]:
    """Every problem in ``root`` and what it holds, iteratively (a deep body cannot exhaust the stack)."""
    issues: list[Issue] = []
    stack: list[tuple[JSON, _Shape, Loc]] = [(root, top, where)]
    push, isfinite = stack.append, math.isfinite
    string, boolean, integer, decimal, obj, twin, skip = _STRING, _BOOLEAN, _INTEGER, _DECIMAL, _OBJECT, _TWIN, _SKIP
    while stack and len(issues) < limit:
        node, shape, loc = stack.pop()
        fields = shape.fields
        chosen: dict[str, str | None] | None = None
        for key, value in node.items():
            slot = fields.get(key)
            if slot is None:
                issues.append(unknown_element(_path(loc), key))
                continue
            kind, many, bound, target, choice, _, _ = slot
            if choice is not None:
                typed = key.lstrip("_")
                chosen = chosen if chosen is not None else {}
                first = chosen.setdefault(choice, typed)
                if first != typed:
                    if first is not None:  # reported once per choice element
                        present = [n for n in shape.choices[choice] if n in node or "_" + n in node]
                        issues.append(choice_conflict(f"{_path(loc)}.{choice}", present))
                        chosen[choice] = None
                    continue
            if many:
                if type(value) is not list:
                    issues.append(issue(f"{_path(loc)}.{key}", f"expected {slot.expected}"))
                    continue
                if bound and len(value) > bound:
                    issues.append(issue(f"{_path(loc)}.{key}", f"expected at most {bound} entries"))
                items: list[Any] | tuple[Any] = value
            else:  # a single value: the common cases that are fine first, everything else below
                if kind == string:
                    if type(value) is str and value != "" and (target is None or target(value)):
                        continue
                elif kind == obj:
                    if type(value) is dict:
                        push((value, target, (loc, key, -1)))
                        continue
                elif kind == skip:
                    continue
                items = (value,)
            bad = -2  # the index of the first wrong entry, if any
            i = 0
            if kind == obj:
                for item in items:
                    if type(item) is dict:
                        push((item, target, (loc, key, i if many else -1)))
                    elif item is None and many:
                        issues.append(issue(f"{_path(loc)}.{key}", f"expected {slot.expected}, without null entries"))
                        break
                    else:
                        bad = i
                        break
                    i += 1
            elif kind <= decimal:  # a primitive: its JSON type, then its form or range
                for item in items:
                    t = type(item)
                    if kind == string:
                        ok = t is str and item != "" and (target is None or target(item))
                    elif kind == boolean:
                        ok = t is bool
                    elif kind == integer:
                        ok = t is int and target[0] <= item <= target[1]
                    else:  # _DECIMAL (a jsonnum Number is a float that keeps its text)
                        ok = t is int or ((t is float or t is Number) and isfinite(item))
                    if not ok and not (item is None and _beside_extensions(node, key, i, many)):
                        bad = i
                        break
                    i += 1
            elif kind == twin:
                bad = _twin(node, key, items, slot, loc, push, issues)
            else:  # _RESOURCE
                _resources(items, slot, loc, key, push, issues)
            if bad != -2:
                where = f"{_path(loc)}.{key}" + (f"[{bad}]" if many else "")
                issues.append(issue(where, f"expected {slot.item if many else slot.expected}"))
        for name, names, wanted in shape.required:
            for n in names:
                if n in node:
                    break
            else:
                issues.append(required_missing(f"{_path(loc)}.{name}", wanted))
    return issues[:limit]


def _beside_extensions(node: JSON, key: str, i: int, many: bool) -> bool:
    """A null entry of a repeating primitive is allowed where its twin holds the entry's extensions."""
    twin = node.get("_" + key) if many else None
    return type(twin) is list and i < len(twin) and type(twin[i]) is dict


def _twin(
    node: JSON,
    key: str,
    items: list[Any] | tuple[Any],
    slot: _Slot,
    loc: Loc,
    push: Callable[[tuple[JSON, _Shape, Loc]], None],
    issues: list[Issue],
) -> int:
    """Check a primitive's ``_name``; returns the index of a wrong entry, or -2."""
    values = node.get(key[1:])
    if slot.many and type(values) is list and len(values) != len(items):
        issues.append(issue(f"{_path(loc)}.{key}", f"expected an array as long as {key[1:]}"))
        return -2
    for i, item in enumerate(items):
        if type(item) is dict:
            push((item, slot.target, (loc, key, i if slot.many else -1)))
        elif not (item is None and slot.many):
            return i
    return -2


def _resources(
    items: list[Any] | tuple[Any],
    slot: _Slot,
    loc: Loc,
    key: str,
    push: Callable[[tuple[JSON, _Shape, Loc]], None],
    issues: list[Issue],
) -> None:
    """Nested resources (contained, Bundle entries, Parameters): each by its own type."""
    for i, item in enumerate(items):
        at = (loc, key, i if slot.many else -1)
        if type(item) is not dict:
            issues.append(issue(_path(at), f"expected {slot.item}"))
            continue
        rtype = item.get("resourceType")
        shape = resource_shape(rtype) if type(rtype) is str else None
        if shape is None:
            issues.append(not_a_resource_type(f"{_path(at)}.resourceType"))
        elif slot.target is not None and rtype != slot.target:  # Bundle.entry.response.outcome
            issues.append(issue(f"{_path(at)}.resourceType", f"expected {slot.item}"))
        else:
            push((item, shape, at))
