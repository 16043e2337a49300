"""Read-only access to the R4 element table (``r4_elements.json``).

The table is derived from the official R4 StructureDefinitions by
``scripts/derive_r4_elements.py``; it is loaded once. The policy compiler reads it in full;
the request path only looks things up in it (resource types, attachment locations, and the
expected type named in a validation refusal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

BACKBONE_TYPES = frozenset({"BackboneElement", "Element"})


@dataclass(frozen=True)
class ElementDef:
    """What the compiler needs to know about one element of a type or resource."""

    path: str  # relative path in its table, with [x] for choices
    types: tuple[str, ...]
    min: int
    max: int  # -1 for unbounded
    modifier: bool
    content_ref: str | None  # recursive elements (Questionnaire.item.item) point elsewhere

    @property
    def repeating(self) -> bool:
        return self.max != 1

    @property
    def is_choice(self) -> bool:
        return self.path.endswith("[x]")


def packaged_table(name: str) -> dict[str, Any]:
    """One of the derived R4 tables shipped in ``proxy/policy`` (written by ``scripts/derive_*``)."""
    loaded: dict[str, Any] = json.loads(resources.files("proxy.policy").joinpath(name).read_bytes())
    return loaded


@cache
def table() -> dict[str, Any]:
    return packaged_table("r4_elements.json")


@cache
def _masked_invariants() -> dict[str, dict[str, str]]:
    return packaged_table("r4_masked_invariants.json")


def masked_invariant(resource_type: str, path: str) -> str | None:
    """The invariant (e.g. ``pat-1``) that the element's masked form would break, if any.

    Derived by ``scripts/derive_masked_invariants.mjs`` with Medplum's validator.
    """
    return _masked_invariants().get(resource_type, {}).get(path)


@cache
def resource_types() -> frozenset[str]:
    return frozenset(table()["resources"])


def is_primitive(type_name: str) -> bool:
    return type_name in _primitives()


@cache
def _primitives() -> frozenset[str]:
    return frozenset(table()["primitives"])


def elements(owner: str) -> dict[str, list[Any]]:
    """Element rows of a resource type or complex datatype."""
    t = table()
    rows: dict[str, list[Any]] = t["resources"].get(owner) or t["types"][owner]
    return rows


def element(owner: str, path: str) -> ElementDef | None:
    """Look ``path`` up in ``owner``; also finds ``value`` as the choice ``value[x]``."""
    rows = elements(owner)
    for candidate in (path, path + "[x]"):
        row = rows.get(candidate)
        if row is not None:
            return ElementDef(candidate, tuple(row[0]), row[1], row[2], "m" in row[3], row[4] if len(row) > 4 else None)
    return None


def choice_json_name(base: str, type_name: str) -> str:
    """``value`` + ``Quantity`` -> ``valueQuantity`` (FHIR JSON naming of choice types)."""
    return base + type_name[0].upper() + type_name[1:]


# References inside data types that copy PHI into their display (Identifier.assigner names the
# issuing organisation; Annotation.author[x] the person who wrote a clinical note).
_NESTED_REFERENCES = {"Identifier": "assigner", "Annotation": "authorReference"}


def reference_paths(resource_type: str) -> list[str]:
    """Paths of the resource's Reference elements (backbones included; choices by JSON name),
    plus the references inside its Identifier and Annotation elements."""
    paths = []
    for path, row in elements(resource_type).items():
        if "m" in row[3] or len(row) > 4:
            continue
        if "Reference" in row[0]:
            paths.append(choice_json_name(path[:-3], "Reference") if path.endswith("[x]") else path)
        if len(row[0]) == 1 and row[0][0] in _NESTED_REFERENCES:
            paths.append(f"{path}.{_NESTED_REFERENCES[row[0][0]]}")
    return sorted(paths)
