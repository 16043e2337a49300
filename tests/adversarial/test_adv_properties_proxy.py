"""Generated resources through the real proxy process into the real upstream, and back.

The shipped fixtures (valid for a strict server) are the skeletons; hypothesis replaces the
free text of every covered element with arbitrary Unicode (NFC and NFD) and needles,
birth dates with extreme ones, the narrative with a generated one, and adds a contained
resource of a covered type. Each example is written, read and searched through
``fhircrypt serve``; it must come back exactly, and no needle may reach the upstream:
neither in what it stores (every version) nor in any request it received.
"""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy.compiler import compile_file
from tests.adversarial.fhir_strategies import covered_needles, marked_text, mutated_fixture
from tests.adversarial.harness import ServedProxy
from tests.adversarial.profiles import examples
from tests.conftest import FIXTURES, ROOT, assert_no_plaintext

FIXED_IDS = {
    "PATIENT_ID": "pat-1",
    "NEWBORN_ID": "pat-2",
    "ENCOUNTER_ID": "enc-1",
    "CONDITION_ID": "cond-1",
    "OBSERVATION_ID": "obs-1",
    "MEDICATIONREQUEST_ID": "mr-1",
    "ORGANIZATION_ID": "org-1",
    "PRACTITIONER_ID": "prac-1",
    "PHARMACIST_ID": "prac-2",
    "LOCATION_ID": "loc-1",
    "PAYOR_ID": "org-2",
}


def _fixtures(policy_name: str) -> list[dict]:
    out = []
    for path in sorted((FIXTURES / policy_name).glob("*.json")):
        if path.name == "needles.json":
            continue
        text = path.read_text()
        for placeholder, value in FIXED_IDS.items():
            text = text.replace(placeholder, value)
        out.append(json.loads(text))
    return out


POLICY_NAMES = ("satusehat", "hipaa")
POLICIES = {name: compile_file(ROOT / "policies" / f"{name}.yaml") for name in POLICY_NAMES}
FIXTURE_SETS = {name: _fixtures(name) for name in POLICY_NAMES}


@st.composite
def written_resource(draw, policy_name: str) -> dict:
    covered = POLICIES[policy_name].resources
    fixture = draw(st.sampled_from(FIXTURE_SETS[policy_name]))
    resource = draw(mutated_fixture(fixture, covered[fixture["resourceType"]], covered))
    if draw(st.booleans()):  # a contained practitioner, referenced so that dom-3 holds
        practitioner = {
            "resourceType": "Practitioner",
            "id": "c1",
            "identifier": [{"system": "https://fhir.kemkes.go.id/id/nik", "value": draw(marked_text())}],
            "name": [{"text": draw(marked_text())}],
        }
        resource["contained"] = [practitioner]
        resource.setdefault("extension", []).append(
            {"url": "https://ext.example/recorded-by", "valueReference": {"reference": "#c1"}}
        )
    return resource


@pytest.fixture(scope="module", params=POLICY_NAMES)
def served(request, upstream):
    with ServedProxy(upstream.base_url, f"policies/{request.param}.yaml") as proxy:
        yield request.param, proxy


def _without_server_meta(resource: dict) -> dict:
    out = dict(resource)
    out.pop("id", None)
    meta = {k: v for k, v in out.pop("meta", {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    return out


@examples(30)
@given(data=st.data())
def test_generated_resources_round_trip_through_the_proxy_and_nothing_reaches_the_upstream(served, upstream, data):
    policy_name, proxy = served
    policy = POLICIES[policy_name]
    resource = data.draw(written_resource(policy_name))
    rtype = resource["resourceType"]
    needles = covered_needles(resource, policy.resources[rtype], policy.resources)
    assert needles  # every fixture has covered free text and a narrative: the check below must bite
    upstream.reset()
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    created = proxy.request("POST", f"/fhir/R4/{rtype}", orjson.dumps(resource), headers)
    assert created.status == 201, created.body[:500]
    rid = created.json()["id"]
    back = proxy.request("GET", f"/fhir/R4/{rtype}/{rid}", headers={"Accept": "application/fhir+json"})
    assert back.status == 200
    assert _without_server_meta(back.json()) == resource
    found = proxy.request("GET", f"/fhir/R4/{rtype}?_id={rid}", headers={"Accept": "application/fhir+json"})
    assert found.status == 200
    (entry,) = found.json()["entry"]
    assert _without_server_meta(entry["resource"]) == resource
    assert_no_plaintext(upstream.dump(), needles)
    assert_no_plaintext(({"request": r} for r in upstream.requests()), needles)
