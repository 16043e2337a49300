"""Binary through the proxy: raw uploads and downloads in their own content type, encrypted at rest
(the round trips against Medplum's test server and, with ``--upstream hapi``, against HAPI)."""

from __future__ import annotations

import base64
import os

import orjson
import pytest

from tests.conftest import FHIR_JSON, assert_no_plaintext, sealed_groups

PDF = b"%PDF-1.4\n% Hasil laboratorium: Budiarto Wiryasentana, Hb 13.2 g/dL\n" + os.urandom(2048) + b"\n%%EOF\n"


@pytest.fixture
async def client(proxy_for, clean_upstream, satusehat):
    return await proxy_for(clean_upstream.base_url, satusehat)


async def test_a_raw_pdf_upload_is_stored_encrypted_and_read_back_raw_or_as_json(either_client, clean_server):
    resp = await either_client.post("/fhir/R4/Binary", data=PDF, headers={"Content-Type": "application/pdf"})
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["contentType"] == "application/pdf"
    assert base64.b64decode(created["data"]) == PDF
    raw = await either_client.get(f"/fhir/R4/Binary/{created['id']}", headers={"Accept": "application/pdf"})
    assert raw.status == 200 and raw.headers["Content-Type"] == "application/pdf"
    assert await raw.read() == PDF
    as_json = await (await either_client.get(f"/fhir/R4/Binary/{created['id']}")).json()
    assert (base64.b64decode(as_json["data"]) == PDF and "meta" not in as_json) or "extension" not in as_json["meta"]
    stored = clean_server.dump()
    assert_no_plaintext(stored, [base64.b64encode(PDF).decode()[:40], "Budiarto"])
    (binary,) = [r for r in stored if r["resourceType"] == "Binary"]
    assert "data" not in binary and binary["meta"]["extension"][-1]["url"].endswith("/envelope")
    assert sealed_groups(binary)  # the document's group ciphertext sits in meta.extension too
    # an update in the raw form works the same way
    resp = await either_client.put(
        f"/fhir/R4/Binary/{created['id']}", data=PDF[:100], headers={"Content-Type": "application/octet-stream"}
    )
    assert resp.status == 200, await resp.text()
    raw = await either_client.get(f"/fhir/R4/Binary/{created['id']}", headers={"Accept": "application/octet-stream"})
    assert await raw.read() == PDF[:100]


async def test_json_binaries_round_trip_and_other_raw_reads_are_refused(either_client, clean_server):
    binary = {"resourceType": "Binary", "contentType": "text/plain", "data": base64.b64encode(b"Budiarto").decode()}
    created = await (await either_client.post("/fhir/R4/Binary", data=orjson.dumps(binary), headers=FHIR_JSON)).json()
    assert created["data"] == binary["data"]
    assert (
        await either_client.get(f"/fhir/R4/Patient/{created['id']}", headers={"Accept": "text/plain"})
    ).status == 406
    xml = await either_client.post(
        "/fhir/R4/Binary", data=b"<Binary/>", headers={"Content-Type": "application/fhir+xml"}
    )
    assert xml.status == 415
    assert_no_plaintext(clean_server.dump(), [binary["data"]])


async def test_attachments_pointing_outside_the_proxy_are_refused_when_the_policy_says_so(client, clean_upstream):
    """SATUSEHAT policy: attachments.external_urls: refuse. A document stored elsewhere cannot be encrypted."""
    outside = {
        "resourceType": "DocumentReference",
        "status": "current",
        "content": [{"attachment": {"contentType": "application/pdf", "url": "https://bucket.example/rujukan.pdf"}}],
    }
    resp = await client.post("/fhir/R4/DocumentReference", data=orjson.dumps(outside), headers=FHIR_JSON)
    assert resp.status == 400
    assert "DocumentReference.content.attachment.url" in (await resp.json())["issue"][0]["diagnostics"]
    assert clean_upstream.requests() == []
    binary = await client.post("/fhir/R4/Binary", data=PDF, headers={"Content-Type": "application/pdf"})
    inside = {
        **outside,
        "content": [{"attachment": {"contentType": "application/pdf", "url": binary.headers["Location"]}}],
    }
    inside["content"].append({"attachment": {"contentType": "application/pdf", "url": "Binary/relative-ref"}})
    resp = await client.post("/fhir/R4/DocumentReference", data=orjson.dumps(inside), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
