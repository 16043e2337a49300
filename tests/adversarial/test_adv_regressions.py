"""Regression tests for the defects the adversarial suite found (docs/adversarial-results.md lists them)."""

from __future__ import annotations

import asyncio
import tracemalloc

import orjson
import pytest

from proxy.transform.bodies import MAX_DEPTH, too_deep
from proxy.transform.normalize import PREFIX_MAX, string_tokens
from tests.conftest import FHIR_JSON

NIK_SYSTEM = "https://fhir.kemkes.go.id/id/nik"
NIK = "3174556677889900"


async def test_bodies_nested_deeper_than_the_proxy_serialises_are_refused_not_500(proxy_for, clean_upstream, satusehat):
    client = await proxy_for(clean_upstream.base_url, satusehat)
    deep = b'{"resourceType":"Patient","x":' + b'{"a":' * 400 + b"1" + b"}" * 400 + b"}"
    resp = await client.post("/fhir/R4/Patient", data=deep, headers=FHIR_JSON)
    assert resp.status == 400
    assert "nested more than" in (await resp.json())["issue"][0]["diagnostics"]
    patch = b"[" + b"[" * 300 + b"]" * 300 + b"]"
    resp = await client.patch("/fhir/R4/Patient/x", data=patch, headers={"Content-Type": "application/json-patch+json"})
    assert resp.status == 400
    assert clean_upstream.requests() == []


async def test_a_covered_element_of_the_wrong_json_type_is_a_400_naming_it(proxy_for, clean_upstream, satusehat):
    client = await proxy_for(clean_upstream.base_url, satusehat)
    body = {"resourceType": "Patient", "identifier": {"system": NIK_SYSTEM, "value": NIK}}
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(body), headers=FHIR_JSON)
    assert resp.status == 400
    outcome = await resp.json()
    assert outcome["issue"][0]["expression"] == ["Patient.identifier"]
    assert NIK not in orjson.dumps(outcome).decode()


def test_name_prefix_tokens_are_bounded_for_very_long_names():
    tracemalloc.start()
    tokens = string_tokens("A" * 200_000, 3)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(tokens) == PREFIX_MAX - 3 + 1 + 2  # prefixes 3..64, the whole part, the :exact form
    assert peak < 10 * 1024 * 1024  # was n²/2 characters: about 20 GB for this name
    assert "a" * 200_000 in tokens  # the whole part still matches


async def test_long_name_parts_are_stored_and_found_by_prefix_and_whole(proxy_for, clean_upstream, satusehat):
    client = await proxy_for(clean_upstream.base_url, satusehat)
    family = "Wiryasentanakusumadiningrat" * 4  # 108 characters
    body = {"resourceType": "Patient", "name": [{"family": family}]}
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(body), headers=FHIR_JSON)
    assert resp.status == 201
    for query in (family[:3], family[:PREFIX_MAX], family):
        bundle = await (await client.get(f"/fhir/R4/Patient?family={query}")).json()
        assert bundle["total"] == 1, len(query)


async def test_a_batch_is_forwarded_as_checked_not_as_sent(proxy_for, clean_upstream, satusehat):
    """A duplicate ``entry`` key hid a Patient from the check; the raw bytes then carried it upstream."""
    client = await proxy_for(clean_upstream.base_url, satusehat)
    patient = {"resourceType": "Patient", "identifier": [{"system": NIK_SYSTEM, "value": NIK}]}
    hidden = orjson.dumps([{"resource": patient, "request": {"method": "POST", "url": "Patient"}}])
    body = (
        b'{"resourceType":"Bundle","type":"batch","entry":'
        + hidden
        + b',"entry":[{"request":{"method":"GET","url":"metadata"}}]}'
    )
    resp = await client.post("/fhir/R4", data=body, headers=FHIR_JSON)
    assert resp.status == 200
    assert NIK not in orjson.dumps(clean_upstream.requests()).decode()


async def test_a_patch_on_an_uncovered_type_is_forwarded_as_checked(proxy_for, clean_upstream, satusehat):
    client = await proxy_for(clean_upstream.base_url, satusehat)
    body = b'[{"op":"add","path":"/reason","value":"' + NIK.encode() + b'","value":"text/plain"}]'
    await client.patch("/fhir/R4/Subscription/s1", data=body, headers={"Content-Type": "application/json-patch+json"})
    sent = [r for r in clean_upstream.requests() if r["method"] == "PATCH"]
    assert sent and NIK not in sent[0]["body"] and orjson.loads(sent[0]["body"])[0]["value"] == "text/plain"


async def test_everything_start_and_end_must_be_dates(proxy_for, clean_upstream, satusehat):
    client = await proxy_for(clean_upstream.base_url, satusehat)
    resp = await client.get(f"/fhir/R4/Patient/p1/$everything?start=2024-01-01&end={NIK}")
    assert resp.status == 400
    assert clean_upstream.requests() == []
    resp = await client.get("/fhir/R4/Patient/p1/$everything?start=2024-01-01&end=2024-12-31T23:59:59Z")
    assert resp.status != 400


async def test_a_broken_chunked_body_is_a_400_not_an_internal_error(proxy_for, clean_upstream, satusehat):
    client = await proxy_for(clean_upstream.base_url, satusehat)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        b"POST /fhir/R4/Patient HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\nZZ\r\n'
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.read(200), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400") or head.startswith(b"HTTP/1.0 400"), head
    assert clean_upstream.requests() == []


async def test_summary_and_elements_in_a_post_search_body_are_refused(proxy_for, clean_upstream, satusehat):
    """In the URL the proxy applies them after decryption; in the form body they reached the server, which
    then dropped the envelope, and every record came back masked as an integrity failure."""
    client = await proxy_for(clean_upstream.base_url, satusehat)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for body in (b"_elements=name", b"family=Budiarto&_summary=true"):
        resp = await client.post("/fhir/R4/Patient/_search", data=body, headers=form)
        assert resp.status == 400
        assert (await resp.json())["issue"][0]["expression"][0] in ("_elements", "_summary")
    resp = await client.post("/fhir/R4/Patient/_search?_elements=name", data=b"family=Budiarto", headers=form)
    assert resp.status == 200
    sent = clean_upstream.requests()[-1]
    assert "_elements" not in sent["url"] + sent["body"] and "Budiarto" not in sent["body"]  # applied by the proxy


@pytest.mark.parametrize("depth", [1, 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
def test_the_nesting_limit_counts_every_level_of_objects_and_arrays(depth):
    value: object = "leaf"
    for i in range(depth):
        value = {"a": value, "n": 1} if i % 2 else [1, value, "x"]
    assert too_deep(value) is (depth > MAX_DEPTH)
    assert too_deep({"shallow": [1], "deep": value}) is (depth + 1 > MAX_DEPTH)
