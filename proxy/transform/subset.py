"""``_summary`` and ``_elements`` applied by the proxy, after decryption.

A server that applies them itself drops fhircrypt's envelope and ciphertexts along
with the elements the client did not ask for, so the proxy forwards neither parameter
for resource types with encrypted elements, decrypts the full resources, and subsets
them here as R4 specifies (3.1.1.5.7/8): summary elements are those flagged isSummary
in the definitions; mandatory top-level elements are always kept; subsetted resources
are tagged SUBSETTED.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.outcome import FhirError
from proxy.policy import definitions as defs
from proxy.transform.jsontypes import JSON

SUMMARY_VALUES = ("true", "false", "text", "data", "count")
_ALWAYS = frozenset({"resourceType", "id", "meta"})
_SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


@dataclass(frozen=True)
class Subset:
    summary: str | None = None  # true | text | data (false and count need no work here)
    elements: frozenset[str] | None = None


def parse(summary: str | None, elements: str | None) -> Subset | None:
    if summary is not None and summary not in SUMMARY_VALUES:
        raise FhirError(400, "invalid", f"_summary must be one of {', '.join(SUMMARY_VALUES)}", ["_summary"])
    names = frozenset(e.strip() for e in elements.split(",") if e.strip()) if elements is not None else None
    if summary in (None, "false") and names is None:
        return None
    return Subset(summary if summary != "false" else None, names)


def _row_name(rtype: str, key: str) -> str | None:
    """The definition row of a top-level JSON key (``valueQuantity`` -> ``value[x]``)."""
    key = key.removeprefix("_")
    rows = defs.elements(rtype)
    if key in rows:
        return key
    for name, row in rows.items():
        if (
            name.endswith("[x]")
            and "." not in name
            and key.startswith(name[:-3])
            and any(defs.choice_json_name(name[:-3], t) == key for t in row[0])
        ):
            return name
    return None


def _keep(rtype: str, key: str, subset: Subset) -> bool:
    if key in _ALWAYS:
        return True
    name = _row_name(rtype, key)
    row = defs.elements(rtype).get(name) if name else None
    mandatory = row is not None and row[1] > 0
    if subset.elements is not None:
        return mandatory or (name or key).removesuffix("[x]") in subset.elements or key.lstrip("_") in subset.elements
    if subset.summary == "data":
        return key not in ("text", "_text")
    if subset.summary == "text":
        return mandatory or key == "text"
    return mandatory or (row is not None and "s" in row[3])  # summary=true


def apply(resource: JSON, subset: Subset) -> None:
    rtype = resource.get("resourceType")
    if type(rtype) is not str or rtype not in defs.resource_types() or rtype == "OperationOutcome":
        return
    removed = [k for k in resource if not _keep(rtype, k, subset)]
    for key in removed:
        del resource[key]
    if removed or subset.summary in ("true", "text"):
        given = resource.get("meta")
        meta: JSON = given if type(given) is dict else {}
        resource["meta"] = meta
        tag = meta.get("tag")
        tags: list[object] = tag if type(tag) is list else []
        if _SUBSETTED not in tags:
            meta["tag"] = [*tags, dict(_SUBSETTED)]


def apply_to_body(body: JSON, subset: Subset) -> None:
    """A single resource, or the matched entries of a searchset (includes stay whole)."""
    if body.get("resourceType") == "Bundle" and body.get("type") in ("searchset", "history"):
        for entry in body.get("entry") or []:
            if (
                type(entry) is dict
                and type(entry.get("resource")) is dict
                and ((entry.get("search") or {}).get("mode", "match") == "match")
            ):
                apply(entry["resource"], subset)
    else:
        apply(body, subset)
