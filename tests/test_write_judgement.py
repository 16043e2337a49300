"""Writes judged on the resource stored after them (issue 14, observations 3, 4 and the write half of 8).

Through the proxy with real signed tokens (``tests/test_auth.py``'s issuer) against the Medplum test
upstream; each case asserts the answer and what the upstream stores afterwards. The pure judgement
(``proxy/transform/write_judgement.py``) has its own cases at the end.
"""

from __future__ import annotations

import base64

import orjson
import pytest

from proxy.outcome import FhirError
from proxy.policy.compiler import compile_text
from proxy.transform.write_judgement import WriteAccess, check_compartment, judge_groups
from tests import test_auth as auth
from tests.conftest import FHIR_JSON, ROOT
from tests.test_auth import BPJS, CONDITION, NIK, PATIENT, bearer

# the token issuer, the JWT proxy and the stored fixtures of the role matrix, shared with test_auth
issuer, jwt_proxy, proxy, stored = auth.issuer, auth.jwt_proxy, auth.proxy, auth.stored

JSON_PATCH = {"Content-Type": "application/json-patch+json"}
APP_A = {"scope": "patient/*.cruds", "patient": "pat-a"}
BILLING = {"realm_access": {"roles": ["billing"]}, "scope": "user/*.cruds"}
CLERK = {"realm_access": {"roles": ["registration"]}, "scope": "user/*.cruds"}
PHYSICIAN = {"realm_access": {"roles": ["physician"]}, "scope": "user/*.cruds"}
NIK_SYSTEM = "https://fhir.kemkes.go.id/id/nik"


@pytest.fixture
async def truth(proxy_for, clean_upstream, satusehat):
    """What the upstream stores, decrypted in full (development mode): the judge of every assertion."""
    reader = await proxy_for(clean_upstream.base_url, satusehat)

    async def read(url: str) -> dict:
        resp = await reader.get(f"/fhir/R4/{url}")
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def put(resource: dict) -> None:
        url = f"/fhir/R4/{resource['resourceType']}/{resource['id']}"
        resp = await reader.put(url, data=orjson.dumps(resource), headers=FHIR_JSON)
        assert resp.status in (200, 201), await resp.text()

    read.put = put  # type: ignore[attr-defined]
    return read


def _versions(upstream, rtype: str, rid: str | None = None) -> list[dict]:
    return [r for r in upstream.dump() if r["resourceType"] == rtype and (rid is None or r["id"] == rid)]


async def _refused(resp, status: int, path: str) -> None:
    body = await resp.json()
    assert resp.status == status, body
    assert path in body["issue"][0]["diagnostics"], body


def _transaction(*entries: dict) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": list(entries)})


def _patch_entry(url: str, ops: list) -> dict:
    data = base64.b64encode(orjson.dumps(ops)).decode()
    binary = {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": data}
    return {"request": {"method": "PATCH", "url": url}, "resource": binary}


# --------------------------------------------------------------------------- observation 3: compartments


async def test_a_patient_app_cannot_patch_its_own_condition_into_another_chart(proxy, issuer, stored, truth):
    app_a = bearer(issuer.token(**APP_A))
    mine = {k: v for k, v in CONDITION.items() if k != "id"}
    created = await proxy.post("/fhir/R4/Condition", data=orjson.dumps(mine), headers=FHIR_JSON | app_a)
    assert created.status == 201, await created.text()
    cid = (await created.json())["id"]
    move = [{"op": "replace", "path": "/subject/reference", "value": "Patient/pat-b"}]
    resp = await proxy.patch(f"/fhir/R4/Condition/{cid}", data=orjson.dumps(move), headers=JSON_PATCH | app_a)
    await _refused(resp, 403, "Condition")
    resp = await proxy.post(
        "/fhir/R4", data=_transaction(_patch_entry(f"Condition/{cid}", move)), headers=FHIR_JSON | app_a
    )
    await _refused(resp, 403, "Condition")
    assert len(_versions(stored, "Condition", cid)) == 1  # nothing written after the create
    assert (await truth(f"Condition/{cid}"))["subject"]["reference"] == "Patient/pat-a"
    # the same app may still patch its own record (a change inside its compartment)
    note = [{"op": "add", "path": "/note", "value": [{"text": "kambuh"}]}]
    resp = await proxy.patch(f"/fhir/R4/Condition/{cid}", data=orjson.dumps(note), headers=JSON_PATCH | app_a)
    assert resp.status == 200, await resp.text()
    assert (await truth(f"Condition/{cid}"))["note"] == [{"text": "kambuh"}]


@pytest.mark.parametrize(
    ("subject", "asserter", "path"),
    [
        ("Patient/pat-b", "Patient/pat-a", "Condition.subject.reference"),  # one own reference is not enough
        ("Patient/pat-a", "Patient/pat-b", "Condition.asserter.reference"),
        ("Patient/pat-a", "urn:uuid:0c5a5b0e-6c8b-4b0a-9f43-6b3f1f6f1d3e", "Condition.asserter.reference"),
        (
            "Patient/pat-a",
            "Patient?identifier=https://fhir.kemkes.go.id/id/nik|3174015507880001",
            "Condition.asserter.reference",
        ),
    ],
)
async def test_every_compartment_reference_of_a_patient_app_write_is_its_own_patient(
    proxy, issuer, stored, subject, asserter, path
):
    app_a = bearer(issuer.token(**APP_A))
    condition = {
        "resourceType": "Condition",
        "subject": {"reference": subject},
        "asserter": {"reference": asserter},
        "code": {"text": "pusing"},
    }
    before = len(_versions(stored, "Condition"))
    resp = await proxy.post("/fhir/R4/Condition", data=orjson.dumps(condition), headers=FHIR_JSON | app_a)
    await _refused(resp, 403, path if subject == "Patient/pat-a" else "Condition")
    entry = {"fullUrl": "urn:uuid:1", "request": {"method": "POST", "url": "Condition"}, "resource": condition}
    resp = await proxy.post("/fhir/R4", data=_transaction(entry), headers=FHIR_JSON | app_a)
    assert resp.status == 403, await resp.text()
    assert len(_versions(stored, "Condition")) == before


async def test_a_contained_patient_is_not_the_callers_patient(proxy, issuer, stored):
    app_a = bearer(issuer.token(**APP_A))
    mother = {"resourceType": "Patient", "id": "pat-a", "gender": "female"}
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "Hb"},
        "contained": [mother],
        "subject": {"reference": "#pat-a"},
    }
    before = len(_versions(stored, "Observation"))
    resp = await proxy.post("/fhir/R4/Observation", data=orjson.dumps(observation), headers=FHIR_JSON | app_a)
    await _refused(resp, 403, "outside the caller's patient compartment")
    linked = {**mother, "link": [{"other": {"reference": "Patient/pat-b"}, "type": "seealso"}]}
    observation = {**observation, "contained": [linked], "subject": {"reference": "Patient/pat-a"}}
    resp = await proxy.post("/fhir/R4/Observation", data=orjson.dumps(observation), headers=FHIR_JSON | app_a)
    await _refused(resp, 403, "Observation.contained[0].link[0].other.reference")
    assert len(_versions(stored, "Observation")) == before
    observation["contained"] = [mother]  # a contained resource of the own record, pointing nowhere else
    resp = await proxy.post("/fhir/R4/Observation", data=orjson.dumps(observation), headers=FHIR_JSON | app_a)
    assert resp.status == 201, await resp.text()


# --------------------------------------------------------------------------- observation 4: groups


async def test_billing_cannot_erase_the_name_and_nik_it_may_not_read(proxy, issuer, stored, truth):
    billing = bearer(issuer.token(**BILLING))
    masked = await (await proxy.get("/fhir/R4/Patient/pat-a", headers=billing)).json()
    nik, bpjs = masked["identifier"]
    # the masked name and the masked NIK value left out, the BPJS number (billing's own group) changed
    sent = {k: v for k, v in masked.items() if k not in ("name", "meta")}
    sent["identifier"] = [{"system": nik["system"]}, {**bpjs, "value": "0009999999999"}]
    resp = await proxy.put("/fhir/R4/Patient/pat-a", data=orjson.dumps(sent), headers=FHIR_JSON | billing)
    assert resp.status == 200, await resp.text()
    after = await truth("Patient/pat-a")
    assert after["name"] == PATIENT["name"] and after["identifier"][0] == PATIENT["identifier"][0]
    assert after["identifier"][1] == {"system": BPJS, "value": "0009999999999"}
    assert after["birthDate"] == PATIENT["birthDate"]
    put = [r for r in stored.requests() if r["method"] == "PUT"][-1]
    assert put["headers"]["if-match"] == 'W/"1"'  # judged against the version it was read from
    # removing the NIK's identifier entry cannot be undone in place: refused, nothing stored
    versions = len(_versions(stored, "Patient", "pat-a"))
    dropped = {**sent, "identifier": [sent["identifier"][1]]}
    resp = await proxy.put("/fhir/R4/Patient/pat-a", data=orjson.dumps(dropped), headers=FHIR_JSON | billing)
    await _refused(resp, 403, "Patient.identifier[0].value")
    assert "3174015507880001" not in await resp.text()
    assert len(_versions(stored, "Patient", "pat-a")) == versions
    assert (await truth("Patient/pat-a"))["identifier"][0] == PATIENT["identifier"][0]


async def test_billing_patch_remove_of_the_name_keeps_it(proxy, issuer, stored, truth):
    billing = bearer(issuer.token(**BILLING))
    ops = [{"op": "remove", "path": "/name"}, {"op": "replace", "path": "/gender", "value": "other"}]
    resp = await proxy.patch("/fhir/R4/Patient/pat-a", data=orjson.dumps(ops), headers=JSON_PATCH | billing)
    assert resp.status == 200, await resp.text()
    after = await truth("Patient/pat-a")
    assert after["name"] == PATIENT["name"] and after["gender"] == "other"
    # the same through a transaction PATCH entry
    resp = await proxy.post(
        "/fhir/R4", data=_transaction(_patch_entry("Patient/pat-a", ops[:1])), headers=FHIR_JSON | billing
    )
    assert resp.status == 200, await resp.text()
    assert (await truth("Patient/pat-a"))["name"] == PATIENT["name"]
    # changing it is refused, as in a PUT
    rename = [{"op": "replace", "path": "/name", "value": [{"family": "Forged"}]}]
    resp = await proxy.patch("/fhir/R4/Patient/pat-a", data=orjson.dumps(rename), headers=JSON_PATCH | billing)
    await _refused(resp, 403, "Patient.name[0]")
    assert (await truth("Patient/pat-a"))["name"] == PATIENT["name"]


async def test_a_clerk_cannot_erase_the_diagnosis_or_its_notes(proxy, issuer, stored, truth):
    await truth.put({**CONDITION, "note": [{"text": "HIV reaktif"}]})
    clerk = bearer(issuer.token(**CLERK))
    masked = await (await proxy.get("/fhir/R4/Condition/cond-a", headers=clerk)).json()
    assert "coding" not in masked["code"]
    without_code = {k: v for k, v in masked.items() if k not in ("code", "meta")}
    without_code["clinicalStatus"] = {"coding": [{"code": "resolved"}]}
    resp = await proxy.put("/fhir/R4/Condition/cond-a", data=orjson.dumps(without_code), headers=FHIR_JSON | clerk)
    assert resp.status == 200, await resp.text()
    after = await truth("Condition/cond-a")
    assert after["code"] == CONDITION["code"] and after["note"] == [{"text": "HIV reaktif"}]
    assert after["clinicalStatus"] == {"coding": [{"code": "resolved"}]}
    versions = len(_versions(stored, "Condition", "cond-a"))
    without_note = {k: v for k, v in without_code.items() if k != "note"}
    resp = await proxy.put("/fhir/R4/Condition/cond-a", data=orjson.dumps(without_note), headers=FHIR_JSON | clerk)
    await _refused(resp, 403, "Condition.note[0].text")
    # the same result through a transaction entry: the same refusal, nothing stored
    entry = {"request": {"method": "PUT", "url": "Condition/cond-a"}, "resource": without_note}
    resp = await proxy.post("/fhir/R4", data=_transaction(entry), headers=FHIR_JSON | clerk)
    await _refused(resp, 403, "Condition.note[0].text")
    assert len(_versions(stored, "Condition", "cond-a")) == versions
    assert (await truth("Condition/cond-a"))["note"] == [{"text": "HIV reaktif"}]


async def test_elements_in_contained_resources_are_kept_like_the_containers(proxy, issuer, stored, truth):
    drug = {"resourceType": "Medication", "id": "drug", "code": {"text": "Tenofovir 300 mg"}}
    order = {
        "resourceType": "MedicationRequest",
        "id": "mr-c",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/pat-a"},
        "contained": [drug],
        "medicationReference": {"reference": "#drug"},
    }
    await truth.put(order)
    billing = bearer(issuer.token(**BILLING))
    masked = await (await proxy.get("/fhir/R4/MedicationRequest/mr-c", headers=billing)).json()
    assert "text" not in masked["contained"][0]["code"]
    sent = {k: v for k, v in masked.items() if k != "meta"}
    sent["contained"] = [{k: v for k, v in masked["contained"][0].items() if k != "code"}]
    sent["status"] = "on-hold"
    resp = await proxy.put("/fhir/R4/MedicationRequest/mr-c", data=orjson.dumps(sent), headers=FHIR_JSON | billing)
    assert resp.status == 200, await resp.text()
    after = await truth("MedicationRequest/mr-c")
    assert after["contained"] == [drug] and after["status"] == "on-hold"
    versions = len(_versions(stored, "MedicationRequest", "mr-c"))
    dropped = {**sent, "contained": [], "medicationReference": {"reference": "Medication/elsewhere"}}
    resp = await proxy.put("/fhir/R4/MedicationRequest/mr-c", data=orjson.dumps(dropped), headers=FHIR_JSON | billing)
    await _refused(resp, 403, "MedicationRequest.contained[0]: this caller may not remove")
    assert len(_versions(stored, "MedicationRequest", "mr-c")) == versions
    assert (await truth("MedicationRequest/mr-c"))["contained"] == [drug]


async def test_a_lab_value_left_out_by_billing_is_kept(proxy, issuer, stored, truth):
    billing = bearer(issuer.token(**BILLING))
    masked = await (await proxy.get("/fhir/R4/Observation/obs-a", headers=billing)).json()
    sent = {k: v for k, v in masked.items() if k not in ("meta", "dataAbsentReason", "extension")}
    sent["status"] = "amended"
    resp = await proxy.put("/fhir/R4/Observation/obs-a", data=orjson.dumps(sent), headers=FHIR_JSON | billing)
    assert resp.status == 200, await resp.text()
    after = await truth("Observation/obs-a")
    assert after["valueQuantity"] == {"value": 9.87, "unit": "g/dL"} and after["status"] == "amended"
    assert "dataAbsentReason" not in after


@pytest.fixture
async def write_clinical_only(jwt_proxy, satusehat):
    """The SATUSEHAT policy with physicians allowed to write only the clinical group (read: all)."""
    text = (ROOT / "policies/satusehat.yaml").read_text()
    rule = (
        "    - name: physician                   # treating doctors: the whole record\n      when: {role: physician}\n"
    )
    assert rule in text
    text = text.replace(rule, rule + "      write: [clinical]\n")
    return await jwt_proxy(compile_text(text, "satusehat-write-clinical.yaml"))


async def test_groups_a_caller_reads_but_may_not_write_stay_as_stored(write_clinical_only, issuer, stored, truth):
    restricted = write_clinical_only
    physician = bearer(issuer.token(**PHYSICIAN))
    full = await (await restricted.get("/fhir/R4/Patient/pat-a", headers=physician)).json()
    unchanged = {**full, "gender": "other"}
    resp = await restricted.put("/fhir/R4/Patient/pat-a", data=orjson.dumps(unchanged), headers=FHIR_JSON | physician)
    assert resp.status == 200, await resp.text()  # read-only groups sent back as read: allowed
    versions = len(_versions(stored, "Patient", "pat-a"))
    for what, sent, path in (
        ("changed", {**unchanged, "birthDate": "1990-01-01"}, "Patient.birthDate"),
        ("removed", {k: v for k, v in unchanged.items() if k != "name"}, "Patient.name[0]"),
    ):
        resp = await restricted.put("/fhir/R4/Patient/pat-a", data=orjson.dumps(sent), headers=FHIR_JSON | physician)
        await _refused(resp, 403, path)
        assert ("remove" if what == "removed" else "change") in (await resp.json())["issue"][0]["diagnostics"]
    assert len(_versions(stored, "Patient", "pat-a")) == versions
    after = await truth("Patient/pat-a")
    assert after["name"] == PATIENT["name"] and after["birthDate"] == PATIENT["birthDate"]
    # its own group is free: the diagnosis may be changed
    condition = await (await restricted.get("/fhir/R4/Condition/cond-a", headers=physician)).json()
    condition["code"] = {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "D64.9"}]}
    body = orjson.dumps(condition)
    resp = await restricted.put("/fhir/R4/Condition/cond-a", data=body, headers=FHIR_JSON | physician)
    assert resp.status == 200, await resp.text()
    assert (await truth("Condition/cond-a"))["code"]["coding"][0]["code"] == "D64.9"


async def test_a_conditional_update_by_a_caller_that_may_not_write_every_group_is_refused(proxy, issuer, stored):
    billing = bearer(issuer.token(**BILLING))
    sent = {"resourceType": "Patient", "gender": "other"}
    writes = len(stored.requests())
    resp = await proxy.put(
        f"/fhir/R4/Patient?identifier={BPJS}|0001122334401", data=orjson.dumps(sent), headers=FHIR_JSON | billing
    )
    await _refused(resp, 403, "by search")
    assert len(stored.requests()) == writes  # nothing reached the upstream
    assert len(_versions(stored, "Patient", "pat-a")) == 1


# --------------------------------------------------------------------------- the pure judgement


def test_check_compartment_names_the_offending_reference(satusehat):
    own = {"resourceType": "Condition", "subject": {"reference": "Patient/a"}}
    check_compartment(own, "a", "written")
    check_compartment({**own, "asserter": {"reference": "Practitioner/d"}}, "a", "written")
    check_compartment({**own, "asserter": {"reference": "#p"}}, "a", "written")
    check_compartment({**own, "asserter": {"display": "ibu"}}, "a", "written")  # logical: resolves to nothing
    for asserter in ("Patient/b", "urn:uuid:x", "Patient?identifier=s|v", "http://x/Patient?x=1", 7):
        with pytest.raises(FhirError) as refused:
            check_compartment({**own, "asserter": {"reference": asserter}}, "a", "written")
        assert refused.value.issues[0].expression == ["Condition.asserter.reference"]
    for outside in ({"resourceType": "Practitioner", "id": "a"}, {**own, "subject": {"reference": "#a"}}):
        with pytest.raises(FhirError):
            check_compartment(outside, "a", "stored")
    with pytest.raises(FhirError):
        check_compartment(own, None, "written")


def test_judge_groups_puts_back_in_place_or_refuses(satusehat):
    billing = WriteAccess(readable=frozenset({"insurance"}), writable=frozenset({"insurance"}))
    before = {
        "resourceType": "Patient",
        "id": "p",
        "identifier": [{"system": NIK, "value": "1"}, {"system": BPJS, "value": "2"}],
        "name": [{"family": "A"}, {"family": "B"}],
        "birthDate": "2000-01-01",
    }
    result = {"resourceType": "Patient", "id": "p", "identifier": [{"system": NIK}, {"system": BPJS, "value": "3"}]}
    judge_groups(result, before, satusehat, billing, "Patient")
    assert result["name"] == before["name"] and result["birthDate"] == "2000-01-01"
    assert result["identifier"] == [{"system": NIK, "value": "1"}, {"system": BPJS, "value": "3"}]
    for sent, path in (
        ({"resourceType": "Patient", "identifier": [{"system": BPJS, "value": "3"}]}, "Patient.identifier[0].value"),
        ({**before, "name": [{"family": "B"}]}, "Patient.name[0]"),  # a changed (moved) name
        ({**before, "birthDate": "2000-01-02"}, "Patient.birthDate"),
    ):
        with pytest.raises(FhirError) as refused:
            judge_groups(sent, before, satusehat, billing, "Patient")
        assert refused.value.status == 403 and refused.value.issues[0].expression == [path]
        assert "2000" not in refused.value.issues[0].diagnostics
    with pytest.raises(FhirError):  # a create sets what it may not write
        judge_groups({"resourceType": "Patient", "birthDate": "2000-01-01"}, None, satusehat, billing, "Patient")


# --------------------------------------------------------------------------- observation 9: stored queries


async def test_stored_queries_hold_blind_index_tokens_never_covered_values(proxy, issuer, stored):
    physician = bearer(issuer.token(**PHYSICIAN))
    nik_query = f"Patient?identifier={NIK}|3174015507880001"
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "rujukan",
        "criteria": nik_query,
        "channel": {"type": "rest-hook", "endpoint": "https://hook.example/x"},
    }
    resp = await proxy.post("/fhir/R4/Subscription", data=orjson.dumps(subscription), headers=FHIR_JSON | physician)
    assert resp.status == 201, await resp.text()
    sid = (await resp.json())["id"]
    saved = [
        {"request": {"method": "GET", "url": nik_query}},
        {"request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={NIK}|3174015507880001"}},
    ]
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": saved}
    resp = await proxy.post("/fhir/R4/Bundle", data=orjson.dumps(bundle), headers=FHIR_JSON | physician)
    assert resp.status == 201, await resp.text()
    ops = [{"op": "replace", "path": "/criteria", "value": f"Patient?identifier={NIK}|3578016001900004"}]
    resp = await proxy.patch(f"/fhir/R4/Subscription/{sid}", data=orjson.dumps(ops), headers=JSON_PATCH | physician)
    assert resp.status == 200, await resp.text()
    at_rest = orjson.dumps([r for r in stored.dump() if r["resourceType"] in ("Subscription", "Bundle")]).decode()
    assert "3174015507880001" not in at_rest and "3578016001900004" not in at_rest
    assert at_rest.count("blind-index") >= 4  # criteria (both versions), the entry's url and its ifNoneExist
    # a caller that may not search by NIK may not store a query by it either
    billing = bearer(issuer.token(**BILLING))
    resp = await proxy.post("/fhir/R4/Subscription", data=orjson.dumps(subscription), headers=FHIR_JSON | billing)
    await _refused(resp, 403, "Subscription.criteria")
    assert len(_versions(stored, "Subscription")) == 2


async def test_resources_inside_a_stored_bundle_are_judged_like_creates(proxy, issuer, stored):
    document = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": "urn:uuid:c1", "resource": {**CONDITION, "id": "c1"}}],
    }
    clerk = bearer(issuer.token(**CLERK))
    resp = await proxy.post("/fhir/R4/Bundle", data=orjson.dumps(document), headers=FHIR_JSON | clerk)
    await _refused(resp, 403, "Bundle.entry[0].resource.code")  # the clerk may not write a diagnosis
    app_a = bearer(issuer.token(**APP_A))
    resp = await proxy.post("/fhir/R4/Bundle", data=orjson.dumps(document), headers=FHIR_JSON | app_a)
    await _refused(resp, 403, "outside the caller's patient compartment")  # a Bundle is in no compartment
    assert _versions(stored, "Bundle") == []
    physician = bearer(issuer.token(**PHYSICIAN))
    resp = await proxy.post("/fhir/R4/Bundle", data=orjson.dumps(document), headers=FHIR_JSON | physician)
    assert resp.status == 201, await resp.text()


async def test_writes_of_types_the_policy_does_not_cover_need_a_scope_and_the_compartment(proxy, issuer, stored):
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "hasil lab",
        "criteria": "Observation?subject=Patient/pat-a",
        "channel": {"type": "rest-hook", "endpoint": "https://hook.example/x"},
    }
    body = orjson.dumps(subscription)
    reader = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    await _refused(await proxy.post("/fhir/R4/Subscription", data=body, headers=FHIR_JSON | reader), 403, "scope")
    app_a = bearer(issuer.token(**APP_A))
    resp = await proxy.post("/fhir/R4/Subscription", data=body, headers=FHIR_JSON | app_a)
    await _refused(resp, 403, "outside the caller's patient compartment")
    assert _versions(stored, "Subscription") == []


def test_repeating_primitives_are_put_back_item_by_item():
    from tests.conftest import unit_policy

    policy = unit_policy()
    blind = WriteAccess(readable=frozenset(), writable=frozenset({"identity"}))
    before = {
        "resourceType": "Patient",
        "address": [{"line": ["Jl. Melati 1", "RT 02"], "city": "Bogor", "use": "home"}],
    }
    result = {"resourceType": "Patient", "address": [{"use": "work"}]}
    judge_groups(result, before, policy, blind, "Patient")
    assert result == {
        "resourceType": "Patient",
        "address": [{"use": "work", "line": ["Jl. Melati 1", "RT 02"], "city": "Bogor"}],
    }
    for sent, path in (
        ({"resourceType": "Patient", "address": [{"line": ["Jl. Mawar 2"]}]}, "Patient.address[0].line[0]"),
        ({"resourceType": "Patient"}, "Patient.address[0].line[0]"),  # the address entry itself is gone
    ):
        with pytest.raises(FhirError) as refused:
            judge_groups(sent, before, policy, blind, "Patient")
        assert refused.value.issues[0].expression == [path]
