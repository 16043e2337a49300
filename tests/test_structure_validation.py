"""The structural validator (``validate: structure``, the default) against fhir.resources (``full``).

Every valid resource the suite and the demo write passes both; each mutation that could carry a
value past the policy (an unknown element, a wrong JSON type, two types of one choice, a misused
``_twin``), at the top level, inside a data type, a backbone element or a nested resource, is
refused by both, naming the path and never the value; and through the proxy in front of the
real test server a create with a misspelt element holding a NIK is refused before anything is sent.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo.scenario import DIRECTORY, ORGANIZATION, transaction
from proxy.keymgmt.keyring import Keyring
from proxy.outcome import FhirError
from proxy.settings import BY_NAME
from proxy.transform.bodies import encrypt_for_write
from proxy.transform.structure import check_structure
from proxy.transform.validation import MODES, validate_resource, validator
from tests import test_auth, test_coverage, test_records
from tests.conftest import FHIR_JSON, FIXTURES, unit_policy
from tests.test_validation_messages import SAMPLES, WRONG_VALUES, _paths, _replace

NEEDLE = "3175042903870007"  # a NIK: it must never appear in a refusal
BOTH = pytest.mark.parametrize("validate", [check_structure, validate_resource], ids=["structure", "full"])


def _fixtures() -> dict[str, dict]:
    return {
        f"{p.parent.name}/{p.name}": json.loads(p.read_text())
        for p in sorted(FIXTURES.glob("*/*.json"))
        if p.name != "needles.json"
    }


def _written_by_tests_and_demo() -> dict[str, dict]:
    """The resources the suite writes (module constants) and the demo's transaction and directory."""
    out = {
        f"{module.__name__}.{name}": value
        for module in (test_records, test_auth, test_coverage)
        for name, value in vars(module).items()
        if name.isupper() and isinstance(value, dict) and isinstance(value.get("resourceType"), str)
    }
    out["demo transaction"] = transaction("org-1")[0]
    out["demo organization"] = ORGANIZATION
    out |= {f"demo {name}": resource for name, resource in DIRECTORY.items()}
    return out


VALID = _fixtures() | _written_by_tests_and_demo()


@BOTH
@pytest.mark.parametrize("name", sorted(VALID))
def test_every_resource_the_suite_and_the_demo_write_is_valid(name, validate):
    resource = copy.deepcopy(VALID[name])
    validate(resource)
    assert resource == VALID[name]  # validation never changes what is written


def test_the_collection_of_valid_resources_is_not_empty():
    kinds = {r["resourceType"] for r in VALID.values()}
    assert len(VALID) >= 40 and {"Patient", "Observation", "Bundle", "QuestionnaireResponse"} <= kinds


@pytest.mark.parametrize("name", sorted(_fixtures()))
def test_what_the_proxy_stores_is_structurally_valid_r4(name, satusehat):
    """The at-rest form (masked placeholders, nulls beside extensions, envelopes, index identifiers)."""
    resource = copy.deepcopy(_fixtures()[name])
    encrypt_for_write(resource, satusehat, Keyring.generate(), "off")
    check_structure(resource)


def _patient() -> dict:
    return copy.deepcopy(_fixtures()["satusehat/patient.json"])


def _set(*path: str | int, value: object) -> Callable[[dict], dict]:
    """A mutation of the SATUSEHAT Patient: ``value`` written at ``path``."""

    def mutate(resource: dict) -> dict:
        node = resource
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
        return resource

    return mutate


def _nested(container: str, inner: dict) -> Callable[[dict], dict]:
    def mutate(resource: dict) -> dict:
        if container == "contained":
            return resource | {"contained": [inner]}
        if container == "Bundle":
            return {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": resource}, {"resource": inner}],
            }
        part = {"name": "inner", "resource": inner}
        return {"resourceType": "Parameters", "parameter": [{"name": "outer", "part": [part]}]}

    return mutate


MISSPELT = {"resourceType": "Patient", "id": "c1", "identifer": [{"value": NEEDLE}]}

# (mutation of the SATUSEHAT Patient, the path the refusal must name)
MUTATIONS = {
    "unknown element, top level": (_set("nmae", value=[{"text": NEEDLE}]), "Patient.nmae"),
    "unknown element in HumanName": (_set("name", 0, "famliy", value=NEEDLE), "Patient.name[0].famliy"),
    "unknown element in a backbone": (_set("contact", 0, "nik", value=NEEDLE), "Patient.contact[0].nik"),
    "unknown element in Address in a backbone": (
        _set("contact", 0, "address", "kota", value=NEEDLE),
        "Patient.contact[0].address.kota",
    ),
    "unknown element in an extension": (_set("extension", 0, "nik", value=NEEDLE), "Patient.extension[0].nik"),
    "unknown element in contained": (_nested("contained", MISSPELT), "Patient.contained[0].identifer"),
    "unknown element in Bundle.entry.resource": (_nested("Bundle", MISSPELT), "Bundle.entry[1].resource.identifer"),
    "unknown element in Parameters.parameter.part.resource": (
        _nested("Parameters", MISSPELT),
        "Parameters.parameter[0].part[0].resource.identifer",
    ),
    "a key that is no element name": (_set("name", 0, f"NIK {NEEDLE}", value=1), "Patient.name[0]"),
    "unknown resource type in contained": (
        _nested("contained", {"resourceType": "Pasien", "nik": NEEDLE}),
        "Patient.contained[0].resourceType",
    ),
    "object instead of array": (_set("name", value={"text": NEEDLE}), "Patient.name"),
    "string instead of array": (_set("name", 0, "given", value=NEEDLE), "Patient.name[0].given"),
    "array instead of object": (_set("maritalStatus", value=[{"text": NEEDLE}]), "Patient.maritalStatus"),
    "string instead of object": (_set("contact", 0, "name", value=NEEDLE), "Patient.contact[0].name"),
    "number instead of string": (_set("identifier", 0, "value", value=int(NEEDLE)), "Patient.identifier[0].value"),
    "object instead of string": (_set("birthDate", value={"value": NEEDLE}), "Patient.birthDate"),
    "string instead of boolean": (_set("active", value=[NEEDLE]), "Patient.active"),
    "a day the calendar lacks": (_set("birthDate", value="1987-02-30"), "Patient.birthDate"),
    "base64 that does not decode": (_set("photo", 0, "data", value=NEEDLE[:7]), "Patient.photo[0].data"),
    "two types of one choice": (_set("deceasedDateTime", value="2020-01-01"), "Patient.deceased[x]"),
    "two types of a choice in an extension": (
        _set("extension", 1, "valueString", value=NEEDLE),
        "Patient.extension[1].value[x]",
    ),
    "twin that is a string": (_set("_birthDate", value=f"NIK {NEEDLE}"), "Patient._birthDate"),
    "twin that is an array": (_set("_birthDate", value=[{"id": "x"}]), "Patient._birthDate"),
    "twin entry that is a string": (_set("name", 0, "_given", value=[f"NIK {NEEDLE}"]), "Patient.name[0]._given[0]"),
    "twin of a complex element": (_set("_name", value={"id": "x"}), "Patient._name"),
}


@BOTH
@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_each_mutation_is_refused_by_path_without_its_value(case, validate):
    mutate, path = MUTATIONS[case]
    resource = mutate(_patient())
    with pytest.raises(FhirError) as caught:
        validate(resource)
    assert caught.value.status == 400
    expressions = [e for i in caught.value.issues for e in i.expression]
    assert path in expressions, [i.diagnostics for i in caught.value.issues]
    text = orjson.dumps(caught.value.outcome()).decode()
    assert NEEDLE not in text and NEEDLE[:8] not in text


# What fhir.resources lets through and the structural validator does not: each could store a value
# the policy never saw (a comment key, a resource without a type), or invalid FHIR under ciphertext.
STRICTER = {
    "fhir_comments": ({"resourceType": "Patient", "fhir_comments": [NEEDLE]}, "Patient"),
    "contained resource without resourceType": (
        {"resourceType": "Patient", "contained": [{"id": "c1", "name": [{"text": NEEDLE}]}]},
        "Patient.contained[0].resourceType",
    ),
    "boolean as a string": ({"resourceType": "Patient", "active": "true"}, "Patient.active"),
    "decimal as a string": (
        {"resourceType": "Observation", "status": "final", "code": {"text": "Hb"}, "valueQuantity": {"value": "1.5"}},
        "Observation.valueQuantity.value",
    ),
    "two choice types through a twin": (
        {"resourceType": "Patient", "deceasedBoolean": True, "_deceasedDateTime": {"id": "x"}},
        "Patient.deceased[x]",
    ),
    "null in a repeating primitive without extensions": (
        {"resourceType": "Patient", "name": [{"given": [NEEDLE, None]}]},
        "Patient.name[0].given[1]",
    ),
    "twin array of another length": (
        {"resourceType": "Patient", "name": [{"given": [NEEDLE, "Budi"], "_given": [None]}]},
        "Patient.name[0]._given",
    ),
    "non-R4 Meta element (in Medplum's definitions)": (
        {"resourceType": "Patient", "meta": {"author": {"display": NEEDLE}}},
        "Patient.meta.author",
    ),
    "null where R4 expects a value": ({"resourceType": "Patient", "gender": None}, "Patient.gender"),
    "uri with whitespace": (
        {"resourceType": "Patient", "identifier": [{"system": "nik ktp"}]},
        "Patient.identifier[0].system",
    ),
}


@pytest.mark.parametrize("case", sorted(STRICTER))
def test_structure_also_refuses_what_full_lets_through(case):
    resource, path = STRICTER[case]
    with pytest.raises(FhirError) as caught:
        check_structure(copy.deepcopy(resource))
    assert path in [e for i in caught.value.issues for e in i.expression]
    assert NEEDLE not in orjson.dumps(caught.value.outcome()).decode()


@BOTH
def test_a_twin_holding_a_string_that_parses_as_json_is_a_400(validate):
    """fhir.resources parses such a string as JSON and its own validator fails on the number (was a 500)."""
    with pytest.raises(FhirError) as caught:
        validate({"resourceType": "Patient", "_birthDate": NEEDLE})
    assert caught.value.status == 400
    assert NEEDLE not in orjson.dumps(caught.value.outcome()).decode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([*WRONG_VALUES, None, "", "2023-02-30", "QUI"]))
def test_whatever_full_refuses_structure_refuses_too(data, wrong):
    """On the SATUSEHAT fixtures with one value replaced anywhere (an exhaustive run of this corpus,
    19,605 mutations, found no exception once calendar days and base64 quanta were checked)."""
    sample = copy.deepcopy(data.draw(st.sampled_from(SAMPLES)))
    _replace(sample, data.draw(st.sampled_from(_paths(sample))), copy.deepcopy(wrong))
    try:
        validate_resource(copy.deepcopy(sample))
    except FhirError:
        with pytest.raises(FhirError):
            check_structure(sample)


def test_an_element_typed_as_one_resource_takes_only_that_resource():
    """Bundle.entry.response.outcome is an OperationOutcome; a Patient there would be checked as nothing."""
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]}
    entry = {"response": {"status": "400", "outcome": outcome}}
    check_structure({"resourceType": "Bundle", "type": "batch-response", "entry": [entry]})
    entry["response"]["outcome"] = {"resourceType": "Patient", "name": [{"text": NEEDLE}]}
    with pytest.raises(FhirError) as caught:
        check_structure({"resourceType": "Bundle", "type": "batch-response", "entry": [entry]})
    assert [i.diagnostics for i in caught.value.issues] == [
        "Bundle.entry[0].response.outcome.resourceType: expected an OperationOutcome"
    ]


def test_valid_uses_of_twins_and_nulls_pass():
    resource = {
        "resourceType": "Patient",
        "name": [{"given": ["Budi", None], "_given": [None, {"extension": [{"url": "u", "valueCode": "masked"}]}]}],
        "_birthDate": {"extension": [{"url": "u", "valueCode": "masked"}]},
        "deceasedBoolean": False,
        "_deceasedBoolean": {"id": "d"},
        "contained": [{"resourceType": "Organization", "id": "o1", "name": "RS"}],
    }
    check_structure(resource)


def test_a_required_element_may_be_present_by_its_extensions_only():
    """Observation.status is 1..1; a status with only a data-absent-reason is present."""
    absent = {
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}]
    }
    check_structure({"resourceType": "Observation", "_status": absent, "code": {"text": "Hb"}})
    with pytest.raises(FhirError) as caught:
        check_structure({"resourceType": "Observation", "code": {"text": "Hb"}})
    assert caught.value.issues[0].diagnostics.startswith(
        "Observation.status: required element is missing; expected a code"
    )


def test_a_deep_body_is_walked_without_recursion():
    """The walk keeps its own stack: nesting far beyond Python's recursion limit is checked, not a crash."""
    inner: dict = {"url": "u", "valueString": "x"}
    for _ in range(5000):
        inner = {"url": "u", "extension": [inner]}
    check_structure({"resourceType": "Patient", "extension": [inner]})
    inner["extension"][0]["nmae"] = NEEDLE
    with pytest.raises(FhirError) as caught:
        check_structure({"resourceType": "Patient", "extension": [inner]})
    assert caught.value.issues[0].diagnostics.endswith(".nmae: unknown element (not defined by FHIR R4 here)")


def test_issues_are_capped():
    resource = {"resourceType": "Patient", **{f"x{i}": NEEDLE for i in range(50)}}
    with pytest.raises(FhirError) as caught:
        check_structure(resource)
    assert len(caught.value.issues) == 20


@pytest.mark.parametrize("resource", [{"resourceType": "Pasien"}, {"resourceType": 5}, {"name": []}])
@BOTH
def test_an_unknown_resource_type_is_refused(resource, validate):
    with pytest.raises(FhirError, match="resourceType is missing or not a known FHIR resource type"):
        validate(resource)


def test_the_settings_name_the_validators():
    assert BY_NAME["validate"].choices == MODES  # the option and the core agree on the names
    assert validator("structure") is check_structure and validator("full") is validate_resource
    assert validator("off") is None
    with pytest.raises(ValueError, match="use one of structure, full, off"):
        validator(True)  # type: ignore[arg-type]


# ------------------------------------------------------------- through the proxy, in front of the real server
MISSPELT_NIK = {
    "resourceType": "Patient",
    "identifer": [{"system": "https://fhir.kemkes.go.id/id/nik", "value": NEEDLE}],  # identifier, misspelt
    "name": [{"family": "Santoso"}],
}


@pytest.mark.parametrize("mode", ["structure", "full"])
async def test_a_misspelt_element_carrying_a_nik_is_refused_and_nothing_reaches_the_server(
    proxy_for, clean_upstream, mode
):
    client = await proxy_for(clean_upstream.base_url, unit_policy(), validate=mode)
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(MISSPELT_NIK), headers=FHIR_JSON)
    outcome = await resp.json()
    assert resp.status == 400, outcome
    assert outcome["resourceType"] == "OperationOutcome"
    assert [i["diagnostics"] for i in outcome["issue"]] == [
        "Patient.identifer: unknown element (not defined by FHIR R4 here)"
    ]
    assert NEEDLE not in orjson.dumps(outcome).decode()
    assert clean_upstream.requests() == []
    assert clean_upstream.dump() == []


async def test_with_validation_off_the_misspelt_element_reaches_the_server_in_the_clear(proxy_for, clean_upstream):
    """Why validation is on by default: the policy never sees ``identifer``, so nothing encrypts it (the
    unit policy has no PHI sentinel); the server refuses the unknown element only after it has received it."""
    client = await proxy_for(clean_upstream.base_url, unit_policy(), validate="off")
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(MISSPELT_NIK), headers=FHIR_JSON)
    assert resp.status == 400  # the server's own refusal
    assert [NEEDLE in str(r["body"]) for r in clean_upstream.requests()] == [True]
