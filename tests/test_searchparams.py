"""The R4 search parameter table and the reduction of its expressions to element paths."""

from __future__ import annotations

import pytest

from proxy.policy import definitions as defs
from proxy.policy.searchparams import ParamPath, SearchParam, element_paths, search_param, search_params, table

PATIENT_CODES = {
    "active", "address", "address-city", "address-country", "address-postalcode", "address-state", "address-use",
    "birthdate", "death-date", "deceased", "email", "family", "gender", "general-practitioner", "given",
    "identifier", "language", "link", "name", "organization", "phone", "phonetic", "telecom",
}  # fmt: skip
COMMON = {"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source", "_content", "_query", "_has", "_list"}
# Parameters whose expressions cannot be reduced to paths: no expression at all, or FHIRPath
# beyond navigation (Patient.deceased.exists() and Patient.deceased != false).
UNKNOWN = {"_content", "_has", "_list", "_query", "_text", "_type", "deceased"}


def paths(resource_type: str, code: str) -> list[ParamPath]:
    param = search_param(resource_type, code)
    assert param is not None, f"{resource_type}?{code}"
    result = element_paths(param)
    assert result is not None, f"{resource_type}?{code} is unknown"
    return result


def dotted(resource_type: str, code: str) -> list[str]:
    return [p.dotted for p in paths(resource_type, code)]


def test_every_concrete_resource_type_is_listed():
    assert set(table()["resources"]) == defs.resource_types()
    assert table()["fhirVersion"] == "4.0.1"


def test_patient_parameters():
    own = set(table()["params"]["Patient"])
    assert own == PATIENT_CODES  # R4 core only: no US Core race/ethnicity, no Medplum extras
    expected = {
        "identifier": ("token", ("Patient.identifier",)),
        "name": ("string", ("Patient.name",)),
        "family": ("string", ("Patient.name.family",)),
        "given": ("string", ("Patient.name.given",)),
        "birthdate": ("date", ("Patient.birthDate",)),
        "telecom": ("token", ("Patient.telecom",)),
        "phone": ("token", ("Patient.telecom.where(system='phone')",)),
        "email": ("token", ("Patient.telecom.where(system='email')",)),
        "address": ("string", ("Patient.address",)),
        "gender": ("token", ("Patient.gender",)),
    }
    for code, (kind, expressions) in expected.items():
        param = search_param("Patient", code)
        assert (param.type, param.expressions) == (kind, expressions), code
    assert dotted("Patient", "family") == ["name.family"]
    assert dotted("Patient", "birthdate") == ["birthDate"]
    gp = search_param("Patient", "general-practitioner")
    assert gp.type == "reference" and gp.targets == ("Organization", "Practitioner", "PractitionerRole")


def test_phone_is_telecom_with_a_criterion():
    assert paths("Patient", "phone") == [ParamPath(("telecom",), (("telecom.system", "phone"),))]
    assert paths("Practitioner", "email") == [ParamPath(("telecom",), (("telecom.system", "email"),))]


def test_observation_parameters():
    assert search_param("Observation", "code").expressions == ("Observation.code",)
    vq = search_param("Observation", "value-quantity")
    assert vq.type == "quantity"
    assert [(p.path, p.choice_type, p.json_path) for p in element_paths(vq)] == [
        (("value",), "Quantity", ("valueQuantity",)),
        (("value",), "SampledData", ("valueSampledData",)),
    ]
    subject = search_param("Observation", "subject")
    assert subject.type == "reference" and {"Patient", "Group"} <= set(subject.targets)
    assert dotted("Observation", "subject") == ["subject"]
    # restricted to Observation out of the union over 32 resource types
    assert search_param("Observation", "patient").expressions == ("Observation.subject.where(resolve() is Patient)",)
    assert paths("Observation", "patient") == [ParamPath(("subject",), (("subject.resolve()", "Patient"),))]
    assert search_param("Observation", "date").expressions == ("Observation.effective",)
    assert paths("Observation", "date") == [ParamPath(("effective",))]  # every type of the choice
    composite = search_param("Observation", "component-code-value-quantity")
    assert composite.type == "composite"
    assert composite.expressions == ("Observation.component",)
    assert composite.components == (("component-code", "code"), ("component-value-quantity", "value.as(Quantity)"))
    assert [p.json_path for p in element_paths(composite)] == [("component", "code"), ("component", "valueQuantity")]
    # "Observation | Observation.component": the composite reads both levels
    assert [p.json_path for p in paths("Observation", "combo-code-value-quantity")] == [
        ("code",),
        ("valueQuantity",),
        ("component", "code"),
        ("component", "valueQuantity"),
    ]
    # a choice selected in the middle of the path
    assert [p.json_path for p in paths("Observation", "value-string")] == [
        ("valueString",),
        ("valueCodeableConcept", "text"),
    ]


def test_condition_medication_request_and_encounter_parameters():
    assert search_param("Condition", "code").expressions == ("Condition.code",)
    assert search_param("Condition", "subject").targets == ("Group", "Patient")
    assert [p.json_path for p in paths("Condition", "onset-date")] == [("onsetDateTime",), ("onsetPeriod",)]
    assert [p.json_path for p in paths("Condition", "onset-age")] == [("onsetAge",), ("onsetRange",)]
    code = search_param("MedicationRequest", "code")
    assert code.expressions == ("(MedicationRequest.medication as CodeableConcept)",)
    assert paths("MedicationRequest", "code") == [ParamPath(("medication",), (), "CodeableConcept", 0)]
    medication = search_param("MedicationRequest", "medication")
    assert medication.type == "reference" and medication.targets == ("Medication",)
    assert [p.json_path for p in element_paths(medication)] == [("medicationReference",)]
    assert dotted("MedicationRequest", "subject") == ["subject"]
    assert search_param("Encounter", "reason-code").expressions == ("Encounter.reasonCode",)
    assert dotted("Encounter", "reason-code") == ["reasonCode"]
    assert dotted("Encounter", "subject") == ["subject"]


def test_common_parameters_apply_to_every_type():
    for resource_type in defs.resource_types():
        params = search_params(resource_type)
        assert set(params) >= COMMON, resource_type
        assert params["_id"].expressions == (f"{resource_type}.id",)
        assert params["_lastUpdated"] == SearchParam("_lastUpdated", "date", (f"{resource_type}.meta.lastUpdated",))
        assert dotted(resource_type, "_lastUpdated") == ["meta.lastUpdated"]
        assert ("_text" in params) == (resource_type not in {"Binary", "Bundle", "Parameters"})
    assert search_param("Patient", "nope") is None
    assert search_param("NotAType", "_id") is None
    assert search_params("NotAType") == {}


def test_any_resource_targets_are_expanded():
    focus = search_param("Observation", "focus")
    assert len(focus.targets) == len(table()["anyTargets"]) > 100
    assert "Patient" in focus.targets


def test_unparseable_expressions_give_the_unknown_sentinel():
    assert element_paths(search_param("Patient", "_text")) is None
    assert element_paths(search_param("Patient", "_content")) is None
    assert element_paths(search_param("Patient", "deceased")) is None
    for expression in (
        "Patient.name.first()",
        "Patient.extension('http://x').value",
        "Patient.name.where(use='official' or use='usual')",
        "Patient.name.select(given)",
        "Patient.telecom.where(system=%phone)",
        "Patient.birthDate > @2000-01-01",
        "(Patient.name",
        "%resource.name",
        "name",
        "",
    ):
        assert element_paths(SearchParam("x", "string", (expression,))) is None, expression
    # one unknown alternative makes the whole parameter unknown
    assert element_paths(SearchParam("x", "string", ("Patient.name", "Patient.name.exists()"))) is None


def test_only_the_expected_parameters_are_unknown():
    unknown = {
        code
        for resource_type in defs.resource_types()
        for code, param in search_params(resource_type).items()
        if element_paths(param) is None
    }
    assert unknown == UNKNOWN


def _resolve(resource_type: str, param_path: ParamPath) -> str | None:
    """Walk the path through the R4 element table; an error message if it does not exist."""
    owner, prefix = resource_type, ""
    for i, name in enumerate(param_path.path):
        rows = defs.elements(owner)
        key = next((k for k in (prefix + name, prefix + name + "[x]") if k in rows), None)
        if key is None:
            return f"{owner}.{prefix}{name} does not exist"
        row = rows[key]
        types = row[0]
        if param_path.choice_step == i:
            if not key.endswith("[x]") or param_path.choice_type not in types:
                return f"{owner}.{key}: {param_path.choice_type} is not one of its types {types}"
            types = [param_path.choice_type]
        if i == len(param_path.path) - 1:
            return None
        if len(row) > 4:
            prefix = row[4] + "."
        elif types in (["BackboneElement"], ["Element"]):
            prefix = key + "."
        elif len(types) == 1 and types[0] in defs.table()["types"]:
            owner, prefix = types[0], ""
        else:
            return f"{owner}.{key}: cannot navigate into {types}"
    return None


@pytest.mark.parametrize("resource_type", sorted(defs.resource_types()))
def test_every_path_exists_in_the_element_table(resource_type):
    problems = [
        (code, p.dotted, error)
        for code, param in search_params(resource_type).items()
        for p in element_paths(param) or ()
        if (error := _resolve(resource_type, p))
    ]
    assert problems == []
