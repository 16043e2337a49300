"""Closed defaults, property 7: extensions the proxy cannot encrypt on their own are refused, not stored clear.

An extension of a primitive element the policy leaves clear (``_gender.extension``) and a modifier
extension cannot be encrypted apart from their element (``proxy.transform.unsealable``); under
``extensions.unlisted: encrypt`` or ``refuse`` a write holding one whose URL the policy does not name
in ``extensions.clear`` is refused with a 400 naming its path and URL, never its value, and nothing
reaches the server. Against the real Medplum test server.
"""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import FHIR_JSON, leaked, unit_policy

X = "http://example.org/fhir/StructureDefinition/nickname"
CLEARED = "http://example.org/fhir/StructureDefinition/interpreter-required"
DAR = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
SECRET = "Wulandari-panggilan"


def _policy(mode: str = "encrypt", at_rest: str = "v2"):
    return unit_policy(
        f"""
fhircrypt-policy: 1
name: unsealable
defaults: {{at_rest_format: {at_rest}}}
groups: {{identity: {{}}, demographics: {{}}}}
resources:
  Patient:
    elements:
      - {{path: name, group: identity}}
      - {{path: birthDate, group: demographics}}
extensions:
  unlisted: {mode}
  group: demographics
  clear: [{CLEARED}]
"""
    )


def _ext(url: str = X, value: str = SECRET) -> dict:
    return {"extension": [{"url": url, "valueString": value}]}


REFUSED = {
    "an extension of a clear primitive": ({"gender": "female", "_gender": _ext()}, "Patient._gender.extension[0]"),
    "one of a repeating clear primitive": (
        {"communication": [{"language": {"text": "id"}, "preferred": True, "_preferred": _ext()}]},
        "Patient.communication[0]._preferred.extension[0]",
    ),
    "in a backbone element": (
        {"contact": [{"gender": "male", "_gender": _ext()}]},
        "Patient.contact[0]._gender.extension[0]",
    ),
    "in a data type one level down": (
        {"telecom": [{"system": "phone", "use": "home", "_use": _ext()}]},
        "Patient.telecom[0]._use.extension[0]",
    ),
    "a modifier extension": (
        {"modifierExtension": [{"url": X, "valueString": SECRET}]},
        "Patient.modifierExtension[0]",
    ),
    "a backbone's modifier extension": (
        {"contact": [{"modifierExtension": [{"url": X, "valueString": SECRET}]}]},
        "Patient.contact[0].modifierExtension[0]",
    ),
    "in a contained resource of a covered type": (
        {"contained": [{"resourceType": "Patient", "id": "c1", "gender": "male", "_gender": _ext()}]},
        "Patient.contained[0]._gender.extension[0]",
    ),
}


@pytest.mark.parametrize("mode", ["encrypt", "refuse"])
@pytest.mark.parametrize("case", list(REFUSED))
async def test_an_extension_that_cannot_be_encrypted_on_its_own_is_refused(proxy_for, clean_upstream, case, mode):
    body, path = REFUSED[case]
    client = await proxy_for(clean_upstream.base_url, _policy(mode))
    patient = {"resourceType": "Patient", **body}
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)
    text = await resp.text()
    assert resp.status == 400, text
    issue = (await resp.json())["issue"][0]
    assert issue["code"] == "security" and issue["expression"] == [path]
    assert issue["diagnostics"].startswith(f"{path}: ") and f"'{X}'" in issue["diagnostics"]
    assert f"extensions.unlisted: {mode}" in issue["diagnostics"] and SECRET not in text
    assert clean_upstream.requests() == [] and clean_upstream.dump() == []


async def test_the_same_in_a_transaction_refuses_the_bundle(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, _policy())
    patient = {"resourceType": "Patient", "gender": "female", "_gender": _ext()}
    entry = {"resource": patient, "request": {"method": "POST", "url": "Patient"}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 400 and SECRET not in await resp.text()
    assert clean_upstream.dump() == []


@pytest.mark.parametrize("at_rest", ["v1", "v2"])
async def test_what_the_policy_names_or_seals_passes(proxy_for, clean_upstream, at_rest):
    """Extensions of encrypted primitives are sealed with them (the marks left where they were pass), a URL
    in extensions.clear and data-absent-reason stay readable, and under allow nothing is refused."""
    client = await proxy_for(clean_upstream.base_url, _policy(at_rest=at_rest))
    patient = {
        "resourceType": "Patient",
        "name": [{"family": "Santoso", "_family": _ext(), "given": ["Budi", "Sri"], "_given": [None, _ext()]}],
        "birthDate": "1987-03-29",
        "_birthDate": _ext(),
        "gender": "unknown",
        "_gender": {"extension": [{"url": DAR, "valueCode": "asked-declined"}]},
        "modifierExtension": [{"url": CLEARED, "valueBoolean": True}],
        "communication": [{"language": {"text": "id"}, "_preferred": _ext(CLEARED, "yes")}],
    }
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    stored = clean_upstream.dump()
    assert not leaked([SECRET, "Santoso", "Sri"], orjson.dumps(stored).decode())
    read = await (await client.get(f"/fhir/R4/Patient/{(await resp.json())['id']}")).json()
    assert {k: read.get(k) for k in patient} == patient
    allowing = await proxy_for(clean_upstream.base_url, _policy("allow"))
    odd = {"resourceType": "Patient", "gender": "female", "_gender": _ext(), "modifierExtension": _ext()["extension"]}
    assert (await allowing.post("/fhir/R4/Patient", data=orjson.dumps(odd), headers=FHIR_JSON)).status == 201
