"""The proxy as the access gateway: one decision per request, enforced by the proxy itself.

Each test goes through a real proxy with JWT authentication (a real issuer per run, tokens
really signed) in front of the Medplum test server, and checks both the answer and what the
server received: the server is the party that is not trusted to confine anyone.
"""

from __future__ import annotations

import orjson
import pytest

from tests import test_auth
from tests.test_auth import CONDITION, NIK, OTHER, OTHER_CONDITION, PATIENT, bearer

# the real issuer, the JWT proxy and the stored records of the role matrix
issuer, jwt_proxy, proxy, stored = test_auth.issuer, test_auth.jwt_proxy, test_auth.proxy, test_auth.stored

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _app(patient: str = "pat-a", scope: str = "patient/*.rs") -> dict:
    return {"scope": scope, "patient": patient, "fhirUser": f"Patient/{patient}"}


def _ids(bundle: dict) -> set[str]:
    resources = [e["resource"] for e in bundle.get("entry", []) if "resource" in e]
    return {f"{r['resourceType']}/{r['id']}" for r in resources}


@pytest.mark.parametrize("sub", ["", " ", "  padded ", 7, None])
async def test_tokens_without_a_usable_subject_are_refused(proxy, issuer, stored, sub):
    claims = {"scope": "user/*.rs", "realm_access": {"roles": ["physician"]}, "sub": sub}
    resp = await proxy.get("/fhir/R4/Patient/pat-a", headers=bearer(issuer.token(**claims)))
    assert resp.status == 401, await resp.text()
    assert (await resp.json())["resourceType"] == "OperationOutcome"


async def test_a_token_with_no_scope_reads_nothing(proxy, issuer, stored):
    auth = bearer(issuer.token())  # a valid token: no roles, no scopes
    for path in ("Patient/pat-a", "Condition/cond-a", "Condition?code=D50.9", "Patient/pat-a/_history"):
        resp = await proxy.get(f"/fhir/R4/{path}", headers=auth)
        assert resp.status == 403, path
        assert "Wulandari" not in await resp.text()
    before = len(stored.requests())
    await proxy.get("/fhir/R4/Condition?code=D50.9", headers=auth)
    assert len(stored.requests()) == before  # refused before anything was forwarded


async def test_a_patient_app_stays_in_its_compartment_on_every_route(proxy, issuer, stored):
    auth = bearer(issuer.token(**_app("pat-a")))
    # searching by another person's NIK finds nobody: the search is confined to the own compartment
    bundle = await (await proxy.get(f"/fhir/R4/Patient?identifier={NIK}|3578016001900004", headers=auth)).json()
    assert _ids(bundle) == set()
    own = await (await proxy.get(f"/fhir/R4/Patient?identifier={NIK}|3174015507880001", headers=auth)).json()
    assert _ids(own) == {"Patient/pat-a"}
    # counts count only the own record
    count = await (await proxy.get("/fhir/R4/Condition?code=D50.9&_summary=count", headers=auth)).json()
    assert count["total"] == 1
    # another patient's resources, by id, by compartment, by operation: refused
    for path in (
        "Patient/pat-b",
        "Condition/cond-b",
        "Patient/pat-b/$everything",
        "Patient/pat-b/Condition",
        "Condition/_history",
        "_history",
        "Patient/$export",
        "$export",
        "?_type=Condition",
    ):
        resp = await proxy.get(f"/fhir/R4/{path}", headers=auth | {"Prefer": "respond-async"})
        assert resp.status == 403, (path, await resp.text())
        assert "Aminah" not in await resp.text()
    # the own record stays reachable
    assert (await proxy.get("/fhir/R4/Patient/pat-a", headers=auth)).status == 200
    assert (await proxy.get("/fhir/R4/Condition/cond-a", headers=auth)).status == 200
    # its own compartment search is forwarded (the Medplum test server has no compartment route: 404)
    assert (await proxy.get("/fhir/R4/Patient/pat-a/Condition", headers=auth)).status in (200, 404)


async def test_batch_reads_are_decided_entry_by_entry(proxy, issuer, stored):
    auth = bearer(issuer.token(**_app("pat-a"))) | FHIR_JSON
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Condition?code=D50.9"}},
            {"request": {"method": "GET", "url": "Condition/cond-b"}},
            {"request": {"method": "GET", "url": "Condition/cond-a"}},
        ],
    }
    resp = await proxy.post("/fhir/R4", data=orjson.dumps(batch), headers=auth)
    assert resp.status == 200, await resp.text()
    entries = (await resp.json())["entry"]
    assert not any(e.get("resource", {}).get("id") == "cond-b" for e in entries)
    assert _ids(entries[0]["resource"]) == {"Condition/cond-a"}
    assert entries[1]["response"]["status"].startswith("403")
    assert entries[2]["resource"]["id"] == "cond-a"
    # a batch entry the caller could never send on its own refuses the batch, before anything is forwarded
    before = len(stored.requests())
    batch["entry"] = [{"request": {"method": "GET", "url": "Condition/_history"}}]
    resp = await proxy.post("/fhir/R4", data=orjson.dumps(batch), headers=auth)
    assert resp.status == 403 and "entry[0]" in (await resp.json())["issue"][0]["diagnostics"]
    assert len(stored.requests()) == before


async def test_patient_scopes_never_widen_a_user_rule(proxy, issuer, stored):
    """A billing officer whose EHR-launched app also carries patient/ scopes (SMART apps often do)."""
    claims = {"realm_access": {"roles": ["billing"]}, "scope": "user/*.rs patient/*.rs", "patient": "pat-b"}
    auth = bearer(issuer.token(**claims))
    condition = await (await proxy.get("/fhir/R4/Condition/cond-a", headers=auth)).json()
    assert "coding" not in condition["code"]  # the diagnosis of someone else stays masked
    patient = await (await proxy.get("/fhir/R4/Patient/pat-a", headers=auth)).json()
    assert "family" not in patient["name"][0]
    # and it may not search by what only its patient/ grant covers (an oracle over everyone)
    resp = await proxy.get(f"/fhir/R4/Patient?identifier={NIK}|3174015507880001", headers=auth)
    assert resp.status == 403


async def test_replayed_index_tokens_are_recognised_in_any_spelling(proxy, issuer, stored):
    physician = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    found = await (await proxy.get(f"/fhir/R4/Patient?identifier={NIK}|3174015507880001", headers=physician)).json()
    assert _ids(found) == {"Patient/pat-a"}
    sent = [r["url"] for r in stored.requests() if r["url"].startswith("/fhir/R4/Patient?identifier=")][-1]
    token = sent.split("identifier=", 1)[1].split("&", 1)[0]
    billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs"))
    system, _, value = token.replace("%7C", "|").replace("%2F", "/").replace("%3A", ":").partition("|")
    variants = {
        "as minted": f"{system}|{value}",
        "upper-case field": f"{system.replace('/nik/', '/NIK/')}|{value}",
        "upper-case namespace": f"{system.replace('blind-index', 'BLIND-INDEX')}|{value}",
        "upper-case host": f"{system.replace('fhircrypt.dev', 'FHIRCRYPT.DEV')}|{value}",
        "percent-encoded": f"{system.replace('blind-index', '%62lind-index')}|{value}",
        "doubled slash": f"{system.replace('/blind-index/', '//blind-index/')}|{value}",
    }
    for name, variant in variants.items():
        resp = await proxy.get("/fhir/R4/Patient", params={"identifier": variant}, headers=billing)
        assert resp.status in (400, 403), (name, resp.status)
        assert "Wulandari" not in await resp.text()
        put = await proxy.put(
            "/fhir/R4/Patient",
            params={"identifier": variant},
            data=orjson.dumps({**OTHER, "id": None}),
            headers=billing | FHIR_JSON,
        )
        assert put.status in (400, 403), (name, put.status)
    versions = [r["meta"]["versionId"] for r in stored.dump() if r["resourceType"] == "Patient" and r["id"] == "pat-a"]
    assert versions == ["1"]  # nobody overwrote the patient


async def test_a_contained_patient_is_judged_with_its_container(
    proxy_for, clean_upstream, satusehat, jwt_proxy, issuer
):
    writer = await proxy_for(clean_upstream.base_url, satusehat)
    mother = {"resourceType": "Patient", "id": "pat-a", "name": [{"family": "Rahayu", "given": ["Dewi"]}]}
    org = {"resourceType": "Organization", "id": "org-1", "name": "Klinik Sehat", "contained": [mother]}
    resp = await writer.put("/fhir/R4/Organization/org-1", data=orjson.dumps(org), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    assert "Rahayu" not in orjson.dumps(clean_upstream.dump()).decode()
    app = await jwt_proxy()
    read = await app.get("/fhir/R4/Organization/org-1", headers=bearer(issuer.token(**_app("pat-a"))))
    assert read.status == 200, await read.text()
    assert "Rahayu" not in await read.text()  # pat-a's app: the contained "pat-a" is not its patient


async def test_conditions_of_others_are_not_in_a_patient_apps_search_of_its_own_type(proxy, issuer, stored):
    auth = bearer(issuer.token(**_app("pat-b")))
    bundle = await (await proxy.get("/fhir/R4/Condition", headers=auth)).json()
    assert _ids(bundle) == {f"Condition/{OTHER_CONDITION['id']}"}
    assert CONDITION["id"] not in orjson.dumps(bundle).decode()
    assert PATIENT["id"] not in {e["resource"]["subject"]["reference"] for e in bundle["entry"]}


async def test_audit_records_name_every_target_and_have_their_own_ids(jwt_proxy, issuer, stored, tmp_path):
    from proxy.audit.cli import init_trail

    trail = tmp_path / "audit.jsonl"
    init_trail(trail, tmp_path / "audit.key")
    proxy = await jwt_proxy(audit_trail=str(trail))
    physician = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs user/*.cud"))
    other = bearer(issuer.token(realm_access={"roles": ["clerk"]}, scope="user/*.rs"))
    same = {"X-Request-ID": "chosen-by-the-client"}
    await proxy.get("/fhir/R4/Patient/pat-a", headers=physician | same)
    await proxy.get("/fhir/R4/Patient/pat-b", headers=other | same)
    created = await proxy.post(
        "/fhir/R4/Organization",
        data=orjson.dumps({"resourceType": "Organization", "name": "Klinik"}),
        headers=physician | FHIR_JSON | {"Prefer": "return=minimal"},
    )
    assert created.status == 201, await created.text()
    new_org = created.headers["Location"].split("/fhir/R4/", 1)[1].split("/_history", 1)[0]
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "DELETE", "url": "Condition/cond-a"}},
            {"request": {"method": "DELETE", "url": "Observation/obs-a"}},
        ],
    }
    resp = await proxy.post("/fhir/R4", data=orjson.dumps(batch), headers=physician | FHIR_JSON)
    assert resp.status == 200, await resp.text()
    gone = await proxy.delete(f"/fhir/R4/Patient?identifier={NIK}|3578016001900004", headers=physician)
    assert gone.status in (200, 204), await gone.text()
    await proxy.server.close()  # flushes the trail
    events = [orjson.loads(line)["event"] for line in trail.read_text().splitlines()]
    assert len(events) == 5
    first, second = events[:2]
    assert first["id"] != second["id"]  # the same client-chosen X-Request-ID, two records
    for event in (first, second):
        assert {"value": "chosen-by-the-client"} in [e["what"].get("identifier") for e in event["entity"]]
    named = [[e["what"]["reference"] for e in ev["entity"] if "reference" in e.get("what", {})] for ev in events]
    assert new_org in named[2]
    assert {"Condition/cond-a", "Observation/obs-a"} <= set(named[3])
    assert "Patient/pat-b" in named[4]  # a conditional delete names what it deleted


async def test_smart_discovery_and_the_capability_statement_name_the_proxys_authorization(proxy, issuer):
    resp = await proxy.get("/fhir/R4/.well-known/smart-configuration")
    assert resp.status == 200, await resp.text()
    config = await resp.json()
    assert config["issuer"] == issuer.url and config["jwks_uri"] == f"{issuer.url}/jwks"
    assert {"permission-patient", "permission-user", "permission-v2"} <= set(config["capabilities"])
    statement = await (await proxy.get("/fhir/R4/metadata")).json()
    security = statement["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"


async def test_deleting_any_type_needs_a_delete_scope(proxy, issuer, stored):
    reader = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    org = {"resourceType": "Organization", "id": "org-x", "name": "Klinik"}
    writer = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.cruds"))
    assert (await proxy.put("/fhir/R4/Organization/org-x", data=orjson.dumps(org), headers=writer | FHIR_JSON)).ok
    resp = await proxy.delete("/fhir/R4/Organization/org-x", headers=reader)
    assert resp.status == 403, await resp.text()
    assert (await proxy.get("/fhir/R4/Organization/org-x", headers=reader)).status == 200


async def test_an_absolute_reference_to_another_servers_patient_is_nobodys_compartment(
    proxy_for, clean_upstream, satusehat, jwt_proxy, issuer
):
    writer = await proxy_for(clean_upstream.base_url, satusehat)
    foreign = {**CONDITION, "id": "cond-x", "subject": {"reference": "https://elsewhere.example/fhir/Patient/pat-a"}}
    resp = await writer.put("/fhir/R4/Condition/cond-x", data=orjson.dumps(foreign), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    app = await jwt_proxy()
    read = await app.get("/fhir/R4/Condition/cond-x", headers=bearer(issuer.token(**_app("pat-a"))))
    assert read.status == 403 and "D50.9" not in await read.text()


async def test_the_capability_statement_offers_only_searches_the_proxy_can_answer(proxy, satusehat):
    from proxy.policy.affects import answerable

    statement = await (await proxy.get("/fhir/R4/metadata")).json()
    offered = {r["type"]: {p["name"] for p in r.get("searchParam", [])} for r in statement["rest"][0]["resource"]}
    patient = satusehat.resources["Patient"]
    assert "identifier" in offered["Patient"] and answerable(patient, "identifier")  # blind-indexed
    assert all(answerable(patient, name) for name in offered["Patient"])
    refused = [name for name in ("address", "telecom", "phone") if not answerable(patient, name)]
    assert refused and not set(refused) & offered["Patient"]  # encrypted without an index: not offered


async def test_the_review_findings_through_a_real_fhircrypt_serve(tmp_path, clean_upstream, issuer):
    """Issue 14's observations 2, 3, 5, 6 and 10 as reproduced: a real ``fhircrypt serve`` process with JWT
    authentication in front of the test server, real tokens, the answers and what the server stored."""
    import asyncio

    import aiohttp

    from tests.conftest import ROOT
    from tests.serving import Served, make_keyring

    ring, kek = make_keyring(tmp_path)
    served = Served(
        ["--upstream", clean_upstream.base_url, "--policy", str(ROOT / "policies" / "satusehat.yaml"),
         "--oidc-issuer", issuer.url, "--audience", test_auth.AUDIENCE],
        {"FHIRCRYPT_KEYRING": str(ring), "FHIRCRYPT_KEK_FILE": str(kek)},
    )  # fmt: skip
    physician = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.cruds")) | FHIR_JSON
    app_b = bearer(issuer.token(scope="patient/*.cruds", patient="pat-b")) | FHIR_JSON
    try:
        await asyncio.to_thread(served.wait_for, "listening")
        async with aiohttp.ClientSession() as http:

            async def call(method: str, path: str, headers: dict, body: object = None) -> tuple[int, str]:
                data = orjson.dumps(body) if body is not None else None
                async with http.request(method, served.url("/fhir/R4/" + path), data=data, headers=headers) as resp:
                    return resp.status, await resp.text()

            for resource in (PATIENT, OTHER, CONDITION, OTHER_CONDITION):
                status, text = await call("PUT", f"{resource['resourceType']}/{resource['id']}", physician, resource)
                assert status == 201, text
            # 10: a token without a usable subject
            assert (await call("GET", "Patient/pat-a", bearer(issuer.token(sub="", scope="user/*.rs"))))[0] == 401
            # 2: a patient/ scope next to user/ ones widens nothing
            billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs patient/*.rs"))
            status, text = await call("GET", "Condition/cond-a", billing)
            assert status == 200 and "D50.9" not in text
            # 3: a patient app writes into another chart: by PATCH of its own record, or with itself as asserter
            mine = {**OTHER_CONDITION, "id": "cond-b2"}
            assert (await call("PUT", "Condition/cond-b2", app_b, mine))[0] == 201
            patch = [{"op": "replace", "path": "/subject/reference", "value": "Patient/pat-a"}]
            patched = await call(
                "PATCH", "Condition/cond-b2", app_b | {"Content-Type": "application/json-patch+json"}, patch
            )
            assert patched[0] == 403, patched
            sneaky = {**CONDITION, "id": None, "asserter": {"reference": "Patient/pat-b"}}
            assert (await call("POST", "Condition", app_b, {k: v for k, v in sneaky.items() if v}))[0] == 403
            # 6: nothing about other patients
            app_a = bearer(issuer.token(scope="patient/*.rs", patient="pat-a"))
            status, text = await call("GET", f"Patient?identifier={NIK}|3578016001900004", app_a)
            assert status == 200 and "pat-b" not in text
            status, text = await call("GET", "Condition?code=D50.9&_summary=count", app_a)
            assert status == 200 and orjson.loads(text)["total"] == 1
            for path in ("Patient/pat-b/$everything", "Condition/_history", "Patient/pat-b"):
                assert (await call("GET", path, app_a))[0] == 403, path
            # 5: a blind-index system in another letter case is no way around the group check
            variant = f"https://fhircrypt.dev/fhir/BLIND-INDEX/Patient/nik/identifier|{'0' * 32}"
            clerkless = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs"))
            assert (await call("GET", f"Patient?identifier={variant}", clerkless))[0] in (400, 403)
    finally:
        assert await asyncio.to_thread(served.stop) == 0
    stored = [r for r in clean_upstream.dump() if r["resourceType"] == "Condition"]
    assert {r["subject"]["reference"] for r in stored if r["id"] == "cond-b2"} == {"Patient/pat-b"}
    assert all("Wulandari" not in orjson.dumps(r).decode() for r in clean_upstream.dump())


async def test_operations_that_may_change_data_need_an_update_scope(proxy, issuer, stored):
    reader = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs")) | FHIR_JSON
    writer = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.cruds")) | FHIR_JSON
    params = orjson.dumps({"resourceType": "Parameters", "parameter": []})
    before = len(stored.requests())
    for path in ("Patient/pat-a/$meta-delete", "Patient/$expunge", "$expunge"):
        resp = await proxy.post(f"/fhir/R4/{path}", data=params, headers=reader)
        assert resp.status == 403 and "update scope" in (await resp.json())["issue"][0]["diagnostics"], path
    assert len(stored.requests()) == before  # refused before anything was forwarded
    resp = await proxy.post("/fhir/R4/Patient/pat-a/$meta-delete", data=params, headers=writer)
    assert resp.status != 403  # decided: forwarded (what the server makes of it is its own answer)
    everything = await proxy.get("/fhir/R4/Patient/pat-a/$everything", headers=reader)  # read-only: a read scope
    assert everything.status == 200


async def test_a_patient_apps_post_search_is_confined_too(proxy, issuer, stored):
    auth = bearer(issuer.token(**_app("pat-a"))) | {"Content-Type": "application/x-www-form-urlencoded"}
    resp = await proxy.post("/fhir/R4/Condition/_search", data="code=D50.9", headers=auth)
    assert resp.status == 200, await resp.text()
    assert _ids(await resp.json()) == {"Condition/cond-a"}
    resp = await proxy.post("/fhir/R4/Patient/_search", data="_id=pat-b", headers=auth)
    assert resp.status == 200 and _ids(await resp.json()) == set()
