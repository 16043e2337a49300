"""The proxy in front of HAPI FHIR's JPA server (tests/hapi/), the server most hospitals run.

Medplum's in-memory repository answers chains, ``_has`` and ``_include`` with nothing and has no
paging links; HAPI answers them for real, so here search rewriting, ``_include`` decryption and
paging through the server's own links are checked on real results. The at-rest scans read what
HAPI stores (every version) straight through its REST API. Runs with ``./dev test --upstream hapi``.
A behaviour both servers must show is tested once, against both, through conftest's ``clean_server``
(conditional create, update and delete by NIK in test_search, the Binary round trips in test_binary).
"""

from __future__ import annotations

import json
import re

import orjson
import pytest

from proxy.policy.compiler import compile_file
from tests.conftest import FHIR_JSON, FIXTURES, PUBLIC_BASE, ROOT, assert_no_plaintext, load_fixture
from tests.test_bulk import _as_sent, _local, _manifest
from tests.test_bundles import FIXED, SCENARIO, _clean, _scenario, observation_referring_by_nik
from tests.test_search import NIK, PATIENTS, QUERIES, SECRETS
from tests.test_shipped_policies import ORDER, write_every_fixture

pytestmark = pytest.mark.hapi

PROXY_HOST = "http://proxy.test"
PLACEHOLDER_REFERENCE = re.compile(r'"reference":\s*"([A-Z][A-Za-z]+)/([A-Z][A-Z_]*_ID)"')
CONDITIONS = [
    {
        "resourceType": "Condition",
        "id": "c-budi",
        "subject": {"reference": "Patient/p-budi"},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "D50.9"}]},
    },
    {
        "resourceType": "Condition",
        "id": "c-siti",
        "subject": {"reference": "Patient/p-siti"},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"}]},
    },
]
# Searches Medplum's repository cannot answer (chains, reverse chains, _include, _revinclude) and _sort.
LINKED_QUERIES = [
    f"Condition?subject:Patient.identifier={NIK}|3273012903870002",
    "Condition?patient.name=budiarto",
    "Condition?patient.family=santoso",
    "Patient?_has:Condition:subject:code=D50.9",
    "Condition?code=D50.9&_include=Condition:subject",
    "Condition?_include=Condition:patient",
    f"Patient?identifier={NIK}|3578016001900004&_revinclude=Condition:subject",
    "Patient?_sort=-_id",
    "Patient?gender=male&_sort=-_lastUpdated,_id",
]


@pytest.fixture
async def client(proxy_for, clean_hapi, satusehat):
    return await proxy_for(clean_hapi.base_url, satusehat, upstream_timeout=120.0)


def _entries(bundle: dict) -> list[tuple[str, str, str]]:
    """What a search found: (type, id, match or include) of every entry, in a stable order."""
    return sorted(
        (e["resource"]["resourceType"], e["resource"]["id"], e.get("search", {}).get("mode", "match"))
        for e in bundle.get("entry", [])
    )


def _order(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def _next(bundle: dict) -> str | None:
    return next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)


async def _through_proxy(client, url: str) -> dict:
    resp = await client.get(url[len(PROXY_HOST) :] if url.startswith(PROXY_HOST) else url)
    assert resp.status == 200, (url, await resp.text())
    return await resp.json()


def _put_stub(hapi, rtype: str, stub: str) -> None:
    """An empty resource straight at HAPI (no PHI), for fixtures to refer to: HAPI refuses a reference
    to a resource it does not hold (Medplum does not check)."""
    status, answer = hapi.request("PUT", f"/{rtype}/{stub}", {"resourceType": rtype, "id": stub})
    assert status in (200, 201), answer


def _stubs(hapi, policy_name: str, names: list[str] | None = None) -> dict[str, str]:
    """A stub for every placeholder the fixtures refer to (some are not part of the scenario, some come
    later in it); returns the placeholder ids."""
    ids: dict[str, str] = {}
    for name in names or ORDER[policy_name]:
        for rtype, placeholder in PLACEHOLDER_REFERENCE.findall((FIXTURES / policy_name / name).read_text()):
            ids[placeholder] = placeholder.lower().replace("_", "-")
            _put_stub(hapi, rtype, ids[placeholder])
    return ids


def _put_fixed_stubs(hapi) -> None:
    """The organisation, practitioner and location test_bundles' scenario refers to by fixed ids."""
    for rtype, placeholder in (
        ("Organization", "ORGANIZATION_ID"),
        ("Practitioner", "PRACTITIONER_ID"),
        ("Location", "LOCATION_ID"),
    ):
        _put_stub(hapi, rtype, FIXED[placeholder])


@pytest.mark.parametrize("policy_name", sorted(ORDER))
async def test_every_fixture_round_trips_and_nothing_is_plaintext_in_hapi(proxy_for, clean_hapi, policy_name):
    policy = compile_file(ROOT / "policies" / f"{policy_name}.yaml")
    client = await proxy_for(clean_hapi.base_url, policy, upstream_timeout=120.0)
    written = await write_every_fixture(client, policy_name, _stubs(clean_hapi, policy_name))
    stored = clean_hapi.dump()
    encrypted = [r for r in stored if any(t.get("code") == "encrypted" for t in r.get("meta", {}).get("tag", []))]
    assert len(encrypted) == 2 * len(ORDER[policy_name])  # every fixture, created and updated: the scan is not vacuous
    assert_no_plaintext(stored, written)


async def test_search_results_match_plaintext_hapi_including_chains_and_includes(client, clean_hapi):
    """The comparison suite of test_search plus the searches only a real server answers: each query
    through the proxy on encrypted data finds exactly what HAPI finds on the same data in plaintext."""
    queries = [f"Patient?{q}" for q in QUERIES] + LINKED_QUERIES
    for resource in PATIENTS + CONDITIONS:
        status, answer = clean_hapi.request("PUT", f"/{resource['resourceType']}/{resource['id']}", resource)
        assert status == 201, answer
    # a page of a search without _sort holds any of the matches (FHIR leaves the order to the server, and
    # HAPI orders chains otherwise than tokens): such a page is compared with all the matches
    unsorted_pages = {q: re.sub(r"&_count=\d+", "", q) for q in queries if "_count=" in q and "_sort=" not in q}
    answers = {q: clean_hapi.request("GET", f"/{q}")[1] for q in [*queries, *unsorted_pages.values()]}
    expected = {q: _entries(bundle) for q, bundle in answers.items()}
    order = {q: _order(bundle) for q, bundle in answers.items()}
    assert all(expected[q] for q in LINKED_QUERIES), expected  # HAPI answers them: the comparison is not vacuous
    assert ("Patient", "p-budi", "include") in expected["Condition?code=D50.9&_include=Condition:subject"]

    clean_hapi.reset()
    originals = {(r["resourceType"], r["id"]): r for r in PATIENTS + CONDITIONS}
    for resource in PATIENTS + CONDITIONS:
        url = f"/fhir/R4/{resource['resourceType']}/{resource['id']}"
        resp = await client.put(url, data=orjson.dumps(resource), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
    for query in queries:
        bundle = await _through_proxy(client, f"/fhir/R4/{query}")
        if query in unsorted_pages:
            got = _entries(bundle)
            assert len(got) == len(expected[query]) and set(got) <= set(expected[unsorted_pages[query]]), query
        else:
            assert _entries(bundle) == expected[query], query
        if "_sort=" in query:
            assert _order(bundle) == order[query], query
        for entry in bundle.get("entry", []):  # matches and includes alike come back decrypted
            resource = entry["resource"]
            assert resource == originals[resource["resourceType"], resource["id"]] | {"meta": resource["meta"]}
    assert_no_plaintext(clean_hapi.dump(), [*SECRETS, "D50.9", "E11.9"])


@pytest.mark.parametrize(
    ("whole", "middle"),
    [("name=rahayu", "name=ahayu"), ("family=santoso", "family=ntoso"), ("given=siti", "given=iti")],
)
async def test_string_search_is_a_prefix_match_on_hapi_as_through_the_proxy(client, clean_hapi, whole, middle):
    """HAPI matches strings from the start of a word (Medplum's repository matches anywhere): the
    proxy's name indexes are prefixes, so through the proxy a name search finds what HAPI finds."""
    for patient in PATIENTS:
        assert clean_hapi.request("PUT", f"/Patient/{patient['id']}", patient)[0] == 201
    assert _entries(clean_hapi.request("GET", f"/Patient?{whole}")[1])
    assert _entries(clean_hapi.request("GET", f"/Patient?{middle}")[1]) == []
    clean_hapi.reset()
    for patient in PATIENTS:
        await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert _entries(await _through_proxy(client, f"/fhir/R4/Patient?{whole}"))
    assert _entries(await _through_proxy(client, f"/fhir/R4/Patient?{middle}")) == []


async def test_hapi_refuses_a_reference_to_a_resource_it_does_not_hold(client, clean_hapi):
    """Medplum stores a reference to nothing; HAPI refuses the write (referential integrity), and the
    proxy passes HAPI's OperationOutcome on (it names the reference, not a value): SATUSEHAT-style
    clients must write what they refer to first, or send one transaction."""
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "Hb"},
        "subject": {"reference": "Patient/absent"},
        "valueQuantity": {"value": 9.8, "unit": "g/dL"},
    }
    resp = await client.post("/fhir/R4/Observation", data=orjson.dumps(observation), headers=FHIR_JSON)
    assert resp.status in (400, 404, 422), await resp.text()
    outcome = await resp.json()
    assert outcome["resourceType"] == "OperationOutcome" and "Patient/absent" in orjson.dumps(outcome).decode()
    assert clean_hapi.dump() == []


@pytest.mark.parametrize("query", ["Patient?_count=2", "Patient?gender=male&_count=1", "Patient?name=santoso&_count=1"])
async def test_paging_through_hapis_own_links_stays_on_the_proxy(client, clean_hapi, query):
    """HAPI pages with ``_getpages`` links on its own base (not on the resource type); each link must come
    back on the proxy's base, and following them through the proxy finds what HAPI finds on plaintext."""
    for patient in PATIENTS:
        assert clean_hapi.request("PUT", f"/Patient/{patient['id']}", patient)[0] == 201
    direct = clean_hapi.pages(f"/{query}")
    assert len(direct) >= 2  # HAPI pages this query: the test follows real next links
    assert "_getpages=" in _next(direct[0])
    clean_hapi.reset()
    for patient in PATIENTS:
        resp = await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()

    pages, url = [], f"/fhir/R4/{query}"
    while url:
        page = await _through_proxy(client, url)
        links = [link["url"] for link in page.get("link", [])]
        assert links and all(link.startswith(PUBLIC_BASE) for link in links), links
        assert clean_hapi.base_url not in orjson.dumps(page).decode()
        pages.append(page)
        url = _next(page)
    assert sorted(e for page in pages for e in _entries(page)) == sorted(e for page in direct for e in _entries(page))
    assert len(pages) == len(direct)
    for page in pages:
        for entry in page.get("entry", []):
            original = next(p for p in PATIENTS if p["id"] == entry["resource"]["id"])
            assert entry["resource"]["identifier"] == original["identifier"]  # decrypted on every page
            assert entry["fullUrl"] == f"{PUBLIC_BASE}/Patient/{original['id']}"
    previous = next(link["url"] for link in pages[-1]["link"] if link["relation"] == "previous")
    assert _entries(await _through_proxy(client, previous)) == _entries(pages[-2])


async def test_a_satusehat_transaction_is_stored_encrypted_with_its_urn_links_resolved(client, clean_hapi):
    _put_fixed_stubs(clean_hapi)
    bundle = _scenario()
    originals = [entry["resource"] for entry in orjson.loads(orjson.dumps(bundle))["entry"]]
    prefer = {"Prefer": "return=representation"}  # HAPI answers a transaction with locations only otherwise
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON | prefer)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert [e["response"]["status"][:3] for e in answer["entry"]] == ["201"] * len(SCENARIO)
    ids = {}
    for original, entry in zip(originals, answer["entry"], strict=True):
        ids[entry["resource"]["resourceType"]] = entry["resource"]["id"]
        assert _clean(entry["resource"]) == _clean(original)  # the answer is decrypted
        back = await _through_proxy(client, f"/fhir/R4/{entry['response']['location'].split('/_history')[0]}")
        assert _clean(back) == _clean(original)
    condition = await _through_proxy(client, f"/fhir/R4/Condition/{ids['Condition']}")
    assert condition["subject"]["reference"] == f"Patient/{ids['Patient']}"
    needles = json.loads((FIXTURES / "satusehat" / "needles.json").read_text())
    assert_no_plaintext(clean_hapi.dump(), [n for name in SCENARIO for n in needles[name]])


async def test_a_conditional_reference_by_nik_in_a_transaction_is_resolved_by_hapi(client, clean_hapi):
    """Medplum leaves ``Patient?identifier=…`` references in bodies as they are; HAPI resolves them
    when the transaction is processed. Through the proxy the NIK becomes its blind-index token, and
    HAPI must still resolve it to the one patient it belongs to."""
    _put_fixed_stubs(clean_hapi)
    for patient in PATIENTS:
        resp = await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
    observation = observation_referring_by_nik("3578016001900004")
    entry = {"resource": observation, "request": {"method": "POST", "url": "Observation"}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    (entry,) = (await resp.json())["entry"]
    assert "resource" not in entry  # HAPI's default for transactions: the location, not the resource
    location = entry["response"]["location"].split("/_history")[0]
    stored = await _through_proxy(client, f"/fhir/R4/{location}")
    assert stored["subject"]["reference"] == "Patient/p-siti"
    assert_no_plaintext(clean_hapi.dump(), ["3578016001900004", *SECRETS])


async def test_history_of_a_patient_comes_back_decrypted_version_by_version(client, clean_hapi):
    patient = PATIENTS[2]
    versions = [patient, {**patient, "birthDate": "1987-04-13"}, {**patient, "telecom": patient["telecom"][:1]}]
    for version in versions:
        resp = await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(version), headers=FHIR_JSON)
        assert resp.status in (200, 201), await resp.text()
    history = await _through_proxy(client, f"/fhir/R4/Patient/{patient['id']}/_history")
    assert history["type"] == "history"
    back = [{k: v for k, v in e["resource"].items() if k != "meta"} for e in history["entry"]]
    assert back == versions[::-1]  # newest first, each version decrypted with its own record keys
    assert all(link["url"].startswith(PUBLIC_BASE) for link in history["link"])
    assert_no_plaintext(clean_hapi.dump(), [*SECRETS, "1987-04-13"])


async def test_everything_through_the_proxy_returns_the_record_decrypted(client, clean_hapi):
    ids = _stubs(clean_hapi, "satusehat", ["patient.json", "condition.json", "observation-hemoglobin.json"])
    written = {}
    for name in ("patient.json", "condition.json", "observation-hemoglobin.json"):
        resource = load_fixture(f"satusehat/{name}", ids)
        resp = await client.post(f"/fhir/R4/{resource['resourceType']}", data=orjson.dumps(resource), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
        created = await resp.json()
        written[created["resourceType"]] = resource
        if name == "patient.json":
            ids["PATIENT_ID"] = created["id"]
    bundle = await _through_proxy(client, f"/fhir/R4/Patient/{ids['PATIENT_ID']}/$everything")
    found = {
        e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"] if e["resource"]["id"] != "patient-id"
    }
    assert set(written) <= set(found), sorted(found)
    for rtype, original in written.items():
        assert _clean(found[rtype]) == _clean(original), rtype
    assert "fhircrypt.dev" not in orjson.dumps(bundle).decode()


async def test_hapis_own_bulk_export_streams_decrypted_through_proxy_links(client, clean_hapi):
    """HAPI runs the export as a background job and serves each file as a Binary; the proxy hands out
    its own signed status and file links and decrypts the NDJSON line by line."""
    for patient in PATIENTS:
        resp = await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
    manifest = await _manifest(client, "/fhir/R4/$export?_type=Patient", timeout=180)
    assert manifest["request"].startswith(PUBLIC_BASE)
    urls = [item["url"] for item in manifest["output"] if item["type"] == "Patient"]
    assert urls and all(url.startswith(f"{PUBLIC_BASE}/$fhircrypt-link/file/") for url in urls)
    lines = []
    for url in urls:
        resp = await client.get(_local(url))
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/fhir+ndjson")
        lines += (await resp.text()).splitlines()
    exported = {resource["id"]: resource for resource in map(orjson.loads, lines)}
    assert sorted(exported) == sorted(p["id"] for p in PATIENTS)
    for patient in PATIENTS:
        assert _as_sent(exported[patient["id"]]) == _as_sent(patient)


def _validation_errors(hapi, resource: dict) -> list[str]:
    """HAPI's own validator (base R4, as the test server loads no implementation guide): error messages."""
    status, outcome = hapi.request("POST", f"/{resource['resourceType']}/$validate", resource)
    assert status in (200, 412), outcome
    return errors_of(outcome)


def errors_of(outcome: dict) -> list[str]:
    """The error and fatal issues of an OperationOutcome, as 'expression: diagnostics', sorted."""
    return sorted(
        f"{(i.get('expression') or ['-'])[0]}: {i.get('diagnostics', '')}"
        for i in outcome["issue"]
        if i["severity"] in ("error", "fatal")
    )


# Found by the test below; see docs/interactions.md (HAPI's validator and the stored form).
KNOWN_INVALID: dict[tuple[str, str], str] = {}  # (policy, fixture) -> why its stored form is invalid


@pytest.mark.parametrize(
    ("policy_name", "name"),
    [
        pytest.param(
            policy,
            name,
            marks=pytest.mark.xfail(raises=AssertionError, strict=True, reason=KNOWN_INVALID[policy, name]),
        )
        if (policy, name) in KNOWN_INVALID
        else (policy, name)
        for policy in sorted(ORDER)
        for name in ORDER[policy]
    ],
)
async def test_hapis_validator_finds_no_error_in_the_stored_form_that_the_plaintext_has_not(
    proxy_for, clean_hapi, policy_name, name
):
    """Upstream unchanged: a stored (encrypted) fixture is as valid to HAPI's validator (base R4; it
    has no SATUSEHAT profiles, so the errors about those are on both sides) as the plaintext one."""
    policy = compile_file(ROOT / "policies" / f"{policy_name}.yaml")
    client = await proxy_for(clean_hapi.base_url, policy, upstream_timeout=120.0)
    resource = load_fixture(f"{policy_name}/{name}", _stubs(clean_hapi, policy_name, [name]))
    rtype = resource["resourceType"]
    resp = await client.post(f"/fhir/R4/{rtype}", data=orjson.dumps(resource), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    stored = clean_hapi.request("GET", f"/{rtype}/{(await resp.json())['id']}")[1]
    assert any(t.get("code") == "encrypted" for t in stored["meta"]["tag"])
    plain = set(_validation_errors(clean_hapi, resource))
    assert [e for e in _validation_errors(clean_hapi, stored) if e not in plain] == []
