"""A write judged on the resource that will be stored after it.

Every create, update (by id), JSON Patch executed by the proxy and Bundle entry that writes a
resource ends in the same judgements, made here without I/O so that no route can judge
differently (``proxy/web/writes.py::prepare_write`` is the one caller):

* **Compartment** (:func:`check_compartment`). A caller confined to a patient compartment for
  the type (its scopes allowing the write are ``patient/`` scopes only) may write a resource
  only if it is in its patient's compartment and *every* reference of the type's compartment
  parameters (R4 Patient CompartmentDefinition) points at that patient, at a resource of
  another type, or at a contained resource - in the stored version and in the result. A
  reference whose target the proxy cannot tell (``urn:uuid:``, a conditional reference) is
  refused. One matching reference is not enough: ``subject`` = another patient with
  ``asserter`` = the caller would put data into another patient's chart.
* **Groups** (:func:`judge_groups`), element by element, after the masked occurrences have
  been restored from the stored version (:func:`restore_masked`):

  - a group the caller may write: set, change or remove freely;
  - a group it may read but not write: stored unchanged; setting, changing or removing an
    occurrence is refused (403);
  - a group it may neither read nor write: kept from the stored version. An occurrence the
    caller omits (a PUT without it, a PATCH ``remove``) is put back in place; setting or
    changing one is refused (403), and so is removing the place it lives in (the list entry
    holding it), which cannot be put back without guessing.

  The narrative is not judged here: it is a copy of the resource (masked, it is restored;
  a new one may be written).

Contained resources are judged as part of their container: paired with the stored contained
resource of the same ``id``, and a contained Patient is never the caller's patient. Other
nested resources (the entries of a stored Bundle, ``Parameters``) have no stored counterpart
here and are judged like creates.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from proxy import fhirgrammar as fg
from proxy.outcome import FhirError
from proxy.policy.compartment import in_compartment, patient_id, reference_key_paths
from proxy.policy.compiler import CompiledElement, CompiledPolicy, Kind
from proxy.transform.bodies import nested_resources
from proxy.transform.masked import has_masked, merge_masked
from proxy.transform.records import _join, _matches, _parents

# Type/id, optionally absolute and versioned: a reference to a resource of a known type
_TYPED = re.compile(rf"{fg.BASE_RE}({fg.TYPE_RE})/{fg.ID_RE}{fg.HISTORY_RE}")


@dataclass(frozen=True)
class WriteAccess:
    """What one caller may do to the elements of one resource it writes."""

    readable: frozenset[str]  # groups decrypted for it in the stored version (what it saw)
    writable: frozenset[str]  # groups it may set, change or remove


# --------------------------------------------------------------------------- compartment


def check_compartment(resource: dict[str, Any], patient: str | None, state: str) -> None:
    """Refuse (403) unless ``resource`` (``state``: "stored" or "written") lies wholly in ``patient``'s
    compartment: in it, with every compartment reference (its own and its contained resources') on
    that patient, another type or a contained resource."""
    rtype = str(resource.get("resourceType"))
    if patient is None or not in_compartment(resource, patient):
        raise FhirError(
            403, "forbidden", f"this {rtype} ({state}) is outside the caller's patient compartment", [rtype]
        )
    for path, reference in _compartment_references(resource, rtype):
        problem = _foreign(reference, patient)
        if problem:
            raise FhirError(403, "forbidden", f"{path} ({state}): {problem}", [path])


def _compartment_references(resource: dict[str, Any], where: str) -> Iterator[tuple[str, object]]:
    """``(path, reference)`` of every Reference element of a compartment parameter, contained resources
    included (by their own type's parameters)."""
    yield from _references_of(resource, where)
    for i, inner in enumerate(resource.get("contained") or ()):
        if type(inner) is dict:
            yield from _references_of(inner, f"{where}.contained[{i}]")


def _references_of(resource: dict[str, Any], where: str) -> Iterator[tuple[str, object]]:
    rtype = resource.get("resourceType")
    for keys in (reference_key_paths(rtype) or ()) if type(rtype) is str else ():
        nodes = [(resource, where)]
        for key in keys:
            found: list[tuple[Any, str]] = []
            for node, path in nodes:
                value, p = node.get(key), f"{path}.{key}"
                if type(value) is list:
                    found.extend((item, f"{p}[{i}]") for i, item in enumerate(value) if type(item) is dict)
                elif type(value) is dict:
                    found.append((value, p))
            nodes = found
        for node, path in nodes:
            if "reference" in node:
                yield f"{path}.reference", node["reference"]


def _foreign(reference: object, patient: str) -> str | None:
    """Why a compartment reference is not allowed for a caller confined to ``patient`` (None: allowed)."""
    if type(reference) is not str:
        return "a reference must be a string"
    if reference.startswith("#"):
        return None  # a contained resource: part of this one
    pid = patient_id(reference, absolute=False)
    if pid is not None:
        return None if pid == patient else "refers to a patient other than the caller's"
    typed = _TYPED.fullmatch(reference)
    if typed and typed.group(1) != "Patient":
        return None
    return "the proxy cannot tell which patient this reference points to (use Patient/<id>)"


# --------------------------------------------------------------------------- resources paired with their stored version


def _pairs(
    result: dict[str, Any], stored: dict[str, Any] | None, where: str
) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None, str]]:
    """The resource and each resource nested in it, with its stored counterpart (contained: the same id)."""
    yield result, stored, where
    theirs = {
        (c.get("resourceType"), c.get("id")): c
        for c in ((stored or {}).get("contained") or ())
        if type(c) is dict and type(c.get("id")) is str
    }
    contained = {id(c) for c in (result.get("contained") or ()) if type(c) is dict}
    for inner, path in nested_resources(result, where):
        key = (inner.get("resourceType"), inner.get("id"))
        yield inner, theirs.get(key) if id(inner) in contained else None, path


def _dropped_contained(
    result: dict[str, Any], stored: dict[str, Any] | None, where: str
) -> Iterator[tuple[dict[str, Any], str]]:
    """Stored contained resources the result no longer holds (by type and id)."""
    kept = {(c.get("resourceType"), c.get("id")) for c in (result.get("contained") or ()) if type(c) is dict}
    for i, c in enumerate((stored or {}).get("contained") or ()):
        if type(c) is dict and (c.get("resourceType"), c.get("id")) not in kept:
            yield c, f"{where}.contained[{i}]"


def holds_masked(resource: dict[str, Any], policy: CompiledPolicy) -> bool:
    """Whether the resource, or a resource nested in it, holds masked covered elements."""
    for mine, _, _ in _pairs(resource, None, ""):
        rp = policy.resources.get(mine.get("resourceType"))  # type: ignore[arg-type]
        if rp is not None and has_masked(mine, rp):
            return True
    return False


def restore_masked(result: dict[str, Any], stored: dict[str, Any], policy: CompiledPolicy, where: str) -> None:
    """Put every masked occurrence back from the stored version (decrypted), in place; 409 naming the
    paths where the stored version has nothing to put back."""
    missing: list[str] = []
    for mine, theirs, path in _pairs(result, stored, where):
        rp = policy.resources.get(mine.get("resourceType"))  # type: ignore[arg-type]
        if rp is None:
            continue
        if theirs is None:
            if has_masked(mine, rp):
                missing.append(path)
            continue
        missing.extend(_join(path, p) for p in merge_masked(mine, theirs, rp))
    if missing:
        raise FhirError(
            409, "conflict", f"{missing[0]}: masked in the request but absent from the stored version", missing[:5]
        )


# --------------------------------------------------------------------------- groups


Place = tuple[str, str, int | None]  # parent path, JSON key, list index (None: not a list item)


def judge_groups(
    result: dict[str, Any], stored: dict[str, Any] | None, policy: CompiledPolicy, access: WriteAccess, where: str
) -> None:
    """Refuse (403) a result that sets, changes or removes what the caller may not write; put back in
    place what it omitted of groups it may not read. ``stored``: the stored version decrypted in full
    (None for a create); masked occurrences must already be restored."""
    for mine, theirs, path in _pairs(result, stored, where):
        rp = policy.resources.get(mine.get("resourceType"))  # type: ignore[arg-type]
        if rp is None:
            continue
        for el in rp.content_elements:
            if not el.groups <= access.writable:
                _judge_element(mine, theirs, el, access, path, closing=el.closing is not None)
    for dropped, path in _dropped_contained(result, stored, where):
        rp = policy.resources.get(dropped.get("resourceType"))  # type: ignore[arg-type]
        for el in rp.content_elements if rp is not None else ():
            if not el.groups <= access.writable and _occurrences(dropped, el, strict=False):
                raise _refusal(path, el, access, "remove")


def _judge_element(
    mine: dict[str, Any],
    theirs: dict[str, Any] | None,
    el: CompiledElement,
    access: WriteAccess,
    where: str,
    closing: bool = False,
) -> None:
    """``closing``: a closed-default catch-all (identifiers under unlisted systems, unlisted extensions).
    It keeps such values from the server, not from writers: any writer may set or change them (a
    pharmacist's own prescription number), but what a caller could not read is still put back."""
    ours = _occurrences(mine, el, strict=True)
    stored = _occurrences(theirs, el, strict=False) if theirs is not None else {}
    for place, value in ours.items():
        if closing:
            break
        if place not in stored:
            raise _refusal(_place_path(where, place), el, access, "set")
        if stored[place] != value:
            raise _refusal(_place_path(where, place), el, access, "change")
    missing = [place for place in stored if place not in ours]
    if not missing or (closing and el.groups <= access.readable):
        return
    if el.groups <= access.readable:  # it saw them: leaving them out is removing them
        raise _refusal(_place_path(where, missing[0]), el, access, "remove")
    parents = {path: parent for parent, path in _parents(mine, el.nav, strict=True)}
    for place in missing:  # in stored order, so list items go back at their own index
        parent = parents.get(place[0])
        if parent is None or not _put_back(parent, el, place, stored[place]):
            raise _refusal(_place_path(where, place), el, access, "remove")


def _refusal(path: str, el: CompiledElement, access: WriteAccess, verb: str) -> FhirError:
    groups = ", ".join(sorted(el.groups - access.writable))
    return FhirError(403, "forbidden", f"{path}: this caller may not {verb} elements of the group(s) {groups}", [path])


def _place_path(where: str, place: Place) -> str:
    parent, key, index = place
    return _join(where, _join(parent, key if index is None else f"{key}[{index}]"))


def _occurrences(resource: dict[str, Any], el: CompiledElement, strict: bool) -> dict[Place, object]:
    """Each place where ``el`` holds a value in a plaintext resource, with that value."""
    out: dict[Place, object] = {}
    for parent, path in _parents(resource, el.nav, strict):
        if el.kind is Kind.PRIMITIVE:
            _primitive(parent, path, el.terminal.key, el.repeating, out)
        elif el.kind is Kind.COMPLEX:
            _complex(parent, path, el.terminal.key, el, out)
        elif el.kind is Kind.CHOICE:
            for name, primitive in el.choices:
                if primitive:
                    _primitive(parent, path, name, False, out)
                elif parent.get(name) is not None:
                    out[(path, name, None)] = parent[name]
        elif el.kind is Kind.CHOICE_MASKED:
            names = [k for n, _ in el.choices for k in (n, "_" + n) if k in parent]
            if names:
                carried = (*names, "dataAbsentReason") if "dataAbsentReason" in parent else names
                out[(path, el.terminal.key + "[x]", None)] = {k: parent[k] for k in carried}
    return out


def _primitive(parent: dict[str, Any], path: str, key: str, repeating: bool, out: dict[Place, object]) -> None:
    values, unders = parent.get(key), parent.get("_" + key)
    if not repeating:
        if values is not None or unders is not None:
            out[(path, key, None)] = (values, unders)
        return
    values = values if type(values) is list else []
    unders = unders if type(unders) is list else []
    for i in range(max(len(values), len(unders))):
        pair = (values[i] if i < len(values) else None, unders[i] if i < len(unders) else None)
        if pair != (None, None):
            out[(path, key, i)] = pair


def _complex(parent: dict[str, Any], path: str, key: str, el: CompiledElement, out: dict[Place, object]) -> None:
    value = parent.get(key)
    if not el.repeating:
        if value is not None:
            out[(path, key, None)] = value
        return
    for i, item in enumerate(value if type(value) is list else ()):
        if type(item) is dict and _matches(item, el.terminal.criteria):
            out[(path, key, i)] = item


def _put_back(parent: dict[str, Any], el: CompiledElement, place: Place, value: object) -> bool:
    """Put a stored occurrence back at its place in ``parent``; False when the place is taken."""
    _, key, index = place
    if el.kind is Kind.CHOICE_MASKED:
        if any(k in parent for n, _ in el.choices for k in (n, "_" + n)):
            return False
        parent.pop("dataAbsentReason", None)
        parent.update(value)  # type: ignore[call-overload]
        return True
    if isinstance(value, tuple):  # a primitive: (value, _value)
        return _put_primitive(parent, key, index, value)
    if index is None:
        parent[key] = value
        return True
    items = parent.setdefault(key, [])
    if type(items) is not list or len(items) != index:  # only at the end: an entry in between moved
        return False
    items.append(value)
    return True


def _put_primitive(parent: dict[str, Any], key: str, index: int | None, pair: tuple[Any, Any]) -> bool:
    if index is None:
        for k, v in zip((key, "_" + key), pair, strict=True):
            if v is not None:
                parent[k] = v
        return True
    lists = [parent.get(k) for k in (key, "_" + key)]
    n = max(len(x) for x in lists if type(x) is list) if any(type(x) is list for x in lists) else 0
    if index > n or any(type(x) is list and index < len(x) and x[index] is not None for x in lists):
        return False
    for k, v in zip((key, "_" + key), pair, strict=True):
        items: list[Any] = parent[k] if type(parent.get(k)) is list else []
        items.extend([None] * (index + 1 - len(items)))
        items[index] = v
        parent[k] = items
    for k in (key, "_" + key):
        if all(v is None for v in parent[k]):
            del parent[k]
    return True
