"""Findings of ``fhircrypt policy check`` beyond compile errors: what a policy leaves in the clear.

A finding has a severity (``warning``; ``--strict`` makes warnings fail) and a stable code that a
hospital's CI pipeline can match on. Codes are listed in docs/policy-format.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from proxy.policy import closed
from proxy.policy.loader import Node, NodeList


@dataclass(frozen=True)
class Finding:
    severity: str  # warning (errors stop compilation and are PolicyErrors)
    code: str  # stable: e.g. placeholder, near-miss-system, closed.identifiers-open
    message: str


# Values the shipped policies carry until an operator configures them.
_PLACEHOLDER = re.compile(r"REPLACE-WITH-[A-Za-z0-9-]*|example-hospital", re.IGNORECASE)
_URI = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*://|urn:)[^\s'\"(),]+")

# Identifier systems and extension URLs as SATUSEHAT publishes them (fhir.kemkes.go.id, the
# SATUSEHAT FHIR profiles; the review and its sources: docs/policy-format.md). A system that differs
# from one of them only by case, a trailing slash or escapes works (the proxy compares canonically)
# but is almost certainly a typo that other systems - SATUSEHAT itself - will not accept.
SATUSEHAT_SYSTEMS = (
    "https://fhir.kemkes.go.id/id/nik",
    "https://fhir.kemkes.go.id/id/nik-ibu",
    "https://fhir.kemkes.go.id/id/kk",
    "https://fhir.kemkes.go.id/id/paspor",
    "https://fhir.kemkes.go.id/id/ihs-number",
    "https://fhir.kemkes.go.id/id/patient-ihs-number",
    "https://fhir.kemkes.go.id/id/nakes-his-number",
    "https://fhir.kemkes.go.id/id/sip-number",
    "https://fhir.kemkes.go.id/r4/StructureDefinition/birthPlace",
    "https://fhir.kemkes.go.id/r4/StructureDefinition/citizenshipStatus",
    "https://fhir.kemkes.go.id/r4/StructureDefinition/administrativeCode",
    "https://fhir.kemkes.go.id/r4/StructureDefinition/ServiceClass",
    "https://fhir.kemkes.go.id/r4/StructureDefinition/MedicationType",
    "https://fhir.kemkes.go.id/r4/StructureDefinition/ConditionHistory",
    "https://fhir.kemkes.go.id/r4/StructureDefinition/CollectorOrganization",
)
SATUSEHAT_PREFIXES = ("http://sys-ids.kemkes.go.id/",)  # + mr/<organization id>, encounter/<organization id>, ...
_PUBLISHED = {closed.canonical(s): s for s in SATUSEHAT_SYSTEMS}


def _strings(node: object, where: str, line: int) -> Iterator[tuple[str, int, str]]:
    """(key path, line, text) of every string in the policy document."""
    if isinstance(node, Node):
        for key, value in node.items():
            yield from _strings(value, f"{where}.{key}" if where else key, node.key_lines.get(key, node.line))
    elif isinstance(node, (list, NodeList)):
        for i, item in enumerate(node):
            yield from _strings(item, f"{where}[{i}]", getattr(node, "line", line) or line)
    elif isinstance(node, str):
        yield where, line, node


def near_miss(uri: str) -> str | None:
    """The published SATUSEHAT spelling that ``uri`` differs from only by case, slash or escapes."""
    published = _PUBLISHED.get(closed.canonical(uri))
    if published is not None and published != uri:
        return published
    for prefix in SATUSEHAT_PREFIXES:
        if closed.canonical(uri).startswith(closed.canonical(prefix)) and not uri.startswith(prefix):
            return prefix + "…"
    return None


def lint_document(doc: Node, closure: closed.Closure) -> list[Finding]:
    out = []
    if closure.identifiers == "allow":
        out.append(
            Finding(
                "warning",
                "closed.identifiers-open",
                "identifiers.unlisted_systems is allow: an identifier under a system the policy does not "
                "name (a BPJS number under another system, a NIK inside Reference.identifier) is stored in the clear",
            )
        )
    if closure.extensions == "allow":
        out.append(
            Finding(
                "warning",
                "closed.extensions-open",
                "extensions.unlisted is allow: an extension the policy does not name (religion, ethnicity, "
                "mother's maiden name) is stored in the clear",
            )
        )
    elif not closure.nested_extensions:
        out.append(
            Finding(
                "warning",
                "closed.nested-extensions-open",
                "extensions.nested is false: an unlisted extension on a backbone element or a data type "
                "(Patient.contact, Encounter.location, Patient.address) is stored in the clear; keep it only "
                "as --previous-policy for records written before nested extensions were closed",
            )
        )
    for where, line, text in _strings(doc, "", doc.line):
        if where.endswith("description"):
            continue
        for m in _PLACEHOLDER.finditer(text):
            out.append(
                Finding(
                    "warning",
                    "placeholder",
                    f"line {line}: {where}: placeholder '{m.group(0)}' - configure it, or what it should match "
                    "stays in the clear (or unlisted)",
                )
            )
        for uri in _URI.findall(text):
            published = near_miss(uri)
            if published is not None:
                out.append(
                    Finding(
                        "warning",
                        "near-miss-system",
                        f"line {line}: {where}: '{uri}' differs from SATUSEHAT's '{published}' only by case, "
                        "trailing slash or escapes",
                    )
                )
    return out


# Element types that hold a person's identity or free text about them wherever they occur: a top-level
# element of one of these types on a type of the Patient compartment is PHI unless the policy says why not.
PHI_TYPES = frozenset({"HumanName", "ContactPoint", "Address", "Attachment", "Annotation"})


def lint_coverage(
    covered: dict[str, frozenset[str]], knowingly_clear: dict[str, str], compartment: frozenset[str]
) -> list[Finding]:
    """Types of the Patient compartment without a rule, and their top-level elements of PHI types
    (:data:`PHI_TYPES`) that no rule covers (``covered``: type -> first keys of its encrypted
    elements). ``knowingly_clear`` (``Type`` or ``Type.element`` -> reason) turns a finding into
    info: the operator decided, and said why."""
    from proxy.policy import definitions as defs

    out = []
    for rtype in sorted(compartment):
        reason = knowingly_clear.get(rtype)
        if rtype not in covered:
            out.append(
                Finding("info", "knowingly-clear", f"{rtype}: left clear: {reason}")
                if reason
                else Finding(
                    "warning",
                    "uncovered-compartment-type",
                    f"{rtype} can hold a patient's data and the policy has no rule for it: it is stored in the clear",
                )
            )
            continue
        for key, row in defs.elements(rtype).items():
            name = key.removesuffix("[x]")
            if "." in key or not PHI_TYPES.intersection(row[0]) or name in covered[rtype]:
                continue
            why = knowingly_clear.get(f"{rtype}.{name}") or reason
            kinds = "/".join(sorted(PHI_TYPES.intersection(row[0])))
            out.append(
                Finding("info", "knowingly-clear", f"{rtype}.{name}: left clear: {why}")
                if why
                else Finding(
                    "warning",
                    "clear-phi-element",
                    f"{rtype}.{name} ({kinds}) is commonly personal data and no rule encrypts it",
                )
            )
    return out
