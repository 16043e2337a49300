"""Validate writes with fhir.resources (R4B models, which read R4 JSON) before encryption.

Validation runs on the plaintext the client sent, because after encryption the
server can no longer check what it stores. Error messages name the failing path
(``issue.expression``) and the kind of problem, never the offending value.
"""

from __future__ import annotations

from functools import cache

import pydantic
from fhir.resources.R4B import get_fhir_model_class

from proxy.outcome import FhirError, Issue

# pydantic error types whose messages are fixed templates that never echo the input
_TEMPLATE_TYPES = frozenset(
    {
        "missing",
        "extra_forbidden",
        "list_type",
        "dict_type",
        "string_type",
        "int_type",
        "int_parsing",
        "float_type",
        "float_parsing",
        "bool_type",
        "bool_parsing",
        "model_type",
        "model_attributes_type",
        "string_too_short",
        "string_too_long",
        "too_short",
        "too_long",
        "literal_error",
        "string_pattern_mismatch",
        "decimal_type",
        "decimal_parsing",
        "none_required",
        "is_instance_of",
        "union_tag_invalid",
    }
)


@cache
def _model(resource_type: str) -> type[pydantic.BaseModel] | None:
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError):
        return None


def _expression(resource_type: str, loc: tuple) -> str:
    out = resource_type
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "is-instance", "list[")):
            out += f".{part}"
    return out


def _message(err: dict) -> str:
    msg = str(err.get("msg", ""))
    if err.get("type") in _TEMPLATE_TYPES:
        return msg
    value = err.get("input")
    if err.get("type") == "value_error" and isinstance(value, str | int | float) and str(value) not in msg:
        return msg
    return "invalid value"


def validate_resource(resource: dict, max_issues: int = 20) -> None:
    """Raise FhirError 400 listing each invalid path; returns None for a valid resource."""
    rtype = resource.get("resourceType")
    model = _model(rtype) if isinstance(rtype, str) else None
    if model is None:
        raise FhirError(400, "structure", "resourceType is missing or not a known FHIR resource type", ["resourceType"])
    try:
        model.model_validate(resource)
    except pydantic.ValidationError as exc:
        issues = [
            Issue(
                "structure", f"{_expression(rtype, e['loc'])}: {_message(e)}", expression=[_expression(rtype, e["loc"])]
            )
            for e in exc.errors()[:max_issues]
        ]
        raise FhirError(400, "structure", "resource is not valid FHIR", issues=issues) from None
    except (ValueError, TypeError):
        raise FhirError(400, "structure", f"{rtype}: resource is not valid FHIR", [rtype]) from None
