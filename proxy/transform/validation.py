"""Validation of writes before encryption: the ``validate`` setting, and the full validator (fhir.resources).

Validation runs on the plaintext the client sent, because after encryption the server can
no longer check what it stores. Three settings:

- ``structure`` (the default): :mod:`proxy.transform.structure`, every element name, JSON
  shape, primitive form, choice and required element against the R4 element table, compiled
  once per type; a small multiple of parsing the body.
- ``full``: fhir.resources (R4B models, which read R4 JSON), about 50 times the cost of
  parsing the body; on the tested corpus it refuses nothing ``structure`` accepts, and it lets
  some malformed shapes through (``null`` values, ``"active": "true"``, ``fhir_comments``).
- ``off``: nothing; encryption still refuses a wrong JSON type at a covered location.

Each failure becomes one issue that names the FHIR path (``issue.expression``) and what R4
expects there (``Patient.name: expected an array of HumanName``), in the same words under
both validators (:mod:`proxy.transform.validation_messages`). For ``full`` the message is
built from the error's kind and the R4 element definition only: the validator's own wording
(which may quote the input, and speaks Python) and the offending value are never passed on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import cache
from typing import TYPE_CHECKING, Literal

from proxy.outcome import FhirError, Issue
from proxy.policy.definitions import resource_types
from proxy.transform import validation_messages as say
from proxy.transform.elementpath import Located, expected, locate
from proxy.transform.jsontypes import JSON
from proxy.transform.structure import check_structure

if TYPE_CHECKING:  # imported when ``full`` first runs (_model): the default never loads them
    import pydantic
    from pydantic_core import ErrorDetails

Validation = Literal["structure", "full", "off"]
MODES: tuple[Validation, ...] = ("structure", "full", "off")

_MISSING = frozenset({"missing", "model_field_validation.missing"})
# "Any of one field value is expected from this list ['deceasedBoolean', ...], but got multiple!"
_CHOICE_LIST = re.compile(r"expected from this list \[([^\]]*)\]")
_JSON_NAME = re.compile(r"'([A-Za-z][A-Za-z0-9]*)'")


def validator(mode: Validation) -> Callable[[JSON], None] | None:
    """The check a ``validate`` setting runs on a write (None for ``off``); it raises FhirError 400."""
    if mode == "structure":
        return check_structure
    if mode == "full":
        return validate_resource
    if mode == "off":
        return None
    raise ValueError(f"validate: use one of {', '.join(MODES)}")


@cache
def _model(resource_type: str) -> type[pydantic.BaseModel] | None:
    """fhir.resources' model of a type; imported on first use, so that only ``validate: full`` pays for
    fhir.resources and pydantic (about a third of the proxy's start-up imports, and their memory)."""
    from fhir.resources.R4B import get_fhir_model_class

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
        return say.choice_conflict(path, names)
    if kind == "extra_forbidden":
        parent, _, name = where.path.rpartition(".")
        return say.unknown_element(parent, name)
    if kind in _MISSING:
        return say.required_missing(where.path, expected(where))
    return say.issue(where.path, _problem(where, kind, err))


def _problem(where: Located, kind: str, err: ErrorDetails) -> str:
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
    """The ``full`` validator: raise FhirError 400 listing each invalid path; returns None for a valid resource."""
    rtype = resource.get("resourceType")
    model = _model(rtype) if isinstance(rtype, str) else None
    if model is None or not isinstance(rtype, str):  # the second test only tells mypy what the first proved
        raise say.unknown_resource_type()
    unknown = [p for p in _unknown_nested_types({k: v for k, v in resource.items() if k != "resourceType"}, rtype)]
    if unknown:
        raise say.invalid([say.not_a_resource_type(p) for p in unknown], max_issues)
    from pydantic import ValidationError  # loaded with the model

    try:
        model.model_validate(resource)
    except ValidationError as exc:
        raise say.invalid([describe_error(resource, e) for e in exc.errors()[:max_issues]], max_issues) from None
    except (ValueError, TypeError, KeyError, AttributeError):  # fhir.resources' own validators, on odd input
        raise FhirError(400, "structure", f"{rtype}: resource is not valid FHIR", [rtype]) from None
