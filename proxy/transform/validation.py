"""Validate writes with fhir.resources (R4B models, which read R4 JSON) before encryption.

Validation runs on the plaintext the client sent, because after encryption the
server can no longer check what it stores. Each failure becomes one issue that names
the FHIR path (``issue.expression``) and what R4 expects there (``Patient.name: expected
an array of HumanName``). The message is built from the error's kind and the R4 element
definition only: the validator's own wording (which may quote the input, and speaks
Python) and the offending value are never passed on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache

import pydantic
from fhir.resources.R4B import get_fhir_model_class
from pydantic_core import ErrorDetails

from proxy.outcome import FhirError, Issue
from proxy.policy.definitions import resource_types
from proxy.transform.elementpath import Located, expected, locate
from proxy.transform.jsontypes import JSON

_MISSING = frozenset({"missing", "model_field_validation.missing"})
# "Any of one field value is expected from this list ['deceasedBoolean', ...], but got multiple!"
_CHOICE_LIST = re.compile(r"expected from this list \[([^\]]*)\]")
_JSON_NAME = re.compile(r"'([A-Za-z][A-Za-z0-9]*)'")
_ELEMENT_NAME = re.compile(r"_?[A-Za-z][A-Za-z0-9]{0,63}")


@cache
def _model(resource_type: str) -> type[pydantic.BaseModel] | None:
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError):
        return None


def describe_error(resource: JSON, err: ErrorDetails) -> Issue:
    """One pydantic error as a FHIR issue: the path and what R4 expects there, never the value."""
    loc = tuple(err.get("loc", ()))
    where = locate(resource, loc)
    kind = str(err.get("type", ""))
    choice = _CHOICE_LIST.search(str(err.get("msg", ""))) if kind == "value_error" else None
    names = _JSON_NAME.findall(choice.group(1)) if choice else []
    if names:  # two types of one choice element: the path is the choice (Patient.deceased[x])
        one = locate(resource, (*loc, names[0])).element
        path = f"{where.path}.{one.path.rsplit('.', 1)[-1]}" if one is not None else where.path
        message = f"only one of {', '.join(names)} may be present (a choice element takes one type)"
        return Issue("structure", f"{path}: {message}", expression=[path])
    parent, _, name = where.path.rpartition(".")
    if kind == "extra_forbidden" and not _ELEMENT_NAME.fullmatch(name):  # a key that is no name may be data
        return Issue(
            "structure", f"{parent}: holds a property whose name is not a FHIR element name", expression=[parent]
        )
    return Issue("structure", f"{where.path}: {_problem(where, kind, err)}", expression=[where.path])


def _problem(where: Located, kind: str, err: ErrorDetails) -> str:
    if kind in _MISSING:
        return f"required element is missing; expected {expected(where)}"
    if kind == "extra_forbidden":
        return "unknown element (not defined by FHIR R4 here)"
    if kind == "list_type" and isinstance(err.get("input"), list):
        return f"expected {expected(where)}, without null entries"
    return f"expected {expected(where)}"


def _unknown_nested_types(node: object, path: str) -> Iterator[str]:
    """Paths of nested resources (contained, Bundle entries, Parameters) whose resourceType is not R4."""
    if isinstance(node, dict):
        if "resourceType" in node and node["resourceType"] not in resource_types():
            yield f"{path}.resourceType"
        for key, value in node.items():
            yield from _unknown_nested_types(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _unknown_nested_types(value, f"{path}[{i}]")


def validate_resource(resource: JSON, max_issues: int = 20) -> None:
    """Raise FhirError 400 listing each invalid path; returns None for a valid resource."""
    rtype = resource.get("resourceType")
    model = _model(rtype) if isinstance(rtype, str) else None
    if model is None or not isinstance(rtype, str):  # the second test only tells mypy what the first proved
        raise FhirError(400, "structure", "resourceType is missing or not a known FHIR resource type", ["resourceType"])
    unknown = [p for p in _unknown_nested_types({k: v for k, v in resource.items() if k != "resourceType"}, rtype)]
    if unknown:
        issues = [Issue("structure", f"{p}: not a FHIR R4 resource type", expression=[p]) for p in unknown]
        raise FhirError(400, "structure", "resource is not valid FHIR", issues=issues[:max_issues])
    try:
        model.model_validate(resource)
    except pydantic.ValidationError as exc:
        issues = [describe_error(resource, e) for e in exc.errors()[:max_issues]]
        raise FhirError(400, "structure", "resource is not valid FHIR", issues=issues) from None
    except (ValueError, TypeError, KeyError):
        raise FhirError(400, "structure", f"{rtype}: resource is not valid FHIR", [rtype]) from None
