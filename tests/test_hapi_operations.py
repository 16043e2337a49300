"""Operations answered by HAPI FHIR itself, through the proxy: ``$validate`` and Group-level Bulk export.

Medplum's in-memory repository has neither (the test server adds a system-level export of its own), so
these run only against HAPI (``./dev test --upstream hapi``).
"""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import FHIR_JSON, PUBLIC_BASE, assert_no_plaintext, leaked, load_fixture
from tests.test_bulk import _as_sent, _local, _manifest
from tests.test_bundles import _needles
from tests.test_hapi import _stubs, errors_of
from tests.test_search import PATIENTS, SECRETS, satusehat_chained

pytestmark = pytest.mark.hapi


@pytest.fixture
async def client(proxy_for, clean_hapi, satusehat):
    return await proxy_for(clean_hapi.base_url, satusehat, upstream_timeout=120.0)


async def test_validate_through_the_proxy_checks_the_form_the_server_would_store(client, clean_hapi):
    """``$validate`` (``body: encrypt`` in the SATUSEHAT policy) sends HAPI the encrypted form, so the
    server validates what it would store, and HAPI stores nothing; its verdict is the plaintext's."""
    patient = load_fixture("satusehat/patient.json", _stubs(clean_hapi, "satusehat", ["patient.json"]))
    parameters = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient}]}
    resp = await client.post("/fhir/R4/Patient/$validate", data=orjson.dumps(parameters), headers=FHIR_JSON)
    assert resp.status in (200, 412), await resp.text()
    assert "X-Fhircrypt-Integrity" not in resp.headers  # HAPI's messages name fhircrypt's URLs: text, not ciphertext
    outcome = await resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    status, plain = clean_hapi.request("POST", "/Patient/$validate", parameters)
    assert status in (200, 412), plain
    assert errors_of(outcome) == errors_of(plain)
    # the messages are about the stored form: they quote none of the patient's values
    assert not leaked(_needles("patient.json"), orjson.dumps(outcome).decode())
    assert clean_hapi.request("GET", "/Patient?_summary=count")[1]["total"] == 0


async def test_validate_refuses_a_parameter_the_policy_does_not_list(client, clean_hapi):
    resp = await client.post("/fhir/R4/Patient/$validate?mode=create&unlisted=1", data=b"{}", headers=FHIR_JSON)
    assert resp.status in (400, 501), await resp.text()
    assert "unlisted" in (await resp.json())["issue"][0]["diagnostics"]


async def test_a_group_export_from_hapi_comes_back_decrypted_and_only_for_the_groups_members(client, clean_hapi):
    """HAPI's own Group-level export: the members (stored encrypted through the proxy) come back
    decrypted through the proxy's file links; a Patient outside the Group is not exported."""
    for patient in PATIENTS:
        resp = await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
    members, outsider = PATIENTS[:-1], PATIENTS[-1]
    group = {
        "resourceType": "Group",
        "id": "ward-3",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{p['id']}"}} for p in members],
    }
    resp = await client.put("/fhir/R4/Group/ward-3", data=orjson.dumps(group), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    assert_no_plaintext(clean_hapi.dump(), SECRETS)

    manifest = await _manifest(client, "/fhir/R4/Group/ward-3/$export?_type=Patient", timeout=180)
    urls = [item["url"] for item in manifest["output"] if item["type"] == "Patient"]
    assert urls and all(url.startswith(f"{PUBLIC_BASE}/$fhircrypt-link/file/") for url in urls)
    lines: list[str] = []
    for url in urls:
        resp = await client.get(_local(url))
        assert resp.status == 200, await resp.text()
        lines += (await resp.text()).splitlines()
    exported = {resource["id"]: resource for resource in map(orjson.loads, lines)}
    assert sorted(exported) == sorted(p["id"] for p in members)
    assert outsider["id"] not in exported
    for patient in members:
        assert _as_sent(exported[patient["id"]]) == _as_sent(patient)


@pytest.mark.parametrize("length", [12, 40, 60])
async def test_chained_names_of_any_length_are_found_by_prefix_and_whole_on_hapi(proxy_for, clean_hapi, length):
    """A chain grows 5 characters per character of the name part; HAPI indexes a bounded prefix of
    each string (200 characters), so a part longer than about 37 characters has a chain HAPI only
    partly indexes. Whole-value and prefix searches must still find the patient, and a patient whose
    name shares only the first characters must not be returned."""
    client = await proxy_for(clean_hapi.base_url, satusehat_chained(), upstream_timeout=120.0)
    family = ("Wiryawangsadiningrat" * 4)[:length]
    twin = family[:-1] + ("x" if family[-1] != "x" else "y")  # differs in the last character only
    for pid, name in (("p-long", family), ("p-twin", twin)):
        patient = {"resourceType": "Patient", "id": pid, "name": [{"family": name, "given": ["Ayu"]}]}
        resp = await client.put(f"/fhir/R4/Patient/{pid}", data=orjson.dumps(patient), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
    assert_no_plaintext(clean_hapi.dump(), [family, twin])
    for query, expected in ((family, {"p-long"}), (family[:5], {"p-long", "p-twin"})):
        resp = await client.get(f"/fhir/R4/Patient?family={query}")
        assert resp.status == 200, await resp.text()
        found = {e["resource"]["id"] for e in (await resp.json()).get("entry", [])}
        assert found == expected, (length, len(query))
