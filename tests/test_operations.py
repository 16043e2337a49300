"""Operations through the proxy: responses decrypted wherever resources appear; request bodies and
parameters encrypted where the policy's operations block allows it and refused otherwise."""

from __future__ import annotations

import json

import orjson
import pytest

from tests.conftest import FHIR_JSON, FIXTURES, assert_no_plaintext, load_fixture

FIXED = {"ORGANIZATION_ID": "org-1", "PRACTITIONER_ID": "prac-1", "LOCATION_ID": "loc-1"}


@pytest.fixture
async def client(proxy_for, clean_upstream, satusehat):
    return await proxy_for(clean_upstream.base_url, satusehat)


def _needles(name: str) -> list[str]:
    return json.loads((FIXTURES / "satusehat" / "needles.json").read_text())[name]


async def test_everything_returns_the_patients_record_decrypted(client, clean_upstream):
    patient = load_fixture("satusehat/patient.json")
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)).json()
    condition = load_fixture("satusehat/condition.json", {**FIXED, "PATIENT_ID": created["id"], "ENCOUNTER_ID": "e"})
    resp = await client.post("/fhir/R4/Condition", data=orjson.dumps(condition), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    resp = await client.get(f"/fhir/R4/Patient/{created['id']}/$everything?_type=Patient,Condition")
    assert resp.status == 200, await resp.text()
    bundle = await resp.json()
    by_type = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
    assert by_type["Patient"]["name"] == patient["name"]
    assert by_type["Condition"]["code"] == condition["code"]
    assert "fhircrypt.dev" not in orjson.dumps(bundle).decode()
    assert (await client.get(f"/fhir/R4/Patient/{created['id']}/$everything?code=x")).status == 501


async def test_validate_carries_the_resource_encrypted_where_the_policy_allows_it(client, clean_upstream):
    patient = load_fixture("satusehat/patient.json")
    params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient}]}
    resp = await client.post("/fhir/R4/Patient/$validate", data=orjson.dumps(params), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    outcome = await resp.json()
    assert outcome["issue"][0]["severity"] == "information", outcome
    assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), _needles("patient.json"))
    # the resource itself as the body works the same way
    resp = await client.post("/fhir/R4/Patient/$validate", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert resp.status == 200
    # a parameter the policy does not list could carry plaintext
    params["parameter"].append({"name": "note", "valueString": "Budiarto"})
    resp = await client.post("/fhir/R4/Patient/$validate", data=orjson.dumps(params), headers=FHIR_JSON)
    assert resp.status == 501
    assert "'note'" in (await resp.json())["issue"][0]["diagnostics"]
    assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), _needles("patient.json"))


async def test_unlisted_operations_may_not_carry_encrypted_types_anywhere(client, clean_upstream):
    patient = load_fixture("satusehat/patient.json")
    bodies = [
        {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient}]},
        {  # inside a part: a listed parameter name would not make it safe either
            "resourceType": "Parameters",
            "parameter": [{"name": "input", "part": [{"name": "resource", "resource": patient}]}],
        },
        {"resourceType": "Bundle", "type": "message", "entry": [{"resource": patient}]},
    ]
    for body in bodies:
        resp = await client.post("/fhir/R4/$custom-merge", data=orjson.dumps(body), headers=FHIR_JSON)
        assert resp.status == 501, await resp.text()
        diagnostics = (await resp.json())["issue"][0]["diagnostics"]
        assert "$custom-merge" in diagnostics and "Budiarto" not in diagnostics
    assert clean_upstream.requests() == []
    for op in ("$graphql", "$export"):
        assert (await client.post(f"/fhir/R4/{op}", data=b"{}", headers=FHIR_JSON)).status == 501
