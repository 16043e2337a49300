"""The PHI sentinel's ``encrypt`` action: hits in clear elements of covered types are sealed in place.

A NIK typed into ``Observation.code.text`` (which the SATUSEHAT policy leaves clear, so that searching
by test keeps working) is sealed where it is, read back by callers holding the sentinel's group, masked
for the others, kept through their write-backs, and every tampering with it is an integrity failure.
What cannot be sealed (a type the policy does not cover, a search value, a patch of an uncovered type,
an operation parameter) is refused: those cases are in test_sentinel.py under every mode.
"""

from __future__ import annotations

import copy

import orjson
import pytest

from proxy.outcome import FhirError
from proxy.policy.compiler import CompiledPolicy, compile_text
from proxy.policy.loader import PolicyError
from proxy.transform import markers as mk
from proxy.transform.records import ALL_GROUPS, ReadReport, covered_locations, decrypt_resource, encrypt_resource
from tests import test_auth
from tests.conftest import FHIR_JSON, assert_no_plaintext
from tests.test_auth import AUDIENCE, bearer
from tests.test_bulk import _local, _manifest
from tests.test_closed_defaults import SATUSEHAT, SENTINEL_LINE
from tests.test_sentinel import NIK, NIK_WOMAN

issuer = test_auth.issuer  # the real OpenID provider of the role matrix (a fixture)
PHONE = "0812-3456-7890"


def sealing(line: str = "sentinel: {nik: encrypt, bpjs: refuse, ihs: refuse, phone: encrypt}\n") -> CompiledPolicy:
    """The shipped SATUSEHAT policy with the NIK and phone detectors set to encrypt."""
    assert SATUSEHAT.count(SENTINEL_LINE) == 1
    return compile_text(SATUSEHAT.replace(SENTINEL_LINE, line), "satusehat-sealing.yaml")


def observation(text: str) -> dict:
    return {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}], "text": text},
        "subject": {"reference": "Patient/p1"},
    }


def location_with_phone_in_an_alias() -> dict:
    """A phone number typed into a repeating primitive the policy leaves clear (a Location's aliases)."""
    return {"resourceType": "Location", "id": "l1", "name": "Poli Umum", "alias": ["Poli 1", f"HP {PHONE}", "Lt 2"]}


def _sealed(resource: dict, policy: CompiledPolicy, keyring) -> dict:
    stored = copy.deepcopy(resource)
    encrypt_resource(stored, policy.resources[resource["resourceType"]], keyring)
    return stored


def _read(stored: dict, policy: CompiledPolicy, keyring, grants=ALL_GROUPS) -> tuple[dict, ReadReport]:
    back, report = copy.deepcopy(stored), ReadReport()
    decrypt_resource(back, policy.resources[stored["resourceType"]], keyring, grants, "mask", report)
    return back, report


# --------------------------------------------------------------------------- policy


def test_encrypt_needs_a_declared_group_and_defaults_to_the_identifiers_one():
    policy = sealing()
    assert policy.sentinel.group == policy.closure.identifier_group == "identity"
    assert policy.sentinel.sealing == ("nik", "phone")
    assert sealing("sentinel: {nik: encrypt, group: demographics, bpjs: refuse, ihs: refuse}\n").resources[
        "Observation"
    ].stray.groups == {"demographics"}
    with pytest.raises(PolicyError, match="unknown group 'nobody'"):
        sealing("sentinel: {nik: encrypt, group: nobody}\n")
    without_group = SATUSEHAT.replace(SENTINEL_LINE, "sentinel: {nik: encrypt}\n").replace(
        "  unlisted_systems: encrypt\n  group: identity\n", "  unlisted_systems: refuse\n"
    )
    with pytest.raises(PolicyError, match="encrypt needs a group"):
        compile_text(without_group, "no-group.yaml")


# --------------------------------------------------------------------------- records


def test_a_hit_in_a_clear_element_is_sealed_in_place_and_read_back(keyring):
    policy = sealing()
    original = observation(f"Cek kolesterol, NIK {NIK}")
    assert "code.text" not in covered_locations(original, policy.resources["Observation"])  # a clear element
    stored = _sealed(original, policy, keyring)
    assert NIK not in orjson.dumps(stored).decode()
    assert "text" not in stored["code"] and stored["code"]["_text"]["extension"][0] == mk.dar_masked()
    assert {"system": mk.TAG_SYSTEM, "code": mk.STRAY_CODE} in stored["meta"]["tag"]
    back, report = _read(stored, policy, keyring)
    assert back == original and report.failures == [] and report.decrypted_groups >= {"identity"}


def test_a_hit_in_a_repeating_primitive_seals_that_item_only(keyring):
    policy = sealing()
    original = location_with_phone_in_an_alias()
    assert covered_locations(original, policy.resources["Location"]) == set()
    stored = _sealed(original, policy, keyring)
    assert stored["alias"] == ["Poli 1", None, "Lt 2"] and PHONE not in orjson.dumps(stored).decode()
    assert stored["_alias"][0] is None and stored["_alias"][2] is None
    back, report = _read(stored, policy, keyring)
    assert back == original and report.failures == []


def test_a_record_without_hits_carries_no_sentinel_tag(keyring):
    stored = _sealed(observation("Cek kolesterol"), sealing(), keyring)
    assert {"system": mk.TAG_SYSTEM, "code": mk.STRAY_CODE} not in stored["meta"]["tag"]


def test_readers_without_the_group_get_the_sealed_value_masked(keyring):
    policy = sealing()
    stored = _sealed(observation(f"NIK {NIK}"), policy, keyring)
    back, report = _read(stored, policy, keyring, frozenset({"lab", "demographics"}))
    assert back["code"] == {
        "coding": [{"system": "http://loinc.org", "code": "8302-2"}],
        "_text": mk.masked_form(),
    }
    assert report.masked_groups == {"identity"} and report.failures == []
    assert {"code": "MASKED"}.items() <= back["meta"]["security"][0].items()


def _tag_removed(stored: dict) -> None:
    stored["meta"]["tag"] = [t for t in stored["meta"]["tag"] if t.get("code") != mk.STRAY_CODE]


def _moved(stored: dict) -> None:  # the sealed value put at another clear element of the same record
    stored["_status"] = stored["code"].pop("_text")
    stored.pop("status")


def _removed(stored: dict) -> None:
    del stored["code"]["_text"]


def _duplicated(stored: dict) -> None:
    stored["_status"] = copy.deepcopy(stored["code"]["_text"])


def _replaced_by_plaintext(stored: dict) -> None:
    stored["code"]["text"] = "forged"


TAMPERING = {
    "the sentinel tag removed": _tag_removed,
    "the sealed value moved": _moved,
    "the sealed value removed": _removed,
    "the sealed value duplicated elsewhere": _duplicated,
    "plaintext put beside the sealed value": _replaced_by_plaintext,
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_with_a_sealed_value_is_an_integrity_failure(keyring, case):
    policy = sealing()
    stored = _sealed(observation(f"NIK {NIK}"), policy, keyring)
    TAMPERING[case](stored)
    back, report = _read(stored, policy, keyring)
    assert report.failures, case
    assert NIK not in orjson.dumps(back).decode() and "forged" not in orjson.dumps(back).decode()


def test_a_sealed_value_replayed_from_another_version_does_not_verify(keyring):
    policy = sealing()
    old = _sealed(observation(f"NIK {NIK}"), policy, keyring)
    new = _sealed(observation(f"NIK {NIK_WOMAN}"), policy, keyring)
    new["code"]["_text"] = old["code"]["_text"]
    back, report = _read(new, policy, keyring)
    assert report.failures and NIK not in orjson.dumps(back).decode()


def test_a_hit_that_is_no_element_value_is_refused(keyring):
    weird = observation("ok")
    weird["code"]["1234"] = f"NIK {NIK}"  # a key that is no element name could be a value itself
    with pytest.raises(FhirError) as refused:
        _sealed(weird, sealing(), keyring)
    message = str(refused.value)
    assert "Observation.code.?: " in message and "cannot be sealed here" in message and NIK not in message


# --------------------------------------------------------------------------- through the proxy


async def test_through_the_proxy_the_server_never_sees_it_and_write_backs_keep_it(proxy_for, clean_upstream, issuer):
    policy = sealing()
    writer = await proxy_for(clean_upstream.base_url, policy)
    sent = observation(f"Cek kolesterol, NIK {NIK}")
    del sent["id"]
    resp = await writer.post("/fhir/R4/Observation", data=orjson.dumps(sent), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    oid = (await resp.json())["id"]
    assert_no_plaintext(clean_upstream.dump(), [NIK])
    assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), [NIK])

    proxy = await proxy_for(clean_upstream.base_url, policy, auth="jwt", oidc_issuer=issuer.url, audience=AUDIENCE)

    def token(role: str) -> dict:
        return bearer(issuer.token(realm_access={"roles": [role]}, scope="user/*.cruds"))

    physician = await (await proxy.get(f"/fhir/R4/Observation/{oid}", headers=token("physician"))).json()
    assert physician["code"]["text"] == sent["code"]["text"]
    pharmacist = await (await proxy.get(f"/fhir/R4/Observation/{oid}", headers=token("pharmacist"))).json()
    assert pharmacist["code"].get("_text") == mk.masked_form() and NIK not in orjson.dumps(pharmacist).decode()

    pharmacist["status"] = "amended"  # a change it may make; the sealed value it never saw must survive
    resp = await proxy.put(
        f"/fhir/R4/Observation/{oid}", data=orjson.dumps(pharmacist), headers={**FHIR_JSON, **token("pharmacist")}
    )
    assert resp.status == 200, await resp.text()
    after = await (await proxy.get(f"/fhir/R4/Observation/{oid}", headers=token("physician"))).json()
    assert after["status"] == "amended" and after["code"]["text"] == sent["code"]["text"]
    assert_no_plaintext(clean_upstream.dump(), [NIK])


async def test_the_closed_defaults_make_nearly_every_type_sealable_and_search_values_are_refused(
    proxy_for, clean_upstream
):
    policy = sealing()
    assert "Flag" in policy.resources  # covered by the closed defaults alone (it has identifiers and extensions)
    client = await proxy_for(clean_upstream.base_url, policy)
    flag = {"resourceType": "Flag", "status": "active", "code": {"text": f"KTP {NIK}"}, "subject": {"display": "x"}}
    resp = await client.post("/fhir/R4/Flag", data=orjson.dumps(flag), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    back = await (await client.get(f"/fhir/R4/Flag/{(await resp.json())['id']}")).json()
    assert back["code"] == flag["code"]
    assert_no_plaintext(clean_upstream.dump(), [NIK])

    clean_upstream.reset()
    resp = await client.get(f"/fhir/R4/Location?address-city={NIK}")  # a clear search value: forwarded as is
    body = await resp.text()
    assert resp.status == 400 and "cannot be sealed here" in body and "(sentinel.nik: encrypt" in body
    assert NIK not in body and clean_upstream.requests() == []


async def test_the_shipped_policy_seals_a_patients_name_repeated_in_a_clear_element(
    proxy_for, clean_upstream, satusehat
):
    """The issue's case in the default configuration: nothing of the name is stored in the clear."""
    patient = {"resourceType": "Patient", "name": [{"family": "Wirahadikusuma", "given": ["Sulastri"]}]}
    flag = {
        "resourceType": "Flag",
        "status": "active",
        "code": {"text": "Sulastri alergi penisilin, konfirmasi ke keluarga"},
        "subject": {"reference": "urn:uuid:p1"},
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:p1", "resource": patient, "request": {"method": "POST", "url": "Patient"}},
            {"resource": flag, "request": {"method": "POST", "url": "Flag"}},
        ],
    }
    client = await proxy_for(clean_upstream.base_url, satusehat)
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    assert_no_plaintext(clean_upstream.dump(), ["Sulastri", "Wirahadikusuma", "penisilin"])
    location = (await resp.json())["entry"][1]["response"]["location"]
    back = await (await client.get("/fhir/R4/" + location.split("/_history")[0])).json()
    assert back["code"]["text"] == flag["code"]["text"]


async def test_a_hit_in_a_contained_resource_is_sealed_under_its_own_envelope(proxy_for, clean_upstream):
    policy = sealing()
    client = await proxy_for(clean_upstream.base_url, policy)
    contained = {"resourceType": "Location", "id": "loc", "name": "Poli", "alias": [f"HP {PHONE}"]}
    sent = {**observation(f"NIK {NIK}"), "contained": [contained], "subject": {"reference": "#loc"}}
    del sent["id"]
    resp = await client.post("/fhir/R4/Observation", data=orjson.dumps(sent), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    assert_no_plaintext(clean_upstream.dump(), [NIK, PHONE])
    stored = clean_upstream.dump()[0]
    inner_tags = {t["code"] for t in stored["contained"][0]["meta"]["tag"]}
    assert inner_tags == {mk.TAG_CODE, mk.STRAY_CODE}  # the contained Location's own record
    back = await (await client.get(f"/fhir/R4/Observation/{(await resp.json())['id']}")).json()
    assert back["code"]["text"] == sent["code"]["text"] and back["contained"] == [contained]


def test_only_names_the_policy_encrypts_are_secrets_not_those_under_an_extension_catch_all(satusehat):
    """Practitioner.name is clear in SATUSEHAT; the closed default for extensions inside it encrypts no name."""
    assert "Practitioner" not in satusehat.sentinel.name_keys
    assert satusehat.sentinel.name_keys["Patient"] == ("name",)


async def test_a_clear_name_in_a_contained_resource_is_neither_sealed_nor_refused(proxy_for, clean_upstream, satusehat):
    client = await proxy_for(clean_upstream.base_url, satusehat)
    practitioner = {"resourceType": "Practitioner", "id": "c1", "name": [{"text": "dr. Siti Aminah"}]}
    sent = {**observation("Tekanan darah"), "contained": [practitioner], "performer": [{"reference": "#c1"}]}
    del sent["id"]
    sent["note"] = [{"text": "Diukur oleh dr. Siti Aminah"}]
    resp = await client.post("/fhir/R4/Observation", data=orjson.dumps(sent), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    stored = clean_upstream.dump()[0]
    assert stored["contained"][0]["name"] == practitioner["name"]  # clear, as the policy says


async def test_a_json_patch_that_types_a_nik_into_a_clear_element_is_sealed_and_reads_back(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, sealing())
    sent = observation("Cek kolesterol")
    del sent["id"]
    created = await (await client.post("/fhir/R4/Observation", data=orjson.dumps(sent), headers=FHIR_JSON)).json()
    patch = [{"op": "replace", "path": "/code/text", "value": f"Cek kolesterol, NIK {NIK}"}]
    resp = await client.patch(
        f"/fhir/R4/Observation/{created['id']}",
        data=orjson.dumps(patch),
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert resp.status == 200, await resp.text()
    assert_no_plaintext(clean_upstream.dump(), [NIK])
    history = await (await client.get(f"/fhir/R4/Observation/{created['id']}/_history")).json()
    texts = sorted(e["resource"]["code"]["text"] for e in history["entry"])
    assert texts == ["Cek kolesterol", f"Cek kolesterol, NIK {NIK}"]


async def test_a_bulk_export_file_carries_the_sealed_value_decrypted(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, sealing())
    flag = {"resourceType": "Flag", "status": "active", "code": {"text": f"KTP {NIK}"}, "subject": {"display": "x"}}
    resp = await client.post("/fhir/R4/Flag", data=orjson.dumps(flag), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    manifest = await _manifest(client, "/fhir/R4/$export?_type=Flag")
    (item,) = manifest["output"]
    text = await (await client.get(_local(item["url"]))).text()
    (line,) = text.splitlines()
    assert orjson.loads(line)["code"] == flag["code"] and "fhircrypt.dev" not in text
    assert_no_plaintext(clean_upstream.dump(), [NIK])
