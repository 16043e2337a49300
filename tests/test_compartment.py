"""The R4 Patient compartment table and the membership test on the read path."""

from __future__ import annotations

import pytest

from proxy.policy import compartment
from proxy.policy import definitions as defs
from proxy.policy.compartment import (
    compartment_params,
    compartment_types,
    in_compartment,
    patient_id,
    patient_references,
    reference_key_paths,
    table,
    unresolved_types,
)
from proxy.policy.searchparams import SearchParam


def ref(reference: str, **extra) -> dict:
    return {"reference": reference, **extra}


def test_table_shape():
    assert table()["fhirVersion"] == "4.0.1"
    assert compartment_types() <= defs.resource_types()
    assert len(compartment_types()) == 67
    assert compartment_params("Observation") == ("subject", "performer")
    assert compartment_params("Patient") == ("link",)
    assert compartment_params("AllergyIntolerance") == ("patient", "recorder", "asserter")
    assert compartment_params("Group") == ("member",)
    assert compartment_params("MedicationRequest") == ("subject",)  # not requester, in R4
    # listed by the definition without parameters: never in the compartment
    for never in ("Practitioner", "Organization", "Medication", "Device", "Location", "Bundle"):
        assert never not in compartment_types()
        assert compartment_params(never) == ()
    assert compartment_params("NotAType") == ()


def test_every_parameter_resolves_to_reference_elements():
    assert unresolved_types() == ()
    assert reference_key_paths("Observation") == (("subject",), ("performer",))
    assert reference_key_paths("Patient") == (("link", "other"),)
    assert reference_key_paths("Condition") == (("subject",), ("asserter",))  # patient = subject as Patient
    assert reference_key_paths("Invoice") == (("subject",), ("recipient",))  # subject and patient merged
    assert reference_key_paths("CarePlan") == (("subject",), ("activity", "detail", "performer"))
    assert reference_key_paths("AuditEvent") == (("agent", "who"), ("entity", "what"))
    assert reference_key_paths("Practitioner") == ()
    assert reference_key_paths("NotAType") == ()


def test_patient_reference_forms():
    assert patient_id("Patient/123") == "123"
    assert patient_id("Patient/a-b.C") == "a-b.C"
    assert patient_id("Patient/123/_history/4") == "123"
    assert patient_id("https://fhir.example.org/r4/Patient/123") == "123"
    assert patient_id("http://h/fhir/Patient/123/_history/v2") == "123"
    for other in (
        "#p1",
        "Practitioner/123",
        "Group/123",
        "NotPatient/1",
        "Foo/Patient/1",
        "https://h/fhir/NotPatient/1",
        "urn:uuid:0c5a5b0e-6c8b-4b0a-9f43-6b3f1f6f1d3e",
        "Patient/",
        "Patient/1/2",
        "Patient/1?x=y",
        "Patient/1/_history/",
        "Patient/has space",
        "Patient/" + "x" * 65,
        "https://h/fhir/Patient/1#frag",
    ):
        assert patient_id(other) is None, other


def test_observation():
    obs = {"resourceType": "Observation", "subject": ref("Patient/123", display="Budi")}
    assert patient_references(obs) == {"123"}
    assert in_compartment(obs, "123")
    assert not in_compartment(obs, "124")
    obs["performer"] = [ref("Practitioner/9"), ref("Patient/456"), ref("Organization/1")]
    assert patient_references(obs) == {"123", "456"}
    assert patient_references({"resourceType": "Observation", "subject": ref("Group/1")}) == set()
    assert patient_references({"resourceType": "Observation"}) == set()


def test_encounter():
    enc = {"resourceType": "Encounter", "subject": ref("Patient/p1"), "participant": [{"individual": ref("Patient/x")}]}
    assert patient_references(enc) == {"p1"}  # participant is not a compartment parameter


def test_medication_request_subject_only():
    mr = {"resourceType": "MedicationRequest", "subject": ref("Patient/p1"), "requester": ref("Patient/p2")}
    # the R4 definition links MedicationRequest by subject only; a Patient requester does not count
    assert patient_references(mr) == {"p1"}
    assert not in_compartment(mr, "p2")


def test_condition_subject_and_asserter():
    cond = {"resourceType": "Condition", "subject": ref("Patient/p1"), "asserter": ref("Patient/p2")}
    assert patient_references(cond) == {"p1", "p2"}
    cond = {"resourceType": "Condition", "subject": ref("Group/g"), "asserter": ref("Practitioner/d")}
    assert patient_references(cond) == set()


def test_allergy_intolerance():
    allergy = {
        "resourceType": "AllergyIntolerance",
        "patient": ref("Patient/p1"),
        "recorder": ref("Patient/p2"),
        "asserter": ref("RelatedPerson/r"),
    }
    assert patient_references(allergy) == {"p1", "p2"}
    allergy["asserter"] = ref("Patient/p3")
    assert patient_references(allergy) == {"p1", "p2", "p3"}


def test_communication():
    comm = {
        "resourceType": "Communication",
        "subject": ref("Patient/s"),
        "sender": ref("Patient/from"),
        "recipient": [ref("Practitioner/d"), ref("Patient/to1"), ref("Patient/to2")],
    }
    assert patient_references(comm) == {"s", "from", "to1", "to2"}


def test_patient_itself_and_links():
    patient = {"resourceType": "Patient", "id": "p1"}
    assert patient_references(patient) == {"p1"}
    patient["link"] = [
        {"other": ref("Patient/p2"), "type": "replaces"},
        {"other": ref("RelatedPerson/r1"), "type": "seealso"},
        {"other": ref("https://other.example/fhir/Patient/p3/_history/1"), "type": "seealso"},
    ]
    assert patient_references(patient) == {"p1", "p2", "p3"}
    assert patient_references({"resourceType": "Patient"}) == set()  # no id yet (create)
    assert patient_references({"resourceType": "Patient", "id": "bad id"}) == set()


def test_group_members():
    group = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [{"entity": ref("Patient/a")}, {"entity": ref("Patient/b")}, {"entity": ref("Practitioner/c")}],
    }
    assert patient_references(group) == {"a", "b"}


def test_nested_backbones():
    plan = {
        "resourceType": "CarePlan",
        "subject": ref("Group/g"),
        "activity": [
            {"detail": {"performer": [ref("Patient/a"), ref("Practitioner/x")]}},
            {"reference": ref("ServiceRequest/1")},
            {"detail": {"performer": [ref("Patient/b")]}},
        ],
    }
    assert patient_references(plan) == {"a", "b"}
    event = {
        "resourceType": "AuditEvent",
        "agent": [{"who": ref("Practitioner/1")}, {"who": ref("Patient/a")}],
        "entity": [{"what": ref("Patient/b")}, {"what": ref("Observation/o")}],
    }
    assert patient_references(event) == {"a", "b"}


def test_absolute_and_versioned_references():
    obs = {"resourceType": "Observation", "subject": ref("https://fhir.example.org/r4/Patient/123/_history/7")}
    assert patient_references(obs) == {"123"}
    obs = {"resourceType": "Observation", "subject": ref("Patient/123/_history/7")}
    assert patient_references(obs) == {"123"}


def test_ignored_references():
    for subject in (
        {"display": "Patient/123"},
        {"identifier": {"system": "https://fhir.kemkes.go.id/id/nik", "value": "123"}, "type": "Patient"},
        ref("#p1"),
        ref("urn:uuid:0c5a5b0e-6c8b-4b0a-9f43-6b3f1f6f1d3e"),
        ref("Device/d"),
        {"reference": 123},
        "Patient/123",
        [ref("Patient/123")],  # wrong shape for a 0..1 element: still read as a list of references
    ):
        obs = {"resourceType": "Observation", "subject": subject}
        expected = {"123"} if isinstance(subject, list) else set()
        assert patient_references(obs) == expected, subject
    # compartment membership comes only from compartment parameters
    obs = {"resourceType": "Observation", "focus": [ref("Patient/1")], "hasMember": [ref("Patient/2")]}
    assert patient_references(obs) == set()


def test_resources_outside_the_compartment():
    practitioner = {"resourceType": "Practitioner", "id": "d1", "extension": [{"valueReference": ref("Patient/1")}]}
    assert patient_references(practitioner) == set()
    assert patient_references({"resourceType": "Organization", "id": "o"}) == set()
    assert patient_references({"resourceType": "NotAType", "subject": ref("Patient/1")}) == set()
    assert patient_references({"subject": ref("Patient/1")}) == set()
    assert patient_references({"resourceType": ["Observation"], "subject": ref("Patient/1")}) == set()


@pytest.fixture
def fresh_cache():
    compartment._key_paths.cache_clear()
    yield
    compartment._key_paths.cache_clear()


@pytest.mark.parametrize(
    "expression",
    [
        "Observation.subject.first()",  # beyond navigation
        "Observation.subject.where(display='x')",  # a filter that would have to be evaluated
        "Observation.subject.where(resolve() is Group)",
        "Observation.code",  # not a Reference
        "Observation.nope",
    ],
)
def test_unresolvable_parameters_put_the_type_in_no_compartment(monkeypatch, fresh_cache, expression):
    real = compartment.search_param

    def fake(resource_type, code):
        if (resource_type, code) == ("Observation", "performer"):
            return SearchParam(code, "reference", (expression,), ("Patient",))
        return real(resource_type, code)

    monkeypatch.setattr(compartment, "search_param", fake)
    obs = {"resourceType": "Observation", "subject": ref("Patient/1"), "performer": [ref("Patient/2")]}
    assert patient_references(obs) == set()  # subject alone would resolve: the whole type falls back
    assert unresolved_types() == ("Observation",)
    assert reference_key_paths("Observation") is None
    assert patient_references({"resourceType": "Encounter", "subject": ref("Patient/1")}) == {"1"}


def test_choice_reference_elements_are_spelt_as_in_json(monkeypatch, fresh_cache):
    real = compartment.search_param

    def fake(resource_type, code):
        if (resource_type, code) == ("Observation", "performer"):
            return SearchParam(code, "reference", ("Observation.value",), ("Patient",))
        return real(resource_type, code)

    monkeypatch.setattr(compartment, "search_param", fake)
    # Observation.value[x] has no Reference option: unresolved, not guessed
    assert reference_key_paths("Observation") is None
    compartment._key_paths.cache_clear()

    def fake_extension(resource_type, code):
        if (resource_type, code) == ("Basic", "author"):
            return SearchParam(code, "reference", ("Basic.extension.value",), ("Patient",))
        return real(resource_type, code)

    monkeypatch.setattr(compartment, "search_param", fake_extension)
    assert reference_key_paths("Basic") == (("subject",), ("extension", "valueReference"))
    basic = {"resourceType": "Basic", "extension": [{"url": "u", "valueReference": ref("Patient/e")}]}
    assert patient_references(basic) == {"e"}
