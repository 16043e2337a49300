"""Which patient's key wraps a resource's data key (``keys.per_patient``), and which patient
keys a response needs.

The rule, decided from the plaintext resource before it is encrypted:

* a Patient uses its own key (its ``id``); a Patient created without an id (the server will
  assign it) gets a key bound to it once the response names the id (:data:`PENDING`);
* any other resource uses the key of the one patient whose compartment it is in
  (:func:`proxy.policy.compartment.patient_references`: ``Observation.subject``,
  ``Encounter.subject``, ``Communication.sender``/``recipient`` … as the R4 compartment
  definition says);
* in several patients' compartments, or in none: no patient key - the keyring's master key
  (so shredding one of those patients does not reach it; see docs/key-management.md);
* a resource nested in another (contained, a stored Bundle's entries) uses its own patient
  when it has exactly one, else its container's key.
"""

from __future__ import annotations

from collections.abc import Collection

from proxy.keymgmt.patientkeys import is_handle
from proxy.policy.compartment import patient_references
from proxy.transform import markers as mk
from proxy.transform.bodies import nested_resources
from proxy.transform.jsontypes import JSON

PENDING = ""  # the subject of a Patient written without an id


def key_subject(resource: JSON) -> str | None:
    """The patient id whose key wraps ``resource``, PENDING, or None for the master key."""
    if resource.get("resourceType") == "Patient":
        own = resource.get("id")
        if own is None:
            return PENDING
        refs = patient_references({"resourceType": "Patient", "id": own})
        return next(iter(refs)) if refs else None
    refs = patient_references(resource)
    return next(iter(refs)) if len(refs) == 1 else None


def write_subjects(resource: JSON, covered: Collection[str]) -> set[str]:
    """Every subject (:func:`key_subject`) of a resource of a ``covered`` type in a body to be written:
    the resource and those nested in it (uncovered types are not encrypted, so they need no key)."""
    found = (resource, *(inner for inner, _ in nested_resources(resource, "")))
    out = {key_subject(r) for r in found if r.get("resourceType") in covered}
    out.discard(None)
    return out  # type: ignore[return-value]


def envelope_handles(body: JSON) -> dict[str, list[JSON]]:
    """Patient-key handles named by envelopes anywhere in a response body, with the resources
    that carry them (so a Patient's still unbound key can be bound from its id)."""
    out: dict[str, list[JSON]] = {}
    for resource in (body, *(r for r, _ in nested_resources(body, ""))):
        exts = resource.get("extension")
        if type(exts) is not list:
            continue
        for ext in exts:
            if type(ext) is dict and ext.get("url") == mk.ENVELOPE_URL and type(ext.get("valueString")) is str:
                parts = ext["valueString"].split(".")
                if len(parts) == 5 and is_handle(parts[1]):
                    out.setdefault(parts[1], []).append(resource)
    return out
