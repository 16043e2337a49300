"""Follow a validator's error location through the R4 element table, to speak FHIR about it.

fhir.resources (pydantic) reports where validation failed as a tuple of JSON keys, array
indexes and internal validator names (``('name', 0, 'root')``). Walking that tuple through
the resource and the element table of ``r4_elements.json`` gives the FHIR path
(``Patient.name[0]``) and the R4 definition of the element there, so a message can say
what FHIR expects (``an array of HumanName``) instead of what the validator library says.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.policy.definitions import BACKBONE_TYPES, ElementDef, choice_json_name, element, elements, resource_types
from proxy.transform.jsontypes import JSON
from proxy.transform.validation_messages import EXTENSIONS

# What each R4 primitive accepts, in the words of the specification (its regex, summarised)
PRIMITIVE_FORMS = {
    "boolean": "true or false",
    "integer": "an integer (-2147483648 to 2147483647)",
    "positiveInt": "a positiveInt (an integer from 1 to 2147483647)",
    "unsignedInt": "an unsignedInt (an integer from 0 to 2147483647)",
    "decimal": "a decimal number",
    "string": "a non-empty string",
    "markdown": "a non-empty markdown string",
    "code": "a code (a non-empty string without leading or trailing whitespace)",
    "id": "an id (1 to 64 letters, digits, '-' and '.')",
    "uri": "a uri (a string without whitespace)",
    "url": "a url (a string without whitespace)",
    "canonical": "a canonical URL (a string without whitespace)",
    "oid": "an oid (urn:oid:…)",
    "uuid": "a uuid (urn:uuid:…)",
    "date": "a date (YYYY, YYYY-MM or YYYY-MM-DD)",
    "dateTime": "a dateTime (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss with a time zone)",
    "instant": "an instant (YYYY-MM-DDThh:mm:ss with a time zone)",
    "time": "a time (hh:mm:ss)",
    "base64Binary": "base64Binary (base64-encoded data)",
    "xhtml": "xhtml (a <div> in the XHTML namespace)",
}


@dataclass(frozen=True)
class Located:
    """Where an error is, in FHIR terms."""

    path: str  # FHIR path with indexes: Patient.name[0].given
    element: ElementDef | None  # the R4 definition of the last element named (None: not in R4)
    item: bool  # the location ends on an array index: the error concerns one entry of the array
    extensions: bool  # the last name is a primitive's extension holder (``_birthDate``)


def locate(resource: JSON, loc: tuple[int | str, ...]) -> Located:
    """Follow ``loc`` through ``resource`` and the element table; validator-internal names are skipped."""
    owner, rel = str(resource.get("resourceType")), ""
    path = owner
    node: object = resource  # walks any JSON value: each step checks the type it needs
    found: ElementDef | None = None
    item = extensions = False
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            item = True
            continue
        key = str(part)
        if found is not None:
            owner, rel = _scope(found, owner, rel, node, extensions)
        name = key[1:] if key.startswith("_") else key
        here = _find(owner, f"{rel}.{name}" if rel else name, name)
        if here is None and not (isinstance(node, dict) and key in node):
            continue  # a validator-internal step ("root", "function-after[...]"), not a JSON key
        path += f".{key}"
        node = node.get(key) if isinstance(node, dict) else None
        found, item, extensions = here, False, key.startswith("_")
        rel = here.path.removesuffix("[x]") if here is not None else rel
    return Located(path, found, item, extensions)


def expected(located: Located) -> str:
    """What R4 expects at the location: ``an array of HumanName``, ``a date (YYYY, …)``."""
    el = located.element
    if el is None:
        return "an element defined by R4 here"
    if located.extensions:
        return EXTENSIONS
    types = el.types or ("BackboneElement",)
    if el.repeating and not located.item:
        return "an array of " + " or ".join(types)
    return " or ".join(_one(t) for t in types)


def _one(type_name: str) -> str:
    if type_name in PRIMITIVE_FORMS:
        return PRIMITIVE_FORMS[type_name]
    if type_name in BACKBONE_TYPES:
        return "an object (a BackboneElement)"
    if type_name == "Resource":
        return "a resource (an object with resourceType)"
    return f"{'an' if type_name[0] in 'AEIOU' else 'a'} {type_name}"


def _find(owner: str, path: str, name: str) -> ElementDef | None:
    """The element ``path`` of ``owner``; a choice's JSON name (``valueQuantity``) resolves to its one type."""
    try:
        rows = elements(owner)
    except KeyError:
        return None  # an unknown nested resource type
    if path == "id" and owner in resource_types():
        return ElementDef("id", ("id",), 0, 1, False, None)  # the table types every element id as string
    el = element(owner, path)
    if el is not None and not el.is_choice:
        return el
    prefix = path[: len(path) - len(name)]
    for row_path, row in rows.items():
        if row_path.startswith(prefix) and row_path.endswith("[x]") and "." not in row_path[len(prefix) :]:
            base = row_path[len(prefix) : -3]
            for t in row[0]:
                if choice_json_name(base, t) == name:
                    return ElementDef(row_path, (t,), row[1], row[2], "m" in row[3], None)
    return None


def _scope(parent: ElementDef, owner: str, rel: str, node: object, extensions: bool) -> tuple[str, str]:
    """The table (resource or datatype) and relative path in which the children of ``parent`` are defined."""
    if extensions:
        return "Element", ""
    if parent.content_ref is not None:
        return owner, parent.content_ref
    if parent.types == ("Resource",):
        rtype = node.get("resourceType") if isinstance(node, dict) else None
        return (rtype, "") if rtype in resource_types() else ("", "")
    if len(parent.types) == 1 and parent.types[0] not in BACKBONE_TYPES:
        return parent.types[0], ""
    return owner, rel
