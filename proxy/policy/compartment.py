"""R4 Patient compartment membership (``r4_patient_compartment.json``).

The table is derived from the official R4 Patient CompartmentDefinition by
``scripts/derive_patient_compartment.py``: per resource type, the codes of the search
parameters that link a resource of that type to a patient. A caller with only ``patient/``
scopes gets plaintext only for resources in its patient's compartment; this module answers
which compartments a resource is in.

Membership is decided from the resource alone, without resolving anything:

* a Patient is in its own compartment (its ``id``) and, through the ``link`` parameter, in
  those of the Patients its ``link.other`` points to;
* any other resource is in the compartment of every Patient that one of its compartment
  parameters' Reference elements points to.

Each compartment parameter is reduced, once per resource type, to the JSON key paths of the
Reference elements it reads (:func:`proxy.policy.searchparams.element_paths`, checked against
the R4 element table). Only ``reference`` values of the form ``Patient/<id>``, or an absolute
URL ending in ``/Patient/<id>``, each optionally followed by ``/_history/<vid>``, count.
Ignored: ``display``, logical references (``identifier`` only), contained references
(``#x``), ``urn:uuid:`` references, references to other types, and references that a
policy has encrypted (they are not readable here).

Conservative by design: membership may be missed, never invented. A resource type whose
compartment parameters cannot all be resolved to Reference element paths (an expression
beyond navigation, a filter other than ``resolve() is Patient``, a path not in the element
table) is treated as in no compartment at all (see :func:`unresolved_types`; none in R4).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from proxy import fhirgrammar as fg
from proxy.policy import definitions as defs
from proxy.policy.searchparams import ParamPath, element_paths, search_param

_PATIENT_REFERENCE = re.compile(rf"{fg.BASE_RE}Patient/({fg.ID_RE}){fg.HISTORY_RE}")
_RELATIVE_PATIENT_REFERENCE = re.compile(rf"Patient/({fg.ID_RE}){fg.HISTORY_RE}")

KeyPath = tuple[str, ...]


@cache
def table() -> dict[str, Any]:
    return defs.packaged_table("r4_patient_compartment.json")


def compartment_types() -> frozenset[str]:
    """The resource types that can be in a Patient compartment."""
    return frozenset(table()["resources"])


def compartment_params(resource_type: str) -> tuple[str, ...]:
    """Codes of the search parameters linking ``resource_type`` to the Patient compartment;
    ``()`` for types that are never in it."""
    return tuple(table()["resources"].get(resource_type, ()))


# ---------------------------------------------------------------- compilation


def _json_keys(resource_type: str, param_path: ParamPath) -> KeyPath | None:
    """The JSON keys of the Reference element ``param_path`` reads; None if it is not one.

    Walks the R4 element table: every step must exist, choices must be selected (or, on the
    last step, have a Reference option: ``valueReference``) and the last element must be a
    Reference.
    """
    owner, prefix = resource_type, ""
    keys: list[str] = []
    last = len(param_path.path) - 1
    if last < 0:
        return None
    for i, name in enumerate(param_path.path):
        rows = defs.elements(owner)
        key = next((k for k in (prefix + name, prefix + name + "[x]") if k in rows), None)
        if key is None:
            return None
        row = rows[key]
        types = list(row[0])
        if key.endswith("[x]"):
            chosen = param_path.choice_type if param_path.choice_step == i else ("Reference" if i == last else None)
            if chosen is None or chosen not in types:
                return None
            keys.append(defs.choice_json_name(name, chosen))
            types = [chosen]
        elif param_path.choice_step == i:
            return None
        else:
            keys.append(name)
        if i == last:
            return tuple(keys) if "Reference" in types else None
        if len(row) > 4:  # contentReference: the children of another element
            prefix = row[4] + "."
        elif types in (["BackboneElement"], ["Element"]):
            prefix = key + "."
        elif len(types) == 1 and types[0] in defs.table()["types"]:
            owner, prefix = types[0], ""
        else:
            return None
    return None


def _param_keys(resource_type: str, code: str) -> list[KeyPath] | None:
    param = search_param(resource_type, code)
    if param is None or param.type != "reference":
        return None
    paths = element_paths(param)
    if not paths:
        return None
    out: list[KeyPath] = []
    for param_path in paths:
        # Only "reference.where(resolve() is Patient)" is understood: it holds for every
        # Patient reference collected here. Any other filter would have to be evaluated.
        if any(criterion != (f"{param_path.dotted}.resolve()", "Patient") for criterion in param_path.criteria):
            return None
        keys = _json_keys(resource_type, param_path)
        if keys is None:
            return None
        out.append(keys)
    return out


@cache
def _key_paths(resource_type: str) -> tuple[KeyPath, ...] | None:
    """Key paths of the Reference elements linking ``resource_type`` to a patient; None when
    a compartment parameter cannot be resolved (the type is then in no compartment)."""
    out: list[KeyPath] = []
    for code in compartment_params(resource_type):
        keys = _param_keys(resource_type, code)
        if keys is None:
            return None
        out.extend(keys)
    return tuple(dict.fromkeys(out))


def reference_key_paths(resource_type: str) -> tuple[KeyPath, ...] | None:
    """The compiled key paths of ``resource_type`` (``()`` outside the compartment, None if
    unresolved). For tests and diagnostics."""
    if resource_type not in table()["resources"]:  # checked first: the cache only holds real types
        return ()
    return _key_paths(resource_type)


def unresolved_types() -> tuple[str, ...]:
    """Compartment resource types treated as in no compartment because a parameter could not
    be resolved to Reference element paths."""
    return tuple(sorted(rt for rt in table()["resources"] if _key_paths(rt) is None))


# ---------------------------------------------------------------- read path


def patient_id(reference: str, absolute: bool = True) -> str | None:
    """``Patient/123``, ``https://x/fhir/Patient/123/_history/2`` -> ``123``; None otherwise.
    ``absolute`` False: relative references only (an absolute URL may name a Patient on any server)."""
    m = (_PATIENT_REFERENCE if absolute else _RELATIVE_PATIENT_REFERENCE).fullmatch(reference)
    return m.group(1) if m else None


def _collect(resource: dict[str, Any], keys: KeyPath, out: set[str], absolute: bool) -> None:
    nodes: list[Any] = [resource]
    for key in keys:
        found: list[Any] = []
        for node in nodes:
            value = node.get(key)
            if value is None:
                continue
            if isinstance(value, list):
                found.extend(item for item in value if isinstance(item, dict))
            elif isinstance(value, dict):
                found.append(value)
        if not found:
            return
        nodes = found
    for node in nodes:
        reference = node.get("reference")
        if isinstance(reference, str) and "Patient/" in reference:
            pid = patient_id(reference, absolute)
            if pid is not None:
                out.add(pid)


def patient_references(resource: dict[str, Any], absolute: bool = True) -> set[str]:
    """Ids of the Patients whose compartment ``resource`` is in (empty: in none). ``absolute`` False
    counts relative references only (access decisions: ``https://elsewhere/fhir/Patient/1`` is not
    this server's Patient 1, and membership may be missed, never invented)."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or resource_type not in table()["resources"]:
        return set()
    key_paths = _key_paths(resource_type)
    if key_paths is None:
        return set()
    out: set[str] = set()
    if resource_type == "Patient":
        own = resource.get("id")
        if isinstance(own, str) and fg.ID.match(own):
            out.add(own)
    for keys in key_paths:
        _collect(resource, keys, out, absolute)
    return out


def in_compartment(resource: dict[str, Any], patient_id: str) -> bool:
    """Whether ``resource`` is in the compartment of this server's Patient ``patient_id`` (for access
    decisions: relative references only)."""
    return patient_id in patient_references(resource, absolute=False)
