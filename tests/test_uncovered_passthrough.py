"""Answers and writes that hold nothing the policy acts on cost what a passthrough costs, and lose no check.

An answer with no resource of a covered type and none of fhircrypt's artefacts goes to the client as
the upstream's bytes (its base rewritten), judged by the access decision on a parse that is not
serialised again; a write with no covered resource is left to the server's own validation. What the
proxy still owes such requests is checked here against the real Medplum server: the access decision
still screens a confined caller, and a covered resource still gets the proxy's validation.
"""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.transform import markers as mk
from proxy.transform.bodies import covers_any, untouched
from tests import test_auth
from tests.conftest import FHIR_JSON, PUBLIC_BASE, unit_policy
from tests.test_auth import bearer

issuer, jwt_proxy = test_auth.issuer, test_auth.jwt_proxy  # the real issuer and the JWT proxy

POLICY = unit_policy(
    """
fhircrypt-policy: 1
name: patient-names-only
groups: {identity: {}}
resources:
  Patient:
    elements:
      - {path: name, group: identity}
access:
  smart_scopes: required
  rules:
    - name: patient-app
      when: {context: patient}
      groups: [identity]
"""
)
EMPTY = unit_policy("fhircrypt-policy: 1\nname: empty\ngroups: {g: {}}\n")  # covers nothing, like the bench's


def _encounter(eid: str, patient: str, **extra) -> dict:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
        **extra,
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"resourceType":"Encounter","id":"e1","subject":{"reference":"Patient/p1"}}', True),
        (b'{"resourceType" :\n "Patient","id":"p1"}', False),  # JSON whitespace around the colon
        (b'{"resourceType":"Encounter","contained":[{"resourceType":"Patient","id":"c"}]}', False),
        (b'{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient"}}]}', False),
        (b'{"resourceType":"\\u0050atient","id":"p1"}', False),  # an escape spells the covered type
        (b'{"resourceType":"Encounter","link":"https:\\/\\/elsewhere"}', False),  # escaped slashes hide URLs
        (b'{"resourceType":"Encounter","text":"C:\\\\users \\"x\\""}', True),  # an escaped backslash escapes no u
        (b'{"resourceType":"Encounter","extension":[{"url":"' + mk.CIPHERTEXT_URL.encode() + b'"}]}', False),
    ],
)
def test_untouched_is_judged_on_the_bytes_and_errs_towards_parsing(raw, expected):
    assert untouched(raw, POLICY) is expected
    if b"\\u0050" in raw:
        assert orjson.loads(raw)["resourceType"] == "Patient"  # the case is real: a parser reads Patient


def test_nothing_is_covered_under_the_empty_policy_but_artefacts_still_count():
    assert untouched(b'{"resourceType":"Patient","name":[{"family":"Santoso"}]}', EMPTY)
    tagged = b'{"resourceType":"Patient","meta":{"tag":[{"system":"' + mk.TAG_SYSTEM.encode() + b'"}]}}'
    assert not untouched(tagged, EMPTY)


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        (_encounter("e1", "p1"), False),
        (_encounter("e1", "p1", contained=[{"resourceType": "Patient", "id": "c"}]), True),
        ({"resourceType": "Basic", "extension": [{"url": "x", "valueX": {"resourceType": "Patient"}}]}, True),
        ({"resourceType": "Basic", "code": {"resourceType": ["Patient"]}}, True),  # not a string: counted
        ({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": _encounter("e", "p")}]}, False),
    ],
)
def test_covers_any_looks_at_every_depth(resource, expected):
    assert covers_any(resource, POLICY) is expected
    assert covers_any(resource, EMPTY) is False


async def test_an_uncovered_answer_is_the_upstreams_bytes_with_the_base_rewritten(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, POLICY)
    resp = await client.put("/fhir/R4/Encounter/enc-1", data=orjson.dumps(_encounter("enc-1", "p1")), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    async with aiohttp.ClientSession() as session, session.get(f"{clean_upstream.base_url}/Encounter/enc-1") as direct:
        upstream_bytes = await direct.read()
    through = await client.get("/fhir/R4/Encounter/enc-1")
    assert through.status == 200
    expected = upstream_bytes.replace(clean_upstream.base_url.encode(), PUBLIC_BASE.rstrip("/").encode())
    assert await through.read() == expected
    # a searchset of the type: the upstream's self link leads to the proxy, the entries are the upstream's
    bundle = await (await client.get("/fhir/R4/Encounter?subject=Patient/p1")).json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["enc-1"]
    assert all(link["url"].startswith(PUBLIC_BASE) for link in bundle["link"])


async def test_an_uncovered_write_is_left_to_the_servers_validation_a_covered_one_is_not(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, POLICY)  # validation on (the default)
    odd = _encounter("enc-2", "p1", colour="red")  # not an R4 element
    resp = await client.put("/fhir/R4/Encounter/enc-2", data=orjson.dumps(odd), headers=FHIR_JSON)
    sent = [r for r in clean_upstream.requests() if r["method"] == "PUT" and r["url"].endswith("/Encounter/enc-2")]
    assert len(sent) == 1 and orjson.loads(sent[0]["body"]) == odd  # the server judged what the client sent
    assert resp.status == sent[0]["status"] == 400  # and refused it itself
    clean_upstream.reset()
    patient = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Santoso"}], "colour": "red"}
    resp = await client.put("/fhir/R4/Patient/p1", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert resp.status == 400
    assert "Patient.colour" in (await resp.json())["issue"][0]["diagnostics"]
    # a covered resource inside an uncovered one is validated too, before anything is sent
    contained = _encounter("enc-3", "p1", contained=[{**patient, "id": "c1"}])
    resp = await client.put("/fhir/R4/Encounter/enc-3", data=orjson.dumps(contained), headers=FHIR_JSON)
    assert resp.status == 400
    assert clean_upstream.requests() == []


async def test_a_patient_app_is_still_screened_and_audited_on_an_uncovered_type(
    jwt_proxy, proxy_for, clean_upstream, issuer, tmp_path
):
    from proxy.audit.cli import init_trail

    writer = await proxy_for(clean_upstream.base_url, POLICY)
    for resource in (
        {"resourceType": "Patient", "id": "pat-a", "name": [{"family": "Wulandari"}]},
        {"resourceType": "Patient", "id": "pat-b", "name": [{"family": "Aminah"}]},
        _encounter("enc-a", "pat-a"),
        _encounter("enc-b", "pat-b"),
    ):
        path = f"/fhir/R4/{resource['resourceType']}/{resource['id']}"
        assert (await writer.put(path, data=orjson.dumps(resource), headers=FHIR_JSON)).status == 201
    trail = tmp_path / "audit.jsonl"
    init_trail(trail, tmp_path / "audit.key")
    app = await jwt_proxy(POLICY, audit_trail=str(trail))
    auth = bearer(issuer.token(scope="patient/*.rs", patient="pat-a", fhirUser="Patient/pat-a"))
    own = await app.get("/fhir/R4/Encounter/enc-a", headers=auth)
    assert own.status == 200 and (await own.json())["id"] == "enc-a"
    other = await app.get("/fhir/R4/Encounter/enc-b", headers=auth)
    assert other.status == 403  # the upstream returned it; the decision refused it
    assert "pat-b" not in (await other.text()).replace("Encounter/enc-b", "")
    found = await (await app.get("/fhir/R4/Encounter", headers=auth)).json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == ["enc-a"]
    await app.server.close()  # flushes the trail
    events = [orjson.loads(line)["event"] for line in trail.read_text().splitlines()]
    named = [{e["what"]["reference"] for e in ev["entity"] if "reference" in e.get("what", {})} for ev in events]
    assert named == [{"Encounter/enc-a"}, {"Encounter/enc-b"}, {"Encounter/enc-a"}]  # the search's answer too


async def test_a_clinician_is_judged_by_type_on_the_answers_outline_and_audited(
    proxy_for, aiohttp_server, issuer, tmp_path
):
    """A caller with no patient/ scopes is judged by resource type on the outline of an uncovered answer
    (``proxy.transform.outline``): an included resource of a type it may not read still leaves the page
    (with the ``total``), the server's next link is still signed and a foreign one dropped, and the audit
    names every resource the caller was shown. The upstream is scripted: Medplum's in-memory server
    answers no ``_include``."""
    from proxy.audit.cli import init_trail

    async def search(request: web.Request) -> web.Response:
        base = f"http://{request.host}/fhir/R4"
        page = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 1,
            "link": [{"relation": "self", "url": f"{base}/Encounter?{request.query_string}"}],
            "entry": [
                {"fullUrl": f"{base}/Encounter/enc-c", "resource": _encounter("enc-c", "p1")},
                {"fullUrl": f"{base}/Location/loc-1", "resource": {"resourceType": "Location", "id": "loc-1"}},
            ],
        }
        if "_count" in request.query:  # a page that has a next one
            page["link"] += [
                {"relation": "next", "url": f"{base}/Encounter?{request.query_string}&_page=2"},
                {"relation": "previous", "url": "https://elsewhere.example/fhir/Encounter"},
            ]
        body = orjson.dumps(page, option=orjson.OPT_INDENT_2)  # a re-serialised answer would differ
        return web.Response(body=body, content_type="application/fhir+json")

    app = web.Application()
    app.router.add_get("/fhir/R4/Encounter", search)
    upstream = await aiohttp_server(app)
    trail = tmp_path / "audit.jsonl"
    init_trail(trail, tmp_path / "audit.key")
    proxy = await proxy_for(
        str(upstream.make_url("/fhir/R4")),
        POLICY,
        auth="jwt",
        oidc_issuer=issuer.url,
        audience=test_auth.AUDIENCE,
        audit_trail=str(trail),
    )
    asked = "/fhir/R4/Encounter?_include=Encounter:location"
    narrow = bearer(issuer.token(scope="user/Encounter.rs", fhirUser="Practitioner/dr-1"))
    wide = bearer(issuer.token(scope="user/Encounter.rs user/Location.rs", fhirUser="Practitioner/dr-1"))
    for auth, ids in ((narrow, ["enc-c"]), (wide, ["enc-c", "loc-1"])):
        for query in ("", "&_count=2"):
            page = await (await proxy.get(asked + query, headers=auth)).json()
            assert [e["resource"]["id"] for e in page["entry"]] == ids
            assert ("total" in page) is (auth is wide)
            links = {link["relation"]: link["url"] for link in page["link"]}
            assert set(links) == ({"self", "next"} if query else {"self"})
            assert not query or links["next"].startswith(PUBLIC_BASE + "/$fhircrypt-link/page/")
    # nothing to change: the upstream's own bytes, in the proxy's base
    async with aiohttp.ClientSession() as session, session.get(upstream.make_url(asked)) as direct:
        expected = (await direct.read()).replace(str(upstream.make_url("/fhir/R4")).encode(), PUBLIC_BASE.encode())
    assert await (await proxy.get(asked, headers=wide)).read() == expected
    await proxy.server.close()  # flushes the trail
    events = [orjson.loads(line)["event"] for line in trail.read_text().splitlines()]
    named = [{e["what"]["reference"] for e in ev["entity"] if "reference" in e.get("what", {})} for ev in events]
    assert named == [{"Encounter/enc-c"}] * 2 + [{"Encounter/enc-c", "Location/loc-1"}] * 3
