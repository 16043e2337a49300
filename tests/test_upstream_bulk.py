"""Bulk Data Access (IG v2) export of the test upstream (tests/upstream/server.mjs).

The upstream stands in for the Medplum server's $export (the router package has none),
so the proxy's Bulk support can be tested against it. These tests pin its behaviour.
"""

from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

FHIR_JSON = "application/fhir+json"
KICKOFF_HEADERS = {"Accept": FHIR_JSON, "Prefer": "respond-async"}
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@pytest.fixture
async def bulk(clean_upstream):
    """The clean upstream plus an HTTP session; bulk options are reset afterwards too."""
    async with aiohttp.ClientSession() as session:
        yield clean_upstream, session
    clean_upstream.reset()


async def create(session, base, resource):
    async with session.post(
        f"{base}/{resource['resourceType']}", json=resource, headers={"Content-Type": FHIR_JSON}
    ) as r:
        assert r.status == 201, await r.text()
        return await r.json(content_type=None)


async def update(session, base, resource):
    url = f"{base}/{resource['resourceType']}/{resource['id']}"
    async with session.put(url, json=resource, headers={"Content-Type": FHIR_JSON}) as r:
        assert r.status == 200, await r.text()
        return await r.json(content_type=None)


async def bulk_options(session, upstream, **options):
    async with session.post(f"{upstream.admin_url}/bulk-options", json=options) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def kickoff(session, base, path="$export", params=None, headers=None):
    """Kick off; returns the status URL."""
    async with session.get(f"{base}/{path}", params=params, headers=headers or KICKOFF_HEADERS) as r:
        assert r.status == 202, await r.text()
        assert await r.read() == b""
        location = r.headers["Content-Location"]
    assert location.startswith(f"{base}/$export-status/")
    return location


async def manifest_of(session, status_url):
    """First poll 202 (in progress), second 200 with the manifest."""
    async with session.get(status_url) as r:
        assert r.status == 202
        assert r.headers["X-Progress"] == "in-progress"
        assert r.headers["Retry-After"] == "1"
        assert await r.read() == b""
    async with session.get(status_url) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "application/json"
        return await r.json()


async def fetch_ndjson(session, url, headers=None):
    async with session.get(url, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "application/fhir+ndjson"
        assert r.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in r.headers
        text = await r.text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


async def export(session, base, path="$export", params=None):
    manifest = await manifest_of(session, await kickoff(session, base, path, params))
    files = {}
    for out in manifest["output"]:
        assert out["type"] not in files
        files[out["type"]] = await fetch_ndjson(session, out["url"])
        assert len(files[out["type"]]) == out["count"]
        assert all(r["resourceType"] == out["type"] for r in files[out["type"]])
    return manifest, files


def by_id(resources):
    return {r["id"]: r for r in resources}


def patient(family):
    return {"resourceType": "Patient", "name": [{"family": family}]}


def observation(patient_id, text="x"):
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": text},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def allergy(patient_id):
    return {
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}
            ]
        },
        "code": {"text": "peanut"},
        "patient": {"reference": f"Patient/{patient_id}"},
    }


def coverage(patient_id, org_id):
    return {
        "resourceType": "Coverage",
        "status": "active",
        "beneficiary": {"reference": f"Patient/{patient_id}"},
        "payor": [{"reference": f"Organization/{org_id}"}],
    }


async def test_system_export_kickoff_status_manifest_and_files(bulk):
    up, s = bulk
    base = up.base_url
    p1 = await create(s, base, patient("One"))
    p2 = await create(s, base, patient("Two"))
    obs = await create(s, base, observation(p1["id"]))
    org = await create(s, base, {"resourceType": "Organization", "name": "Acme"})
    p2 = await update(s, base, {**p2, "name": [{"family": "Two", "given": ["B"]}]})  # version 2 is current

    status_url = await kickoff(s, base, params={"_outputFormat": "application/fhir+ndjson"})
    # The kick-off goes through the request log like any FHIR request.
    log = [r for r in up.requests() if "$export" in r["url"] and "status" not in r["url"]]
    assert [(r["method"], r["status"], r["headers"]["prefer"]) for r in log] == [("GET", 202, "respond-async")]

    manifest = await manifest_of(s, status_url)
    assert set(manifest) == {"transactionTime", "request", "requiresAccessToken", "output", "error"}
    request = urlsplit(manifest["request"])
    assert f"{request.scheme}://{request.netloc}{request.path}" == f"{base}/$export"
    assert parse_qs(request.query) == {"_outputFormat": ["application/fhir+ndjson"]}
    assert manifest["requiresAccessToken"] is True
    assert manifest["error"] == []
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$", manifest["transactionTime"])
    assert manifest["transactionTime"] >= p2["meta"]["lastUpdated"]
    assert sorted((o["type"], o["count"]) for o in manifest["output"]) == [
        ("Observation", 1),
        ("Organization", 1),
        ("Patient", 2),
    ]
    job_id = status_url.rsplit("/", 1)[1]
    for out in manifest["output"]:
        assert set(out) == {"type", "url", "count"}
        assert out["url"] == f"{base}/$export-file/{job_id}/{out['type']}.ndjson"

    # Still 200 on later polls.
    async with s.get(status_url) as r:
        assert r.status == 200

    files = {
        o["type"]: await fetch_ndjson(s, o["url"], headers={"Authorization": "Bearer x"}) for o in manifest["output"]
    }
    # Each file holds exactly the current stored version of each resource.
    assert by_id(files["Patient"]) == {p1["id"]: p1, p2["id"]: p2}
    assert files["Observation"] == [obs]
    assert files["Organization"] == [org]
    assert by_id(files["Patient"])[p2["id"]]["meta"]["versionId"] == "2"
    current = {}
    for r in up.dump():
        current[(r["resourceType"], r["id"])] = r
    exported = [r for rs in files.values() for r in rs]
    assert sorted(exported, key=lambda r: r["id"]) == sorted(current.values(), key=lambda r: r["id"])


async def test_snapshot_is_taken_at_kickoff(bulk):
    up, s = bulk
    base = up.base_url
    p1 = await create(s, base, patient("Before"))
    status_url = await kickoff(s, base)
    await update(s, base, {**p1, "name": [{"family": "After"}]})
    await create(s, base, patient("Later"))
    _, files = await export_from_status(s, status_url)
    assert files == {"Patient": [p1]}


async def export_from_status(session, status_url):
    manifest = await manifest_of(session, status_url)
    return manifest, {o["type"]: await fetch_ndjson(session, o["url"]) for o in manifest["output"]}


async def test_kickoff_errors(bulk):
    up, s = bulk
    base = up.base_url
    await create(s, base, patient("P"))
    # Prefer: respond-async is required.
    async with s.get(f"{base}/$export", headers={"Accept": FHIR_JSON}) as r:
        assert r.status == 400
        assert (await r.json(content_type=None))["resourceType"] == "OperationOutcome"
    for fmt in ("application/fhir+json", "text/csv", "json"):
        async with s.get(f"{base}/$export", params={"_outputFormat": fmt}, headers=KICKOFF_HEADERS) as r:
            assert r.status == 400, fmt
            assert (await r.json(content_type=None))["resourceType"] == "OperationOutcome"
    for fmt in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
        await kickoff(s, base, params={"_outputFormat": fmt})
    async with s.get(f"{base}/$export", params={"_type": "Patient,NotAType"}, headers=KICKOFF_HEADERS) as r:
        assert r.status == 400
    async with s.get(f"{base}/$export", params={"_since": "not-a-date"}, headers=KICKOFF_HEADERS) as r:
        assert r.status == 400
    async with s.get(f"{base}/Group/does-not-exist/$export", headers=KICKOFF_HEADERS) as r:
        assert r.status == 404
        assert (await r.json(content_type=None))["resourceType"] == "OperationOutcome"
    # Unknown job / file.
    async with s.get(f"{base}/$export-status/nope") as r:
        assert r.status == 404
        assert (await r.json(content_type=None))["resourceType"] == "OperationOutcome"
    async with s.get(f"{base}/$export-file/nope/Patient.ndjson") as r:
        assert r.status == 404


async def test_type_filter(bulk):
    up, s = bulk
    base = up.base_url
    p = await create(s, base, patient("P"))
    obs = await create(s, base, observation(p["id"]))
    org = await create(s, base, {"resourceType": "Organization", "name": "Acme"})
    manifest, files = await export(s, base, params={"_type": "Observation,Organization"})
    assert files == {"Observation": [obs], "Organization": [org]}
    assert parse_qs(urlsplit(manifest["request"]).query) == {"_type": ["Observation,Organization"]}
    _, files = await export(s, base, params=[("_type", "Patient"), ("_type", "Organization")])
    assert files == {"Organization": [org], "Patient": [p]}
    # A type with no resources gets no output file.
    _, files = await export(s, base, params={"_type": "Encounter"})
    assert files == {}


async def test_since_filter(bulk):
    up, s = bulk
    base = up.base_url
    old = await create(s, base, patient("Old"))
    await create(s, base, observation(old["id"], "old"))
    await asyncio.sleep(0.01)
    new = await create(s, base, patient("New"))
    new_obs = await create(s, base, observation(new["id"], "new"))
    since = new["meta"]["lastUpdated"]  # inclusive
    _, files = await export(s, base, params={"_since": since})
    assert files == {"Observation": [new_obs], "Patient": [new]}
    # An update brings an old resource back in.
    old2 = await update(s, base, {**old, "name": [{"family": "Old", "given": ["Updated"]}]})
    _, files = await export(s, base, params={"_since": since, "_type": "Patient"})
    assert by_id(files["Patient"]) == {new["id"]: new, old2["id"]: old2}
    # Offsets are accepted.
    _, files = await export(s, base, params={"_since": "2000-01-01T07:00:00+07:00", "_type": "Patient"})
    assert len(files["Patient"]) == 2


async def test_patient_level_export(bulk):
    up, s = bulk
    base = up.base_url
    p1 = await create(s, base, patient("One"))
    p2 = await create(s, base, patient("Two"))
    org = await create(s, base, {"resourceType": "Organization", "name": "Payer"})
    await create(s, base, {"resourceType": "Practitioner", "name": [{"family": "Doc"}]})
    obs1 = await create(s, base, observation(p1["id"]))
    obs2 = await create(s, base, observation(p2["id"]))
    alg = await create(s, base, allergy(p2["id"]))
    cov = await create(s, base, coverage(p1["id"], org["id"]))
    manifest, files = await export(s, base, "Patient/$export")
    assert manifest["request"] == f"{base}/Patient/$export"
    assert set(files) == {"Patient", "Observation", "AllergyIntolerance", "Coverage"}
    assert by_id(files["Patient"]) == by_id([p1, p2])
    assert by_id(files["Observation"]) == by_id([obs1, obs2])
    assert files["AllergyIntolerance"] == [alg]
    assert files["Coverage"] == [cov]
    _, files = await export(s, base, "Patient/$export", params={"_type": "Coverage,Organization"})
    assert files == {"Coverage": [cov]}


async def test_group_level_export(bulk):
    up, s = bulk
    base = up.base_url
    p1 = await create(s, base, patient("Member"))
    p2 = await create(s, base, patient("Other"))
    p3 = await create(s, base, patient("Member2"))
    obs1 = await create(s, base, observation(p1["id"]))
    await create(s, base, observation(p2["id"]))
    alg3 = await create(s, base, allergy(p3["id"]))
    await create(s, base, allergy(p2["id"]))
    group = await create(
        s,
        base,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": f"Patient/{p1['id']}"}},
                {"entity": {"reference": f"Patient/{p3['id']}"}},
            ],
        },
    )
    manifest, files = await export(s, base, f"Group/{group['id']}/$export")
    assert manifest["request"] == f"{base}/Group/{group['id']}/$export"
    assert set(files) == {"Patient", "Observation", "AllergyIntolerance"}
    assert by_id(files["Patient"]) == by_id([p1, p3])
    assert files["Observation"] == [obs1]
    assert files["AllergyIntolerance"] == [alg3]
    _, files = await export(s, base, f"Group/{group['id']}/$export", params={"_type": "Observation"})
    assert files == {"Observation": [obs1]}


async def test_delete_job(bulk):
    up, s = bulk
    base = up.base_url
    await create(s, base, patient("P"))
    status_url = await kickoff(s, base)
    manifest = await manifest_of(s, status_url)
    async with s.delete(status_url) as r:
        assert r.status == 202
    async with s.get(status_url) as r:
        assert r.status == 404
        assert (await r.json(content_type=None))["resourceType"] == "OperationOutcome"
    async with s.get(manifest["output"][0]["url"]) as r:
        assert r.status == 404
    async with s.delete(status_url) as r:
        assert r.status == 404
    # A reset clears jobs too.
    status_url = await kickoff(s, base)
    up.reset()
    async with s.get(status_url) as r:
        assert r.status == 404


async def test_presigned_links(bulk):
    up, s = bulk
    base = up.base_url
    p = await create(s, base, patient("P"))
    obs = await create(s, base, observation(p["id"]))
    assert await bulk_options(s, up, requiresAccessToken=False) == {
        "status": "ok",
        "requiresAccessToken": False,
        "copies": 0,
    }
    status_url = await kickoff(s, base)
    job_id = status_url.rsplit("/", 1)[1]
    manifest = await manifest_of(s, status_url)
    assert manifest["requiresAccessToken"] is False
    root = base.removesuffix("/fhir/R4")
    files = {}
    for out in manifest["output"]:
        parts = urlsplit(out["url"])
        assert f"{parts.scheme}://{parts.netloc}" == root
        assert parts.path == f"/presigned/{job_id}/{out['type']}.ndjson"
        assert not out["url"].startswith(base)
        signature = parse_qs(parts.query)["signature"][0]
        assert re.fullmatch(r"[0-9a-f]{16,}", signature)
        files[out["type"]] = await fetch_ndjson(s, out["url"])  # no auth at all
        wrong = ("1" if signature[0] == "0" else "0") + signature[1:]  # always differs from the real one
        async with s.get(f"{root}{parts.path}?signature={wrong}") as r:
            assert r.status == 403
        async with s.get(f"{root}{parts.path}") as r:
            assert r.status == 403
    assert files == {"Observation": [obs], "Patient": [p]}
    # Bad option values are refused; reset restores the defaults.
    async with s.post(f"{up.admin_url}/bulk-options", json={"copies": -1}) as r:
        assert r.status == 400
    async with s.post(f"{up.admin_url}/bulk-options", json={"requiresAccessToken": "no"}) as r:
        assert r.status == 400
    up.reset()
    await create(s, base, patient("P"))
    manifest, _ = await export(s, base)
    assert manifest["requiresAccessToken"] is True
    assert manifest["output"][0]["url"].startswith(f"{base}/$export-file/")


async def test_copies(bulk):
    up, s = bulk
    base = up.base_url
    p1 = await create(s, base, patient("One"))
    p2 = await create(s, base, patient("Two"))
    obs = await create(s, base, observation(p1["id"]))
    await bulk_options(s, up, copies=1000)
    manifest, files = await export(s, base)
    assert sorted((o["type"], o["count"]) for o in manifest["output"]) == [("Observation", 1000), ("Patient", 1000)]
    for type_, originals in (("Patient", [p1, p2]), ("Observation", [obs])):
        lines = files[type_]
        assert len(lines) == 1000
        ids = [r["id"] for r in lines]
        assert len(set(ids)) == 1000
        assert all(FHIR_ID.match(i) for i in ids)
        base_ids = set()
        for i, r in enumerate(lines):
            assert r["id"].endswith(f"-c{i}")
            original = r["id"][: -len(f"-c{i}")]
            base_ids.add(original)
            assert {**r, "id": original} == by_id(originals)[original]
        assert base_ids == {o["id"] for o in originals}
    # Options apply to jobs kicked off afterwards only.
    status_url = await kickoff(s, base, params={"_type": "Patient"})
    await bulk_options(s, up, copies=3)
    manifest = await manifest_of(s, status_url)
    assert manifest["output"][0]["count"] == 1000


async def test_file_stream_does_not_block_the_server(bulk):
    """A large file that the client reads slowly does not hold the request lock."""
    up, s = bulk
    base = up.base_url
    await create(s, base, patient("P"))
    await bulk_options(s, up, copies=300_000)
    manifest = await manifest_of(s, await kickoff(s, base))
    async with s.get(manifest["output"][0]["url"]) as stream:
        assert stream.status == 200
        first = await stream.content.readline()
        assert json.loads(first)["id"].endswith("-c0")
        # The stream is paused (backpressure); other requests are still served.
        async with aiohttp.ClientSession() as other:
            async with other.get(f"{base}/Patient", timeout=aiohttp.ClientTimeout(total=10)) as r:
                assert r.status == 200
            status_url = await kickoff(other, base)
            async with other.get(status_url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                assert r.status == 202
        count = 1
        while await stream.content.readline():
            count += 1
    assert count == 300_000
