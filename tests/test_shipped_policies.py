"""The shipped policies against realistic resources, through the proxy, on the real upstream.

Every fixture is written and read back through the proxy and must come back exactly as
written; everything the upstream stores (all versions) and every request it received is
then scanned for every plaintext value listed in the fixtures' needles.json.
"""

from __future__ import annotations

import copy
import json
import re

import orjson
import pytest

from proxy.keymgmt.keyring import Keyring
from proxy.policy.closed import canonical
from proxy.policy.compiler import compile_file
from proxy.policy.lint import SATUSEHAT_SYSTEMS, near_miss
from proxy.transform.records import ReadReport, decrypt_resource, encrypt_resource
from tests.conftest import DEPLOYMENT, FHIR_JSON, FIXTURES, ROOT, assert_no_plaintext

ORDER = {
    "satusehat": [
        "patient.json",
        "patient-newborn.json",
        "related-person.json",
        "coverage.json",
        "encounter.json",
        "condition.json",
        "observation-hemoglobin.json",
        "observation-blood-pressure.json",
        "diagnostic-report.json",
        "medication-request.json",
        "medication-dispense.json",
        "allergy-intolerance.json",
        "procedure.json",
        "communication.json",
        "composition.json",
        "practitioner.json",
        "questionnaire-response.json",
        "service-request.json",
        "imaging-study.json",
        "specimen.json",
        "care-plan.json",
        "immunization.json",
    ],
    "hipaa": [
        "patient.json",
        "coverage.json",
        "encounter.json",
        "condition.json",
        "observation.json",
        "medication-request.json",
        "document-reference.json",
    ],
}
# Placeholder -> the fixture whose server id replaces it; the rest get fixed ids of resources that
# are referenced but not part of the scenario.
CREATED_IDS = {
    "patient.json": "PATIENT_ID",
    "patient-newborn.json": "NEWBORN_ID",
    "encounter.json": "ENCOUNTER_ID",
    "condition.json": "CONDITION_ID",
    "observation-hemoglobin.json": "OBSERVATION_ID",
    "observation.json": "OBSERVATION_ID",
    "medication-request.json": "MEDICATIONREQUEST_ID",
    "service-request.json": "SERVICEREQUEST_ID",
}
FIXED_IDS = {
    "ORGANIZATION_ID": "org-1",
    "PRACTITIONER_ID": "prac-1",
    "PHARMACIST_ID": "prac-2",
    "LOCATION_ID": "loc-1",
    "PAYOR_ID": "org-2",
}


def _fixture(policy: str, name: str, ids: dict[str, str]) -> dict:
    text = (FIXTURES / policy / name).read_text()
    for placeholder, value in {**FIXED_IDS, **ids}.items():
        text = text.replace(placeholder, value)
    return json.loads(text)


def _without_server_meta(resource: dict) -> dict:
    out = copy.deepcopy(resource)
    out.pop("id", None)
    meta = out.get("meta", {})
    for key in ("versionId", "lastUpdated", "source"):  # HAPI stamps its request id into meta.source
        meta.pop(key, None)
    if not meta:
        out.pop("meta", None)
    return out


async def write_every_fixture(client, policy_name: str, ids: dict[str, str] | None = None) -> list[str]:
    """Create, read back and update every fixture of a shipped policy through the proxy (each must come
    back exactly as written); returns the plaintext needles written. ``ids`` pre-fills placeholders."""
    needles = json.loads((FIXTURES / policy_name / "needles.json").read_text())
    ids = dict(ids or {})
    written: list[str] = []
    for name in ORDER[policy_name]:
        resource = _fixture(policy_name, name, ids)
        rtype = resource["resourceType"]
        resp = await client.post(f"/fhir/R4/{rtype}", data=orjson.dumps(resource), headers=FHIR_JSON)
        assert resp.status == 201, f"{name}: {await resp.text()}"
        created = await resp.json()
        if name in CREATED_IDS:
            ids[CREATED_IDS[name]] = created["id"]
        back = await (await client.get(f"/fhir/R4/{rtype}/{created['id']}")).json()
        assert _without_server_meta(back) == resource, name
        assert _without_server_meta(created) == resource, name
        update = {**resource, "id": created["id"]}
        resp = await client.put(f"/fhir/R4/{rtype}/{created['id']}", data=orjson.dumps(update), headers=FHIR_JSON)
        assert resp.status == 200, f"{name}: {await resp.text()}"
        written.extend(needles[name])
    return written


@pytest.mark.parametrize("policy_name", sorted(ORDER))
async def test_every_fixture_round_trips_and_nothing_is_plaintext_at_rest(proxy_for, clean_upstream, policy_name):
    policy = compile_file(ROOT / "policies" / f"{policy_name}.yaml")
    client = await proxy_for(clean_upstream.base_url, policy)
    written = await write_every_fixture(client, policy_name)
    assert_no_plaintext(clean_upstream.dump(), written)
    assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), written)


@pytest.mark.parametrize("policy_name", sorted(ORDER))
def test_every_group_of_the_policy_is_exercised_by_the_fixtures(policy_name):
    """A group nobody's data falls into would make the round trip above prove nothing about it."""
    policy = compile_file(ROOT / "policies" / f"{policy_name}.yaml")
    ring = Keyring.generate()
    resources = [_fixture(policy_name, name, {}) for name in ORDER[policy_name]]
    exercised = set()
    for group in policy.groups:
        for resource in resources:
            rp = policy.for_type(resource["resourceType"])
            stored = copy.deepcopy(resource)
            encrypt_resource(stored, rp, ring)
            report = ReadReport()
            decrypt_resource(stored, rp, ring, frozenset(policy.groups) - {group}, policy.unenveloped, report)
            if report.masked:
                exercised.add(group)
                break
    assert exercised == set(policy.groups)


# --- SATUSEHAT profiles ------------------------------------------------------------------------------
# What the published SATUSEHAT profiles and the SATUSEHAT API let an EMR write: identifier systems
# and extension URLs of the 16 profiled types, with where each was found (docs/policy-format.md,
# "SATUSEHAT profile review", lists the sources and their versions). <org> is the organisation id.
IG = "hi-dinanti/genomics-implementation-guide input/fsh (SATUSEHAT profiles fhir.kemkes.go.id/r4, v0.1.0)"
SDK = "agumil/satusehat-sdk src/Terminology/KemKes/IdentifierSystem.php, src/DataType/Extension*.php"
API = "ivanwilliammd/satusehat-integration src/SSResponse/SSValidationError.php, src/FHIR/*.php, tests/FHIR/*.php"
ORG = DEPLOYMENT["FHIRCRYPT_ORGANIZATION_ID"]
PROFILE_SYSTEMS = [  # (type, identifier path, system, source)
    ("Patient", "identifier", "https://fhir.kemkes.go.id/id/nik", SDK),
    ("Patient", "identifier", "https://fhir.kemkes.go.id/id/nik-ibu", SDK),
    ("Patient", "identifier", "https://fhir.kemkes.go.id/id/paspor", SDK),
    ("Patient", "identifier", "https://fhir.kemkes.go.id/id/kk", "SATUSEHAT Patient examples (kk)"),
    ("Patient", "identifier", "https://fhir.kemkes.go.id/id/ihs-number", SDK),
    ("Patient", "identifier", "https://fhir.kemkes.go.id/id/patient-ihs-number", IG + " Patient.fsh"),
    ("Patient", "identifier", f"http://sys-ids.kemkes.go.id/mr/{ORG}", "SATUSEHAT MRN convention"),
    ("Practitioner", "identifier", "https://fhir.kemkes.go.id/id/nik", SDK),
    ("Practitioner", "identifier", "https://fhir.kemkes.go.id/id/nakes-his-number", SDK),
    ("Practitioner", "identifier", "https://fhir.kemkes.go.id/id/sip-number", API),
    ("Encounter", "identifier", f"http://sys-ids.kemkes.go.id/encounter/{ORG}", SDK),
    ("Encounter", "episodeOfCare.identifier", f"http://sys-ids.kemkes.go.id/episode-of-care/{ORG}", API),
    ("Condition", "identifier", f"http://sys-ids.kemkes.go.id/condition/{ORG}", SDK),
    ("Observation", "identifier", f"http://sys-ids.kemkes.go.id/observation/{ORG}", SDK),
    ("MedicationRequest", "identifier", f"http://sys-ids.kemkes.go.id/prescription/{ORG}", API),
    ("MedicationRequest", "identifier", f"http://sys-ids.kemkes.go.id/prescription-item/{ORG}", API),
    ("Composition", "identifier", f"http://sys-ids.kemkes.go.id/composition/{ORG}", IG + " Composition.fsh"),
    ("QuestionnaireResponse", "identifier", f"http://sys-ids.kemkes.go.id/questionnaireresponse/{ORG}", API),
    ("AllergyIntolerance", "identifier", f"http://sys-ids.kemkes.go.id/allergy/{ORG}", SDK),
    ("Procedure", "identifier", f"http://sys-ids.kemkes.go.id/procedure/{ORG}", SDK),
    ("ServiceRequest", "identifier", f"http://sys-ids.kemkes.go.id/servicerequest/{ORG}", API),
    ("ServiceRequest", "identifier", f"http://sys-ids.kemkes.go.id/acsn/{ORG}", "SATUSEHAT DICOM router examples"),
    ("Specimen", "identifier", f"http://sys-ids.kemkes.go.id/specimen/{ORG}", API),
    ("Specimen", "accessionIdentifier", f"http://sys-ids.kemkes.go.id/acsn/{ORG}", IG + " Specimen.fsh"),
    (
        "DiagnosticReport",
        "identifier",
        f"http://sys-ids.kemkes.go.id/diagnostic/{ORG}/lab",
        IG + " DiagnosticReport.fsh",
    ),
    ("DiagnosticReport", "identifier", f"http://sys-ids.kemkes.go.id/diagnostic/{ORG}/rad", API),
    ("ImagingStudy", "identifier", f"http://sys-ids.kemkes.go.id/acsn/{ORG}", "SATUSEHAT DICOM router examples"),
    ("ImagingStudy", "identifier", "urn:dicom:uid", "SATUSEHAT DICOM router examples"),
    ("CarePlan", "identifier", f"http://sys-ids.kemkes.go.id/careplan/{ORG}", API),
    ("Immunization", "identifier", f"http://sys-ids.kemkes.go.id/immunization/{ORG}", API),
]
PROFILE_EXTENSIONS = [  # (type, element holding the extension or "" for the resource, URL, source)
    ("Patient", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/birthPlace", SDK),
    ("Patient", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/citizenshipStatus", SDK),
    ("Patient", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/patient-birthPlace", IG + " BirthPlace.fsh"),
    ("Patient", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/patient-citizenship", IG + " Citizenship.fsh"),
    ("Patient", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/patient-religion", IG + " Religion.fsh"),
    ("Patient", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/patient-disability", IG + " Disability.fsh"),
    ("Patient", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/Education", IG + " Education.fsh"),
    (
        "Patient",
        "_birthDate",
        "https://fhir.kemkes.go.id/r4/StructureDefinition/patient-birthTime",
        IG + " BirthTime.fsh",
    ),
    ("Patient", "address", "https://fhir.kemkes.go.id/r4/StructureDefinition/administrativeCode", SDK),
    ("Practitioner", "address", "https://fhir.kemkes.go.id/r4/StructureDefinition/administrativeCode", IG),
    ("Encounter", "location", "https://fhir.kemkes.go.id/r4/StructureDefinition/ServiceClass", SDK),
    ("Composition", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/statusCode", IG + " DocumentStatus.fsh"),
    ("Specimen", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/TransportedTime", SDK),
    ("Specimen", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/TransportedPerson", API),
    ("Specimen", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/ReceivedPerson", API),
    ("Specimen", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/ConditionHistory", IG + " ConditionHistory.fsh"),
    ("Specimen", "collection", "https://fhir.kemkes.go.id/r4/StructureDefinition/CollectorOrganization", IG),
    ("Medication", "", "https://fhir.kemkes.go.id/r4/StructureDefinition/MedicationType", SDK),
]
# What the shipped policy leaves readable on purpose, with the reason its comments give.
KNOWINGLY_CLEAR_EXTENSIONS = {
    "https://fhir.kemkes.go.id/r4/StructureDefinition/MedicationType": "describes the medicine; in extensions.clear",
    "https://fhir.kemkes.go.id/r4/StructureDefinition/CollectorOrganization": "an Organization; in extensions.clear",
}
NEEDLE = "Zq7needle"


def _shipped_satusehat():
    return compile_file(ROOT / "policies" / "satusehat.yaml")


def _stored(policy, resource: dict) -> str:
    encrypt_resource(resource, policy.for_type(resource["resourceType"]), Keyring.generate())
    return orjson.dumps(resource).decode()


def _identifier_resource(rtype: str, path: str, system: str) -> dict:
    identifier = {"system": system, "value": NEEDLE}
    if path == "accessionIdentifier":
        return {"resourceType": rtype, path: identifier}
    if path == "episodeOfCare.identifier":  # Reference.identifier: a logical reference to the episode
        return {"resourceType": rtype, "episodeOfCare": [{"identifier": identifier}]}
    return {"resourceType": rtype, "identifier": [identifier]}


@pytest.mark.parametrize(("rtype", "path", "system", "source"), PROFILE_SYSTEMS)
def test_every_satusehat_identifier_system_is_encrypted(rtype, path, system, source):
    stored = _stored(_shipped_satusehat(), _identifier_resource(rtype, path, system))
    assert NEEDLE not in stored, f"{rtype}.{path} under {system} ({source}) stays clear"


def _extension_resource(rtype: str, where: str, url: str) -> dict:
    ext = {"url": url, "valueString": NEEDLE}
    if where == "":
        return {"resourceType": rtype, "extension": [ext]}
    if where == "_birthDate":
        return {"resourceType": rtype, "birthDate": "1980-01-02", "_birthDate": {"extension": [ext]}}
    if where == "location":
        return {"resourceType": rtype, "location": [{"location": {"reference": "Location/l1"}, "extension": [ext]}]}
    if where == "collection":
        return {"resourceType": rtype, "collection": {"extension": [ext]}}
    return {"resourceType": rtype, where: [{"city": "Bandung", "extension": [ext]}]}


@pytest.mark.parametrize(("rtype", "where", "url", "source"), PROFILE_EXTENSIONS)
def test_every_satusehat_extension_is_encrypted_or_knowingly_clear(rtype, where, url, source):
    policy = _shipped_satusehat()
    clear = NEEDLE in _stored(policy, _extension_resource(rtype, where, url))
    assert clear == (url in KNOWINGLY_CLEAR_EXTENSIONS), f"{rtype} extension {url} ({source}): clear={clear}"


def test_the_extension_allow_list_holds_only_the_knowingly_clear_extensions():
    """Religion, ethnicity, birth place or citizenship must never be opened by the allow-list."""
    listed = {canonical(u) for u in KNOWINGLY_CLEAR_EXTENSIONS}
    assert _shipped_satusehat().closure.clear_urls <= listed


def test_every_satusehat_uri_the_policy_names_is_checked_for_near_misses():
    """`policy check` flags a miscased copy only of spellings it knows: every fhir.kemkes.go.id system or
    extension URL the shipped policy names must be in its table, and each from the profile review above."""
    text = (ROOT / "policies" / "satusehat.yaml").read_text()
    named = set(re.findall(r"https://fhir\.kemkes\.go\.id/[A-Za-z0-9/_-]+", text))
    reviewed = {system for _, _, system, _ in PROFILE_SYSTEMS} | {url for _, _, url, _ in PROFILE_EXTENSIONS}
    assert named <= set(SATUSEHAT_SYSTEMS) & reviewed
    for uri in named:
        assert near_miss(uri.upper().replace("HTTPS://", "https://")) == uri


# Where the HIPAA policy knowingly differs on the SATUSEHAT fixtures (see the comments in policies/hipaa.yaml).
HIPAA_DIFFERS = {
    "practitioner.json": "HIPAA protects patients' PHI; a practitioner's own address and birth date are not PHI",
    "Kelas reguler JKN": "the ServiceClass extension on Encounter.location is SATUSEHAT's (BPJS ward class)",
}


@pytest.mark.parametrize("name", [n for n in ORDER["satusehat"] if n not in HIPAA_DIFFERS])
def test_the_hipaa_policy_covers_the_same_elements_of_the_satusehat_fixtures(name):
    """The health fields of the 16 SATUSEHAT profiles are PHI under HIPAA too: the same resources
    stored under the HIPAA policy keep none of their needles (pure core, no upstream)."""
    needles = set(json.loads((FIXTURES / "satusehat" / "needles.json").read_text())[name]) - set(HIPAA_DIFFERS)
    stored = _stored(compile_file(ROOT / "policies" / "hipaa.yaml"), _fixture("satusehat", name, {}))
    assert [n for n in needles if n in stored] == []
