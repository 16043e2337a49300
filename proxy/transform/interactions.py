"""Classify a FHIR REST request by method and path (RESTful API, R4 section 3.1.0).

Anything that does not fit one of the shapes below is refused before it can reach
the upstream. The path is checked segment by segment, so encoded slashes, ``..``,
matrix parameters and other tricks never match a valid shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy import fhirgrammar as fg
from proxy.outcome import FhirError
from proxy.policy.definitions import resource_types


@dataclass(frozen=True)
class Interaction:
    kind: str  # read, vread, update, patch, delete, create, search, history, capabilities, batch, operation
    level: str  # system, type or instance
    resource_type: str | None = None
    id: str | None = None
    version: str | None = None
    operation: str | None = None
    conditional: bool = False  # update/patch/delete addressed by a search (PUT /Patient?identifier=...)
    compartment: str | None = None  # /Patient/123/Observation: the searched type is resource_type

    def label(self) -> str:
        """Short name for logs and metrics (no ids)."""
        return f"{self.kind}-{self.level}" if self.kind in ("search", "history", "operation") else self.kind


def _type(segment: str) -> str:
    if not fg.TYPE.match(segment) or segment not in resource_types():
        raise FhirError(404, "not-supported", f"'{segment[:64]}' is not an R4 resource type")
    return segment


def _id(segment: str, what: str = "id") -> str:
    if not fg.ID.match(segment):
        raise FhirError(400, "invalid", f"the {what} in the URL is not a valid FHIR id")
    return segment


def _op(segment: str) -> str:
    if not fg.OPERATION.match(segment):
        raise FhirError(400, "invalid", "the operation name in the URL is not valid")
    return segment[1:]


def _not_an_interaction(method: str) -> FhirError:
    return FhirError(405, "not-supported", f"{method} is not a FHIR interaction on this URL")


def classify(method: str, segments: list[str], has_query: bool) -> Interaction:
    """``segments`` are the raw path segments below the FHIR base, percent-decoding not applied."""
    n = len(segments)
    m = method
    if n == 0:
        if m == "POST":
            return Interaction("batch", "system")
        if m == "GET":
            return Interaction("search", "system")
        raise _not_an_interaction(m)
    first = segments[0]
    if n == 1 and first == "metadata":
        if m != "GET":
            raise _not_an_interaction(m)
        return Interaction("capabilities", "system")
    if first == "_history" and n == 1:
        if m != "GET":
            raise _not_an_interaction(m)
        return Interaction("history", "system")
    if first == "_search" and n == 1:
        if m != "POST":
            raise _not_an_interaction(m)
        return Interaction("search", "system")
    if first.startswith("$") and n == 1:
        if m not in ("GET", "POST"):
            raise _not_an_interaction(m)
        return Interaction("operation", "system", operation=_op(first))
    rtype = _type(first)
    if n == 1:
        kinds = {"GET": "search", "POST": "create", "PUT": "update", "DELETE": "delete", "PATCH": "patch"}
        if m not in kinds:
            raise _not_an_interaction(m)
        kind = kinds[m]
        if kind in ("update", "delete", "patch"):
            if not has_query:
                raise FhirError(400, "invalid", f"{m} on a type needs an id or a search (conditional {kind})")
            return Interaction(kind, "type", rtype, conditional=True)
        return Interaction(kind, "type", rtype)
    second = segments[1]
    if n == 2 and second == "_search":
        if m != "POST":
            raise _not_an_interaction(m)
        return Interaction("search", "type", rtype)
    if n == 2 and second == "_history":
        if m != "GET":
            raise _not_an_interaction(m)
        return Interaction("history", "type", rtype)
    if second.startswith("$"):
        if n != 2 or m not in ("GET", "POST"):
            raise _not_an_interaction(m)
        return Interaction("operation", "type", rtype, operation=_op(second))
    rid = _id(second)
    if n == 2:
        kinds = {"GET": "read", "PUT": "update", "DELETE": "delete", "PATCH": "patch"}
        if m not in kinds:
            raise _not_an_interaction(m)
        return Interaction(kinds[m], "instance", rtype, rid)
    third = segments[2]
    if third == "_history":
        if n == 3 and m == "GET":
            return Interaction("history", "instance", rtype, rid)
        if n == 4 and m == "GET":
            return Interaction("vread", "instance", rtype, rid, version=_id(segments[3], "version id"))
        raise _not_an_interaction(m)
    if third.startswith("$") and n == 3:
        if m not in ("GET", "POST"):
            raise _not_an_interaction(m)
        return Interaction("operation", "instance", rtype, rid, operation=_op(third))
    if n == 3 and m == "GET":  # compartment search: /Patient/123/Observation
        return Interaction("search", "compartment", _type(third), compartment=f"{rtype}/{rid}")
    if n == 4 and third != "_search" and segments[3] == "_search" and m == "POST":
        return Interaction("search", "compartment", _type(third), compartment=f"{rtype}/{rid}")
    raise FhirError(404, "not-supported", "the URL is not a FHIR REST interaction")
