"""The wording of validation refusals, shared by the structural and the full (fhir.resources) validator.

Both validators must say the same thing about the same mistake, so that switching the
``validate`` setting changes what is checked, not how a refusal reads. Every message is
``<FHIR path>: <what R4 expects there>``: built from the path and the R4 element definition
only, never from the value (which may be PHI) or a library's own wording.
"""

from __future__ import annotations

import re

from proxy.outcome import FhirError, Issue

# What a JSON key must look like to be read as an element name; anything else may be data (a name, a NIK)
ELEMENT_NAME = re.compile(r"_?[A-Za-z][A-Za-z0-9]{0,63}")
EXTENSIONS = "an object with id and extension (the extensions of a primitive value)"


def issue(path: str, problem: str) -> Issue:
    """One issue about ``path``: the message starts with the path, which is also its expression."""
    return Issue("structure", f"{path}: {problem}", expression=[path])


def unknown_element(parent: str, key: str) -> Issue:
    """A key that R4 does not define at ``parent``; quoted only if it is shaped like an element name."""
    if not ELEMENT_NAME.fullmatch(key):  # a key that is no name may be data
        return issue(parent, "holds a property whose name is not a FHIR element name")
    return issue(f"{parent}.{key}", "unknown element (not defined by FHIR R4 here)")


def required_missing(path: str, expected: str) -> Issue:
    return issue(path, f"required element is missing; expected {expected}")


def choice_conflict(path: str, names: list[str]) -> Issue:
    """``path`` is the choice element (``Patient.deceased[x]``), ``names`` the JSON names present."""
    return issue(path, f"only one of {', '.join(names)} may be present (a choice element takes one type)")


def not_a_resource_type(path: str) -> Issue:
    """``path`` ends in ``.resourceType``: a nested resource whose type is missing or not R4."""
    return issue(path, "not a FHIR R4 resource type")


def unknown_resource_type() -> FhirError:
    return FhirError(400, "structure", "resourceType is missing or not a known FHIR resource type", ["resourceType"])


def invalid(issues: list[Issue], max_issues: int = 20) -> FhirError:
    """The 400 for a resource with ``issues`` (the first ``max_issues`` of them)."""
    return FhirError(400, "structure", "resource is not valid FHIR", issues=issues[:max_issues])
