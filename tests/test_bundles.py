"""Batch and transaction Bundles through the proxy on the real upstream, with the SATUSEHAT policy.

A SATUSEHAT integration sends a whole encounter as one transaction: the patient, the
encounter, its diagnosis and lab results, linked by ``urn:uuid:`` references. Every entry
must be encrypted by its own type's policy, conditional URLs and references rewritten to
blind-index searches, and the response decrypted.
"""

from __future__ import annotations

import base64
import json
import uuid

import aiohttp
import orjson
import pytest

from tests.conftest import FHIR_JSON, FIXTURES, assert_no_plaintext, load_fixture

NIK_SYSTEM = "https://fhir.kemkes.go.id/id/nik"
NIK = "3175042903870007"
SCENARIO = [
    "patient.json",
    "encounter.json",
    "condition.json",
    "observation-hemoglobin.json",
    "medication-request.json",
]
PLACEHOLDERS = {  # fixture -> the reference other fixtures use for it
    "patient.json": "Patient/PATIENT_ID",
    "encounter.json": "Encounter/ENCOUNTER_ID",
    "condition.json": "Condition/CONDITION_ID",
    "observation-hemoglobin.json": "Observation/OBSERVATION_ID",
    "medication-request.json": "MedicationRequest/MEDICATIONREQUEST_ID",
}
FIXED = {"ORGANIZATION_ID": "org-1", "PRACTITIONER_ID": "prac-1", "LOCATION_ID": "loc-1"}


@pytest.fixture
async def client(proxy_for, clean_upstream, satusehat):
    return await proxy_for(clean_upstream.base_url, satusehat)


def _needles(*names: str) -> list[str]:
    every = json.loads((FIXTURES / "satusehat" / "needles.json").read_text())
    return [n for name in names for n in every[name]]


def _scenario() -> dict:
    """A transaction Bundle with the encounter's resources linked by urn:uuid references."""
    urns = {ref: f"urn:uuid:{uuid.uuid4()}" for ref in PLACEHOLDERS.values()}
    entries = []
    for name in SCENARIO:
        text = (FIXTURES / "satusehat" / name).read_text()
        for ref, urn in urns.items():
            text = text.replace(f'"{ref}"', f'"{urn}"')
        for placeholder, value in FIXED.items():
            text = text.replace(placeholder, value)
        resource = json.loads(text)
        entries.append(
            {
                "fullUrl": urns[PLACEHOLDERS[name]],
                "resource": resource,
                "request": {"method": "POST", "url": resource["resourceType"]},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def observation_referring_by_nik(nik: str) -> dict:
    """The hemoglobin Observation with a conditional reference to its patient, by NIK."""
    observation = load_fixture("satusehat/observation-hemoglobin.json", FIXED)
    observation["subject"] = {"reference": f"Patient?identifier={NIK_SYSTEM}|{nik}"}
    observation.pop("encounter")
    return observation


def _clean(resource: dict) -> dict:
    """Without what the server assigns: id, meta and the references it resolved from urn:uuid."""
    return {k: v for k, v in resource.items() if k not in ("id", "meta", "subject", "encounter", "diagnosis")}


async def test_a_satusehat_transaction_is_encrypted_entry_by_entry_and_answered_in_the_clear(client, clean_upstream):
    bundle = _scenario()
    originals = [entry["resource"] for entry in orjson.loads(orjson.dumps(bundle))["entry"]]
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["type"] == "transaction-response"
    statuses = [entry["response"]["status"] for entry in answer["entry"]]
    assert all(s.startswith("201") for s in statuses), statuses
    ids = {}
    for original, entry in zip(originals, answer["entry"], strict=True):
        created = entry["resource"]
        ids[created["resourceType"]] = created["id"]
        assert entry["response"]["location"].startswith(f"{created['resourceType']}/{created['id']}")
        assert _clean(created) == _clean(original)
    condition = await (await client.get(f"/fhir/R4/Condition/{ids['Condition']}")).json()
    assert condition["subject"]["reference"] == f"Patient/{ids['Patient']}"
    needles = _needles(*SCENARIO)
    assert_no_plaintext(clean_upstream.dump(), needles)
    assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), needles)


async def test_conditional_create_and_conditional_references_in_a_transaction_use_blind_indexes(client, clean_upstream):
    patient = load_fixture("satusehat/patient.json")
    created = await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert created.status == 201
    patient_id = (await created.json())["id"]
    observation = observation_referring_by_nik(NIK)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {  # already there: the server must find it by the NIK's blind index and not create it again
                "fullUrl": "urn:uuid:3f0c1a52-8d6e-4c8e-9d5e-0d2b7b7c1a01",
                "resource": patient,
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={NIK_SYSTEM}|{NIK}"},
            },
            {"resource": observation, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["entry"][0]["response"]["status"].startswith("200")
    assert patient_id in answer["entry"][0]["response"]["location"]
    assert answer["entry"][1]["response"]["status"].startswith("201")
    # The reference went out as the same blind-index search a client's search becomes. Medplum's router
    # does not resolve conditional references in bodies (HAPI and others do), so resolve it here the way
    # such a server would: the rewritten search must find exactly the patient.
    reference = answer["entry"][1]["resource"]["subject"]["reference"]
    assert reference.startswith("Patient?identifier=") and NIK not in reference
    async with aiohttp.ClientSession() as session, session.get(f"{clean_upstream.base_url}/{reference}") as direct:
        hits = (await direct.json())["entry"]
    assert [hit["resource"]["id"] for hit in hits] == [patient_id]
    found = await (await client.get(f"/fhir/R4/Patient?identifier={NIK_SYSTEM}|{NIK}")).json()
    assert len(found["entry"]) == 1
    needles = [NIK, *_needles("observation-hemoglobin.json")]
    assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), needles)
    assert_no_plaintext(clean_upstream.dump(), needles)


async def test_batch_searches_and_reads_are_rewritten_and_their_results_decrypted(client, clean_upstream):
    patient = load_fixture("satusehat/patient.json")
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)).json()
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient?identifier={NIK_SYSTEM}|{NIK}"}},
            {"request": {"method": "GET", "url": f"Patient/{created['id']}"}},
            {"request": {"method": "GET", "url": f"Patient?identifier={NIK_SYSTEM}|0000000000000000"}},  # finds nothing
        ],
    }
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    found = answer["entry"][0]["resource"]
    assert [e["resource"]["id"] for e in found["entry"]] == [created["id"]]
    assert found["entry"][0]["resource"]["name"] == patient["name"]
    assert answer["entry"][1]["resource"]["birthDate"] == patient["birthDate"]
    assert answer["entry"][2]["resource"].get("entry", []) == []
    assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), [NIK])


async def test_a_patch_entry_on_an_encrypted_type_is_executed_by_the_proxy_with_if_match(client, clean_upstream):
    patient = load_fixture("satusehat/patient.json")
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)).json()
    patch = [{"op": "test", "path": "/birthDate", "value": patient["birthDate"]}]
    patch.append({"op": "replace", "path": "/birthDate", "value": "1987-03-30"})
    entry = {
        "resource": {
            "resourceType": "Binary",
            "contentType": "application/json-patch+json",
            "data": base64.b64encode(orjson.dumps(patch)).decode(),
        },
        "request": {"method": "PATCH", "url": f"Patient/{created['id']}"},
    }
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    back = await (await client.get(f"/fhir/R4/Patient/{created['id']}")).json()
    assert back["birthDate"] == "1987-03-30"
    assert back["meta"]["versionId"] != created["meta"]["versionId"]
    assert_no_plaintext(clean_upstream.dump(), ["1987-03-30", patient["birthDate"]])
    # a stale ifMatch fails the whole transaction instead of overwriting the newer version
    entry["request"]["ifMatch"] = f'W/"{created["meta"]["versionId"]}"'
    entry["resource"]["data"] = base64.b64encode(orjson.dumps(patch[1:])).decode()
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status in (409, 412), await resp.text()
    assert (await resp.json())["resourceType"] == "OperationOutcome"
    failing_test = [{"op": "test", "path": "/birthDate", "value": "1900-01-01"}]
    entry["resource"]["data"] = base64.b64encode(orjson.dumps(failing_test)).decode()
    del entry["request"]["ifMatch"]
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 422
    assert "1900-01-01" not in await resp.text()


BUNDLE_REFUSALS = [
    ({"request": {"method": "GET", "url": "Patient?name:contains=Budi"}}, 400, "'name:contains'"),
    ({"request": {"method": "GET", "url": "Patient/abc?_elements=name"}}, 400, "_summary and _elements"),
    ({"request": {"method": "DELETE", "url": "/Patient/abc"}}, 400, "relative"),
    ({"request": {"method": "POST", "url": ""}, "resource": {"resourceType": "Bundle"}}, 400, "url is missing"),
    ({"request": {"method": "POST", "url": "Patient"}}, 400, "needs a resource"),
    (
        {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Observation"}},
        400,
        "resourceType does not match",
    ),
    (
        {
            "request": {"method": "POST", "url": "Observation"},
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "Hb"},
                "subject": {"reference": "Patient?name:contains=Budi"},
            },
        },
        400,
        "Bundle.entry[0].resource.subject.reference",
    ),
    (
        {
            "request": {"method": "PATCH", "url": "Patient/abc"},
            "resource": {"resourceType": "Parameters", "parameter": []},
        },
        415,
        "FHIRPath Patch",
    ),
    (
        {
            "request": {"method": "POST", "url": "Patient/$custom-merge"},
            "resource": {"resourceType": "Parameters", "parameter": []},
        },
        501,
        "operations with a body",
    ),
    ({"request": {"method": "PATCH", "url": "Patient?identifier=x|1"}}, 400, "needs a resource"),
]


@pytest.mark.parametrize(("entry", "status", "phrase"), BUNDLE_REFUSALS, ids=[r[2] for r in BUNDLE_REFUSALS])
async def test_bundle_entries_that_cannot_be_handled_are_refused_before_the_upstream(
    client, clean_upstream, entry, status, phrase
):
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entry]}
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == status, await resp.text()
    outcome = await resp.json()
    diagnostics = " ".join(issue["diagnostics"] for issue in outcome["issue"])
    assert phrase in diagnostics, diagnostics
    assert "Budi" not in diagnostics
    assert clean_upstream.requests() == []
