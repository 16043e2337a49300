"""The proxy in front of a real FHIR server (Medplum's router): single-resource interactions."""

from __future__ import annotations

import asyncio
import copy
import socket

import orjson
import pytest
from aiohttp import web

from proxy.transform import markers as mk
from tests.conftest import FHIR_JSON, PUBLIC_BASE, assert_no_plaintext, sealed_groups, spoil, unit_policy
from tests.test_records import NEEDLES, OBSERVATION, PATIENT

POLICY = unit_policy()


@pytest.fixture
async def client(proxy_for, clean_upstream):
    return await proxy_for(clean_upstream.base_url, POLICY)


def _new(resource: dict) -> dict:
    out = copy.deepcopy(resource)
    out.pop("id", None)
    out.pop("meta", None)
    return out


def _strip_server_meta(resource: dict) -> dict:
    out = copy.deepcopy(resource)
    out.pop("id", None)
    meta = out.pop("meta", {})
    assert set(meta) <= {"versionId", "lastUpdated"}, meta
    return out


async def test_create_read_round_trip_and_nothing_plaintext_at_rest(client, clean_upstream):
    patient = _new(PATIENT)
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert resp.headers["Location"].startswith(f"{PUBLIC_BASE}/Patient/{created['id']}")
    assert resp.headers["ETag"] == 'W/"1"'
    assert _strip_server_meta(created) == patient

    resp = await client.get(f"/fhir/R4/Patient/{created['id']}")
    assert resp.status == 200
    assert _strip_server_meta(await resp.json()) == patient
    assert "X-Fhircrypt-Integrity" not in resp.headers
    stored = clean_upstream.dump()
    assert stored and all(mk.ENVELOPE_URL in orjson.dumps(r).decode() for r in stored)
    assert_no_plaintext(stored, NEEDLES)
    assert_no_plaintext(({"r": r} for r in clean_upstream.requests()), NEEDLES)


async def test_update_vread_history_and_delete(client, clean_upstream):
    resp = await client.post("/fhir/R4/Observation", data=orjson.dumps(OBSERVATION), headers=FHIR_JSON)
    obs = await resp.json()
    oid = obs["id"]
    changed = _strip_server_meta(obs) | {"id": oid, "valueQuantity": {"value": 12.34, "unit": "g/dL"}}
    resp = await client.put(
        f"/fhir/R4/Observation/{oid}", data=orjson.dumps(changed), headers=FHIR_JSON | {"If-Match": 'W/"1"'}
    )
    assert resp.status == 200, await resp.text()
    stale = await client.put(
        f"/fhir/R4/Observation/{oid}", data=orjson.dumps(changed), headers=FHIR_JSON | {"If-Match": 'W/"1"'}
    )
    assert stale.status in (409, 412)

    v1 = await (await client.get(f"/fhir/R4/Observation/{oid}/_history/1")).json()
    assert v1["valueQuantity"]["value"] == 9.87
    history = await (await client.get(f"/fhir/R4/Observation/{oid}/_history")).json()
    values = [e["resource"]["valueQuantity"]["value"] for e in history["entry"]]
    assert sorted(values) == [9.87, 12.34]
    assert all(e["fullUrl"].startswith(PUBLIC_BASE) for e in history["entry"])
    type_history = await (await client.get("/fhir/R4/Observation/_history")).json()
    assert "reaktif-xyz" in orjson.dumps(type_history).decode()

    put_new = {
        "resourceType": "Observation",
        "id": "obs-made-by-put",
        **{k: v for k, v in OBSERVATION.items() if k != "resourceType"},
    }
    resp = await client.put("/fhir/R4/Observation/obs-made-by-put", data=orjson.dumps(put_new), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    assert (await client.delete(f"/fhir/R4/Observation/{oid}")).status in (200, 204)
    assert (await client.get(f"/fhir/R4/Observation/{oid}")).status == 410
    assert_no_plaintext(clean_upstream.dump(), ["9.87", "12.34", "reaktif-xyz", "anemia ringan qqq", "Wibisono K"])


async def test_search_by_id_and_metadata_pass_and_decrypt(client, clean_upstream):
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    resp = await client.get(f"/fhir/R4/Patient?_id={created['id']}")
    assert resp.status == 200
    bundle = await resp.json()
    assert bundle["entry"][0]["resource"]["identifier"][1]["value"] == PATIENT["identifier"][1]["value"]
    assert all(link["url"].startswith(PUBLIC_BASE) for link in bundle.get("link", []))
    meta = await client.get("/fhir/R4/metadata")
    assert meta.status == 200 and (await meta.json())["resourceType"] == "CapabilityStatement"


async def test_integrity_failures_at_the_upstream_are_never_returned_as_data(client, clean_upstream):
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    other = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    stored = next(r for r in clean_upstream.dump() if r["id"] == created["id"])
    donor = next(r for r in clean_upstream.dump() if r["id"] == other["id"])
    tampered = copy.deepcopy(stored)
    # a group ciphertext moved between resources by a cloud administrator, another one altered
    sealed_groups(tampered)["demographics"]["valueString"] = sealed_groups(donor)["demographics"]["valueString"]
    spoil(sealed_groups(tampered)["identity"])
    await _put_direct(clean_upstream, tampered)

    resp = await client.get(f"/fhir/R4/Patient/{created['id']}")
    assert resp.status == 200
    assert resp.headers["X-Fhircrypt-Integrity"].startswith("failed")
    body = await resp.text()
    assert not [n for n in NEEDLES if n in body]
    assert mk.CIPHERTEXT_URL not in body and mk.GROUP_URL not in body


async def _put_direct(upstream, resource: dict) -> None:
    import urllib.request

    req = urllib.request.Request(
        f"{upstream.base_url}/{resource['resourceType']}/{resource['id']}",
        data=orjson.dumps(resource),
        method="PUT",
        headers={"Content-Type": "application/fhir+json"},
    )
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 200


REFUSALS = [
    # (method, path, body, headers, status, phrase)
    (
        "POST",
        "/fhir/R4/Patient",
        b"<Patient xmlns='http://hl7.org/fhir'/>",
        {"Content-Type": "application/fhir+xml"},
        415,
        "XML",
    ),
    ("POST", "/fhir/R4/Patient", b'{"resourceType": "Patient", "name": [', FHIR_JSON, 400, "not valid JSON"),
    (
        "POST",
        "/fhir/R4/Patient",
        b'{"resourceType":"Patient","birthDate":"3 Feb 1971"}',
        FHIR_JSON,
        400,
        "Patient.birthDate",
    ),
    ("POST", "/fhir/R4/Patient", b'{"resourceType":"Observation"}', FHIR_JSON, 400, "does not match the URL"),
    ("PUT", "/fhir/R4/Patient/abc", b'{"resourceType":"Patient","id":"xyz"}', FHIR_JSON, 400, "must match the id"),
    ("POST", "/fhir/R4/Patient", b'{"resourceType":"Patient","name":"Wibisono"}', FHIR_JSON, 400, "Patient.name"),
    (
        "POST",
        "/fhir/R4/Patient",
        b'{"resourceType":"Patient","extension":[{"url":"https://fhircrypt.dev/fhir/'
        b'StructureDefinition/envelope","valueString":"x"}]}',
        FHIR_JSON,
        400,
        "reserved",
    ),
    ("POST", "/fhir/R4/Patient", b"{}", {"Content-Type": "text/plain"}, 415, "application/fhir+json"),
    ("GET", "/fhir/R4/Patient?name=Wibisono", None, {}, 400, "'name'"),
    (
        "GET",
        "/fhir/R4/Patient?identifier=https://fhir.kemkes.go.id/id/nik|3201019988770001",
        None,
        {},
        400,
        "'identifier'",
    ),
    ("GET", "/fhir/R4/Encounter?subject:Patient.name=Wibisono", None, {}, 400, "subject:Patient.name"),
    ("GET", "/fhir/R4/Observation?_has:Observation:patient:code=x", None, {}, 400, "_has"),
    ("GET", "/fhir/R4/Patient?_sort=birthdate", None, {}, 400, "_sort"),
    ("GET", "/fhir/R4/Patient/abc?_summary=maybe", None, {}, 400, "_summary must be one of"),
    (
        "POST",
        "/fhir/R4/Patient?_elements=name",
        orjson.dumps({"resourceType": "Patient"}),
        FHIR_JSON,
        400,
        "'_elements'",
    ),
    (
        "POST",
        "/fhir/R4/Patient/_search",
        b"name=Wibisono",
        {"Content-Type": "application/x-www-form-urlencoded"},
        400,
        "'name'",
    ),
    (
        "POST",
        "/fhir/R4/Patient",
        orjson.dumps({"resourceType": "Patient"}),
        FHIR_JSON | {"If-None-Exist": "identifier=https://fhir.kemkes.go.id/id/nik|3201019988770001"},
        400,
        "If-None-Exist",
    ),
    (
        "PUT",
        "/fhir/R4/Patient?identifier=x|3201019988770001",
        orjson.dumps({"resourceType": "Patient"}),
        FHIR_JSON,
        400,
        "'identifier'",
    ),
    ("DELETE", "/fhir/R4/Patient?name=Wibisono", None, {}, 400, "'name'"),
    (
        "POST",
        "/fhir/R4",
        orjson.dumps(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {"resourceType": "Patient", "birthDate": "1971-02-03"},
                        "request": {"method": "POST", "url": "Patient", "ifNoneExist": "_text=Wibisono"},
                    }
                ],
            }
        ),
        FHIR_JSON,
        400,
        "Bundle.entry[0].request: If-None-Exist: search parameter '_text'",
    ),
    ("GET", "/fhir/R4/$export", None, {}, 400, "Prefer: respond-async"),
    ("GET", "/fhir/R4/$export?_typeFilter=Patient%3Fname%3DWibisono", None, {}, 501, "_typeFilter"),
    (
        "POST",
        "/fhir/R4/Patient/$match",
        orjson.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [{"name": "resource", "resource": {"resourceType": "Patient", "birthDate": "1971-02-03"}}],
            }
        ),
        FHIR_JSON,
        501,
        "$match: Parameters.parameter[0].resource is a resource of an encrypted type",
    ),
    (
        "POST",
        "/fhir/R4/Patient/$match",
        orjson.dumps({"resourceType": "Parameters", "parameter": [{"name": "family", "valueString": "Wibisono"}]}),
        FHIR_JSON,
        501,
        "parameter 'family' is not allowed",
    ),
    ("POST", "/fhir/R4/$graphql", b"{}", FHIR_JSON, 501, "$graphql"),
    ("GET", "/fhir/R4/Patient/abc?_format=xml", None, {}, 406, "_format"),
    ("GET", "/fhir/R4/Patient/abc", None, {"Accept": "application/fhir+xml"}, 406, "Accept"),
    ("GET", "/fhir/R4/Patient/..%2F..%2Fadmin", None, {}, 400, "encoded"),
    ("GET", "/fhir/R4/Patient/a;b=c", None, {}, 400, "parameter segments"),
    ("GET", "/fhir/R4/Patiant/abc", None, {}, 404, "not an R4 resource type"),
    ("GET", "/fhir/R4/Patient/" + "x" * 70, None, {}, 400, "not a valid FHIR id"),
    ("GET", "/other/Patient", None, {}, 404, "not a FHIR endpoint"),
    ("POST", "/fhir/R4/Patient/abc", b"{}", FHIR_JSON, 405, "not a FHIR interaction"),
    (
        "POST",
        "/fhir/R4/Patient/_search",
        b"name=\xff\xfe",
        {"Content-Type": "application/x-www-form-urlencoded"},
        400,
        "not UTF-8",
    ),
    (
        "PATCH",
        "/fhir/R4/Subscription/abc",
        b"[{",
        {"Content-Type": "application/json-patch+json"},
        400,
        "not valid JSON",
    ),
    (
        "PATCH",
        "/fhir/R4/Subscription/abc",
        b'[{"op":"add","path":"/contained/0","value":{"resourceType":"Patient"}}]',
        {"Content-Type": "application/json-patch+json"},
        501,
        "encrypted type",
    ),
    ("POST", "/fhir/R4/Patient", b"[1, 2]", FHIR_JSON, 400, "must be a JSON object"),
    ("POST", "/fhir/R4/Patient", b'{"resourceType":"Patient","birthDate":"\xff"}', FHIR_JSON, 400, "not valid JSON"),
    ("GET", "/fhir/R4/Patient/abc", b"{}", FHIR_JSON, 400, "carry no body"),
    ("GET", "/fhir/R4/Patient?_count", None, {}, 400, "cannot be parsed"),
    ("GET", "/fhir/R4/Patient?_id=Wibisono%20Budi", None, {}, 400, "the value of '_id'"),
    ("GET", "/fhir/R4/Patient/_history?_since=Wibisono", None, {}, 400, "the value of '_since'"),
    ("GET", "/fhir/R4/Patient?_count=3201019988770001a", None, {}, 400, "the value of '_count'"),
    ("GET", "/fhir/R4/$export?_since=Wibisono", None, {"Prefer": "respond-async"}, 400, "the value of '_since'"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "phrase"), REFUSALS, ids=[f"{r[0]} {r[1][:60]}" for r in REFUSALS]
)
async def test_refusals_are_operation_outcomes_and_nothing_reaches_the_upstream(
    client, clean_upstream, method, path, body, headers, status, phrase
):
    resp = await client.request(method, path, data=body, headers=headers)
    assert resp.status == status, await resp.text()
    outcome = await resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    diagnostics = " ".join(i["diagnostics"] for i in outcome["issue"])
    assert phrase in diagnostics, diagnostics
    for secret in ("3201019988770001", "Wibisono", "1971-02-03", "3 Feb 1971"):
        assert secret not in diagnostics
    assert clean_upstream.requests() == []


async def test_request_body_limit_gives_413(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, POLICY, max_body=1000)
    big = orjson.dumps({"resourceType": "Patient", "name": [{"text": "x" * 2000}]})
    resp = await client.post("/fhir/R4/Patient", data=big, headers=FHIR_JSON)
    assert resp.status == 413
    assert clean_upstream.requests() == []


async def test_headers_are_allow_listed_both_ways(client, clean_upstream):
    created = await (
        await client.post(
            "/fhir/R4/Organization",
            data=orjson.dumps({"resourceType": "Organization", "name": "RS Uji"}),
            headers=FHIR_JSON,
        )
    ).json()
    resp = await client.get(
        f"/fhir/R4/Organization/{created['id']}",
        headers={
            "X-Patient-NIK": "3201019988770001",
            "Authorization": "Bearer abc",
            "X-Request-ID": "req-123",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "1",
        },
    )
    assert resp.status == 200 and resp.headers["X-Request-ID"] == "req-123"
    assert resp.headers["ETag"] == 'W/"1"' and "Last-Modified" in resp.headers
    seen = clean_upstream.requests()[-1]["headers"]
    lowered = {k.lower(): v for k, v in seen.items()}
    assert "x-patient-nik" not in lowered and "x-secret" not in lowered
    assert "authorization" not in lowered and lowered["x-request-id"] == "req-123"  # the caller's token stays
    assert "x-forwarded-for" in lowered


async def test_upstream_unreachable_is_502(proxy_for):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = await proxy_for(f"http://127.0.0.1:{port}/fhir/R4", POLICY)
    resp = await client.get("/fhir/R4/Patient/abc")
    assert resp.status == 502 and (await resp.json())["issue"][0]["code"] == "transient"


async def test_upstream_timeout_is_504_and_non_json_is_502(proxy_for, aiohttp_server):
    async def slow(request):
        await asyncio.sleep(2)
        return web.json_response({})

    async def html(request):
        return web.Response(text="<html>oops</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/fhir/R4/Patient/slow", slow)
    app.router.add_get("/fhir/R4/Patient/html", html)
    server = await aiohttp_server(app)
    client = await proxy_for(str(server.make_url("/fhir/R4")), POLICY, upstream_timeout=0.3)
    assert (await client.get("/fhir/R4/Patient/slow")).status == 504
    resp = await client.get("/fhir/R4/Patient/html")
    assert resp.status == 502 and "oops" not in await resp.text()


async def test_rotated_keyring_still_reads_old_versions(proxy_for, clean_upstream):
    from proxy.keymgmt.keyring import Keyring

    ring = Keyring.generate()
    client = await proxy_for(clean_upstream.base_url, POLICY, ring=ring)
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    ring.rotate()
    update = _strip_server_meta(created) | {"id": created["id"], "birthDate": "1980-08-08"}
    assert (
        await client.put(f"/fhir/R4/Patient/{created['id']}", data=orjson.dumps(update), headers=FHIR_JSON)
    ).status == 200
    envelopes = [
        next(e["valueString"] for e in r["extension"] if e["url"] == mk.ENVELOPE_URL) for r in clean_upstream.dump()
    ]
    assert [e.split(".")[1] for e in envelopes] == ["k1", "k2"]
    old = await (await client.get(f"/fhir/R4/Patient/{created['id']}/_history/1")).json()
    new = await (await client.get(f"/fhir/R4/Patient/{created['id']}")).json()
    assert old["birthDate"] == PATIENT["birthDate"] and new["birthDate"] == "1980-08-08"


async def test_resources_written_around_the_proxy_come_back_masked(client, clean_upstream):
    import urllib.request

    req = urllib.request.Request(
        f"{clean_upstream.base_url}/Patient",
        data=orjson.dumps(_new(PATIENT)),
        method="POST",
        headers={"Content-Type": "application/fhir+json"},
    )
    with urllib.request.urlopen(req) as resp:
        pid = orjson.loads(resp.read())["id"]
    resp = await client.get(f"/fhir/R4/Patient/{pid}")
    body = await resp.text()
    assert resp.status == 200 and resp.headers["X-Fhircrypt-Integrity"].startswith("failed")
    assert not [n for n in NEEDLES if n in body]


async def test_validation_can_be_switched_off_but_encryption_cannot(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, POLICY, validate="off")
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)
    assert resp.status == 201
    assert_no_plaintext(clean_upstream.dump(), NEEDLES)
    bad = await client.post(
        "/fhir/R4/Patient", data=b'{"resourceType":"Patient","birthDate":"3 Feb 1971"}', headers=FHIR_JSON
    )
    # The upstream cannot validate what it only sees as ciphertext, so the invalid date is stored
    # (encrypted). That is why validation in the proxy is on by default.
    assert bad.status == 201
    assert_no_plaintext(clean_upstream.dump(), ["3 Feb 1971"])


def _batch(*entries: dict) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": list(entries)})


CONDITIONAL_AND_BATCH_LEAKS = [
    (
        "PATCH",
        "/fhir/R4/Patient?_id=abc",
        b'[{"op":"add","path":"/birthDate","value":"1971-02-03"}]',
        {"Content-Type": "application/json-patch+json"},
        501,
    ),
    (
        "POST",
        "/fhir/R4",
        _batch(
            {
                "resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": "W10="},
                "request": {"method": "PATCH", "url": "http://elsewhere/fhir/R4/Patient/abc"},
            }
        ),
        FHIR_JSON,
        400,
    ),
    (
        "POST",
        "/fhir/R4",
        _batch({"request": {"method": "DELETE", "url": "Patient?name:contains=Wibisono"}}),
        FHIR_JSON,
        400,
    ),
    (
        "POST",
        "/fhir/R4/Patient",
        b'{"resourceType":"Patient","extension":[{"url":"https:\\/\\/fhircrypt.dev\\/fhir'
        b'\\/StructureDefinition\\/envelope","valueString":"x"}]}',
        FHIR_JSON,
        400,
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status"), CONDITIONAL_AND_BATCH_LEAKS)
async def test_conditional_patch_batch_urls_and_escaped_markers_are_refused(
    client, clean_upstream, method, path, body, headers, status
):
    resp = await client.request(method, path, data=body, headers=headers)
    assert resp.status == status, await resp.text()
    assert clean_upstream.requests() == []


async def test_ciphertext_outside_the_policy_is_never_returned(proxy_for, clean_upstream):
    """An element removed from the policy leaves ciphertext at rest; readers must not get it."""
    from tests.conftest import TEST_POLICY

    client = await proxy_for(clean_upstream.base_url, POLICY)
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    narrower = unit_policy(TEST_POLICY.replace("      - {path: telecom, group: demographics}\n", ""))
    reader = await proxy_for(clean_upstream.base_url, narrower)
    resp = await reader.get(f"/fhir/R4/Patient/{created['id']}")
    body = await resp.text()
    assert resp.headers["X-Fhircrypt-Integrity"].startswith("failed")
    assert mk.CIPHERTEXT_URL not in body and mk.ENVELOPE_URL not in body
    assert not [n for n in NEEDLES if n in body]


async def test_logs_carry_no_phi_even_on_refusals_and_integrity_failures(client, clean_upstream, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    await client.get(f"/fhir/R4/Patient/{created['id']}")
    await client.get("/fhir/R4/Patient?name=Wibisono&identifier=x|3201019988770001")
    await client.post("/fhir/R4/Patient", data=b'{"resourceType":"Patient","birthDate":"Wibisono"}', headers=FHIR_JSON)
    stored = next(r for r in clean_upstream.dump() if r["id"] == created["id"])
    stored["birthDate"] = "1971-02-03"
    await _put_direct(clean_upstream, stored)
    await client.get(f"/fhir/R4/Patient/{created['id']}")
    from proxy.logs import JsonFormatter

    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert any('"event":"integrity-failure"' in line for line in lines)
    assert any('"event":"refused"' in line for line in lines)
    leaked = [n for n in NEEDLES if any(n in line for line in lines)]
    assert not leaked, [line for line in lines if any(n in line for n in NEEDLES)]


async def test_summary_and_elements_are_applied_after_decryption(client, clean_upstream):
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    subsetted = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
    only_name = await (await client.get(f"/fhir/R4/Patient/{created['id']}?_elements=name,birthDate")).json()
    assert set(only_name) == {"resourceType", "id", "meta", "name", "birthDate", "_birthDate"}
    assert only_name["name"] == PATIENT["name"] and subsetted in only_name["meta"]["tag"]
    summary = await (await client.get(f"/fhir/R4/Patient?_id={created['id']}&_summary=true")).json()
    resource = summary["entry"][0]["resource"]
    assert "text" not in resource and "extension" not in resource  # not summary elements
    assert resource["identifier"] == PATIENT["identifier"] and resource["birthDate"] == PATIENT["birthDate"]
    data = await (await client.get(f"/fhir/R4/Patient/{created['id']}?_summary=data")).json()
    assert "text" not in data and data["telecom"] == PATIENT["telecom"]
    count = await (await client.get("/fhir/R4/Patient?_summary=count")).json()
    assert count["total"] == 1 and "entry" not in count
    forwarded = [r["url"] for r in clean_upstream.requests()]
    assert not any("_elements" in u or "_summary=true" in u or "_summary=data" in u for u in forwarded)
    # a second _summary (or one with a modifier) would travel beside the one the proxy applies: refused
    for query in ("_summary=Wibisono&_summary=count", "_summary=count&_summary=Wibisono", "_summary:x=Wibisono"):
        before = len(clean_upstream.requests())
        resp = await client.get(f"/fhir/R4/Patient?{query}")
        assert resp.status == 400 and "Wibisono" not in await resp.text(), query
        assert len(clean_upstream.requests()) == before


async def test_contained_and_bundled_resources_are_encrypted_by_their_own_policy(client, clean_upstream):
    """Issue 4 (contained resources): each nested resource of a covered type gets its own envelope."""
    patient = _new(PATIENT) | {"id": "c1"}
    observation = {**OBSERVATION, "subject": {"reference": "#c1", "display": "Wibisono K"}, "contained": [patient]}
    resp = await client.post("/fhir/R4/Observation", data=orjson.dumps(observation), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert _strip_server_meta(created) == observation
    document = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:8f1b7a4e-2c1d-4e0b-9a57-6c2f0e3d1a11", "resource": _new(PATIENT)},
            {"fullUrl": "urn:uuid:0d0e5c9e-1f7a-4f55-8c3b-2a9e4b7c6d22", "resource": OBSERVATION},
        ],
    }
    resp = await client.post("/fhir/R4/Bundle", data=orjson.dumps(document), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    read = await (await client.get(f"/fhir/R4/Bundle/{(await resp.json())['id']}")).json()
    assert [e["resource"] for e in read["entry"]] == [e["resource"] for e in document["entry"]]
    assert_no_plaintext(clean_upstream.dump(), [*NEEDLES, "9.87", "reaktif-xyz", "anemia ringan qqq"])


async def test_concurrent_patches_never_lose_an_update(client, clean_upstream):
    """Twelve writers patch the same Patient at once, each adding its own telecom: every patch that
    was answered 200 is in the final version, and every other writer got the server's conflict."""
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    url = f"/fhir/R4/Patient/{created['id']}"
    json_patch = {"Content-Type": "application/json-patch+json"}

    async def writer(i: int) -> tuple[int, str]:
        value = f"+62-811-000-{i:04d}"
        ops = [{"op": "add", "path": "/telecom/-", "value": {"system": "phone", "value": value}}]
        resp = await client.patch(url, data=orjson.dumps(ops), headers=json_patch)
        return resp.status, value

    results = await asyncio.gather(*(writer(i) for i in range(12)))
    assert {status for status, _ in results} <= {200, 409, 412}
    final = await (await client.get(url)).json()
    phones = {t["value"] for t in final["telecom"] if t.get("system") == "phone"}
    won = {value for status, value in results if status == 200}
    assert won and won <= phones, "an update answered 200 is missing: it was lost"
    assert not ({value for _, value in results} - won) & phones, "a refused update was stored anyway"
    assert int(final["meta"]["versionId"]) == 1 + len(won)


async def test_json_patch_on_encrypted_elements_is_executed_by_the_proxy(client, clean_upstream):
    """Issue 4 (PATCH): read, decrypt, apply, encrypt, update with If-Match on the version read."""
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    pid = created["id"]
    json_patch = {"Content-Type": "application/json-patch+json"}
    ops = [
        {"op": "test", "path": "/birthDate", "value": "1971-02-03"},
        {"op": "replace", "path": "/birthDate", "value": "1972-12-24"},
        {"op": "add", "path": "/name/0/given/-", "value": "Pranoto"},
    ]
    resp = await client.patch(f"/fhir/R4/Patient/{pid}", data=orjson.dumps(ops), headers=json_patch)
    assert resp.status == 200, await resp.text()
    patched = await resp.json()
    assert patched["birthDate"] == "1972-12-24" and patched["name"][0]["given"] == ["Wibisono", "Pranoto"]
    assert patched["identifier"] == PATIENT["identifier"]
    writes = [r for r in clean_upstream.requests() if r["method"] in ("PUT", "PATCH")]
    assert [r["method"] for r in writes] == ["PUT"]
    assert {k.lower(): v for k, v in writes[0]["headers"].items()}["if-match"] == 'W/"1"'
    assert_no_plaintext(clean_upstream.dump(), [*NEEDLES, "1972-12-24", "Pranoto"])
    failed = await client.patch(
        f"/fhir/R4/Patient/{pid}",
        headers=json_patch,
        data=orjson.dumps([{"op": "test", "path": "/birthDate", "value": "1971-02-03"}]),
    )
    assert failed.status == 422
    stale = await client.patch(
        f"/fhir/R4/Patient/{pid}",
        headers=json_patch | {"If-Match": 'W/"1"'},
        data=orjson.dumps([{"op": "replace", "path": "/gender", "value": "other"}]),
    )
    assert stale.status in (409, 412)
    conditional = await client.patch("/fhir/R4/Patient?_id=x", headers=json_patch, data=orjson.dumps(ops))
    assert conditional.status == 501
    assert (await client.patch("/fhir/R4/Patient/nope", headers=json_patch, data=orjson.dumps(ops))).status == 404


async def test_a_count_forwards_no_elements_text(client, clean_upstream):
    """Found by the search fuzzer: with ``_summary=count`` the ``_elements`` text went upstream as sent."""
    resp = await client.get("/fhir/R4/Patient?_elements=Wibisono&_summary=count")
    assert resp.status == 200, await resp.text()
    (sent,) = [r["url"] for r in clean_upstream.requests() if r["url"].startswith("/fhir/R4/Patient?")]
    assert "Wibisono" not in sent and "_summary=count" in sent
