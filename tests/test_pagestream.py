"""Search pages larger than ``stream_threshold`` are answered entry by entry (proxy.web.pagestream).

The page comes from the real test upstream (Medplum) holding resources the proxy encrypted under the
SATUSEHAT policy. A proxy whose threshold is lowered to a few KiB streams it; one with the default
threshold reads it whole; for the same data and caller both give the same bytes. Pages are served
either by Medplum itself or, where two requests must see the very same page (Medplum mints a new
Bundle id per search) or the upstream must misbehave, by a small real aiohttp server replaying the
bytes Medplum gave.
"""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.audit.cli import init_trail
from proxy.policy.compiler import compile_text
from proxy.transform.markers import GROUP_URL
from tests.conftest import FHIR_JSON, ROOT, load_fixture
from tests.test_auth import AUDIENCE, bearer, issuer  # noqa: F401 (issuer: the OpenID provider fixture)

NIK = "3175042903870007"  # the fixture patient's NIK (every seeded Patient has it)
PATIENTS = 24  # ~18 KB each at rest: a page of several upstream chunks, far below the default threshold
THRESHOLD = 4096
CALLERS = {
    "physician (decrypted)": {"realm_access": {"roles": ["physician"]}, "scope": "user/*.rs"},
    "analytics client (no group: masked)": {"scope": "system/*.rs", "azp": "analytics"},
    "patient app of pat-a (screened)": {"scope": "patient/*.rs launch/patient", "patient": "pat-a"},
}


def _pid(i: int) -> str:
    return {0: "pat-a", 1: "pat-b"}.get(i, f"p-{i:02d}")


@pytest.fixture
async def seeded(proxy_for, clean_upstream, satusehat):
    """Patients and a hemoglobin Observation each (value ``10.830``: a decimal whose precision counts),
    written through the proxy in development mode, so the upstream stores them encrypted."""
    writer = await proxy_for(clean_upstream.base_url, satusehat)
    for i in range(PATIENTS):
        pid = _pid(i)
        patient = load_fixture("satusehat/patient.json") | {"id": pid}
        observation = load_fixture(
            "satusehat/observation-hemoglobin.json",
            {"PATIENT_ID": pid, "ENCOUNTER_ID": "enc-1", "PRACTITIONER_ID": "pr-1"},
        ) | {"id": f"obs-{pid}"}
        for resource in (patient, observation):
            url = f"/fhir/R4/{resource['resourceType']}/{resource['id']}"
            data = orjson.dumps(resource).replace(b'"value":10.83,', b'"value":10.830,')
            resp = await writer.put(url, data=data, headers=FHIR_JSON)
            assert resp.status == 201, await resp.text()
    return clean_upstream


@pytest.fixture
def proxies(proxy_for, satusehat, issuer):  # noqa: F811
    """Factory: (streaming proxy, whole-body proxy) in front of ``base``, with JWT authentication."""

    async def make(base: str, policy=None, **extra):
        common = dict(auth="jwt", oidc_issuer=issuer.url, audience=AUDIENCE, **extra)
        return (
            await proxy_for(base, policy or satusehat, stream_threshold=THRESHOLD, **common),
            await proxy_for(base, policy or satusehat, **common),
        )

    return make


@pytest.fixture
async def replay(aiohttp_server):
    """A real upstream that answers every GET with the bytes it is given (``replay.body``, optionally cut off)."""

    class Replay:
        body = b""
        base = ""
        cut_after: int | None = None  # bytes sent before the connection is dropped

    async def answer(request):
        if Replay.cut_after is None:
            return web.Response(body=Replay.body, content_type="application/fhir+json")
        out = web.StreamResponse(headers={"Content-Type": "application/fhir+json"})
        await out.prepare(request)
        await out.write(Replay.body[: Replay.cut_after])
        request.transport.close()  # the upstream breaks off mid-body
        return out

    app = web.Application()
    app.router.add_get("/fhir/R4/{tail:.*}", answer)
    server = await aiohttp_server(app)
    Replay.base = f"http://127.0.0.1:{server.port}/fhir/R4"
    return Replay


async def _medplum_page(seeded, replay, query: str) -> bytes:
    """Medplum's own answer (as stored: encrypted), its base rewritten to the replaying server's."""
    async with aiohttp.ClientSession() as session, session.get(f"{seeded.base_url}/{query}") as resp:
        assert resp.status == 200
        raw = await resp.read()
    assert len(raw) > 10 * THRESHOLD
    return raw.replace(seeded.base_url.encode(), replay.base.encode())


def _streamed(resp) -> bool:
    return "Content-Length" not in resp.headers and resp.headers.get("Transfer-Encoding") == "chunked"


@pytest.mark.parametrize("who", list(CALLERS))
async def test_a_large_page_gives_the_bytes_of_the_whole_body_path(seeded, replay, proxies, issuer, who):  # noqa: F811
    replay.body = await _medplum_page(seeded, replay, "Patient?_count=100&_total=accurate")
    streaming, whole = await proxies(replay.base)
    auth = bearer(issuer.token(**CALLERS[who]))
    s = await streaming.get("/fhir/R4/Patient?_count=100", headers=auth)
    w = await whole.get("/fhir/R4/Patient?_count=100", headers=auth)
    assert s.status == w.status == 200
    assert _streamed(s) and not _streamed(w)
    body = await s.read()
    assert body == await w.read()
    bundle = orjson.loads(body)
    ids = [e["resource"]["id"] for e in bundle["entry"]]
    assert b"fhircrypt.dev" not in body  # no envelope, ciphertext or index left for any caller
    if who.startswith("physician"):
        assert len(ids) == PATIENTS and bundle["total"] == PATIENTS
        assert body.count(NIK.encode()) == 2 * PATIENTS  # identifier and narrative, decrypted
    elif who.startswith("analytics"):
        assert len(ids) == PATIENTS and NIK.encode() not in body and b"Wiryasentana" not in body
        assert all(any(s["code"] == "MASKED" for s in e["resource"]["meta"]["security"]) for e in bundle["entry"])
    else:  # the upstream answered beyond the compartment: the others are screened out, and so is the count
        assert ids == ["pat-a"] and "total" not in bundle and NIK.encode() in body
        assert list(bundle)[-1] == "entry"  # total would have come after the entries (answers.total_waits)


async def test_everything_searches_and_histories_stream_straight_from_the_real_upstream(seeded, proxies, issuer):  # noqa: F811
    streaming, whole = await proxies(seeded.base_url)
    auth = bearer(issuer.token(**CALLERS["physician (decrypted)"]))
    s = await streaming.get("/fhir/R4/Patient/pat-a/$everything", headers=auth)
    w = await whole.get("/fhir/R4/Patient/pat-a/$everything", headers=auth)
    assert _streamed(s) and not _streamed(w)
    body = await s.read()
    assert body == await w.read()
    assert b'"value":10.830,' in body and NIK.encode() in body  # decrypted, its decimal exactly as written

    def unminted(bundle: dict) -> dict:  # Medplum gives every search a new Bundle id and timestamp
        return {k: v for k, v in bundle.items() if k not in ("id", "meta")}

    for query, entries in (("Observation?_count=100", PATIENTS), ("Patient/_history?_count=100", PATIENTS)):
        s = await streaming.get(f"/fhir/R4/{query}", headers=auth)
        w = await whole.get(f"/fhir/R4/{query}", headers=auth)
        assert _streamed(s) and not _streamed(w)
        streamed = orjson.loads(await s.read())
        assert unminted(streamed) == unminted(orjson.loads(await w.read()))
        assert len(streamed["entry"]) == entries and b"fhircrypt.dev" not in orjson.dumps(streamed)


async def test_paging_links_of_a_streamed_page_are_the_proxys_signed_links(seeded, proxies, issuer):  # noqa: F811
    streaming, _ = await proxies(seeded.base_url)
    auth = bearer(issuer.token(**CALLERS["physician (decrypted)"]))
    first = await streaming.get("/fhir/R4/Patient?_count=10", headers=auth)
    assert _streamed(first)
    bundle = orjson.loads(await first.read())
    (following,) = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    assert following.startswith("http://proxy.test/fhir/R4/$fhircrypt-link/page/")
    second = await streaming.get(following.removeprefix("http://proxy.test"), headers=auth)
    assert _streamed(second)
    page = orjson.loads(await second.read())
    assert [e["resource"]["id"] for e in page["entry"]] == [_pid(i) for i in range(10, 20)]


async def test_a_tampered_resource_is_masked_and_flagged_in_the_body_once_headers_are_sent(
    seeded,
    replay,
    proxies,
    issuer,  # noqa: F811
):
    raw = await _medplum_page(seeded, replay, "Patient?_count=100")
    at = raw.index(b'"valueString":"', raw.index(GROUP_URL.encode())) + 40
    replay.body = raw[:at] + (b"A" if raw[at : at + 1] != b"A" else b"B") + raw[at + 1 :]  # one ciphertext altered
    streaming, whole = await proxies(replay.base)
    auth = bearer(issuer.token(**CALLERS["physician (decrypted)"]))
    s = await streaming.get("/fhir/R4/Patient?_count=100", headers=auth)
    w = await whole.get("/fhir/R4/Patient?_count=100", headers=auth)
    assert w.headers["X-Fhircrypt-Integrity"] == "failed; issues=1" and "X-Fhircrypt-Integrity" not in s.headers
    streamed, read_whole = orjson.loads(await s.read()), orjson.loads(await w.read())
    *entries, flag = streamed["entry"]
    assert entries == read_whole["entry"]  # the same resources, the tampered one masked in both
    assert flag["search"] == {"mode": "outcome"} and flag["resource"]["resourceType"] == "OperationOutcome"
    assert "1 integrity check(s) failed" in flag["resource"]["issue"][0]["diagnostics"]
    tampered = entries[0]["resource"]
    assert any(s["code"] == "MASKED" for s in tampered["meta"]["security"])


@pytest.mark.parametrize(
    "break_off",
    ["connection dropped", "clean end mid-JSON", "garbage mid-body", "nesting bomb in an entry", "duplicate member"],
)
async def test_an_upstream_that_fails_after_the_headers_gives_a_broken_transfer(
    seeded,
    replay,
    proxies,
    issuer,  # noqa: F811
    break_off,
):
    raw = await _medplum_page(seeded, replay, "Patient?_count=100")
    middle = raw.index(b',{"fullUrl"', len(raw) // 2)  # between two entries, far past the first bytes
    replay.body = {
        "connection dropped": raw,
        "clean end mid-JSON": raw[:middle],
        "garbage mid-body": raw[:middle] + b",@" + raw[middle:],
        "nesting bomb in an entry": raw[:middle] + b',{"resource":' + b"[" * 300_000 + raw[middle:],
        "duplicate member": raw[:-1] + b',"type":"collection"}',
    }[break_off]
    replay.cut_after = middle if break_off == "connection dropped" else None
    streaming, _ = await proxies(replay.base)
    auth = bearer(issuer.token(**CALLERS["physician (decrypted)"]))
    resp = await streaming.get("/fhir/R4/Patient?_count=100", headers=auth)
    assert resp.status == 200 and _streamed(resp)
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_a_failure_before_the_headers_is_an_ordinary_502(seeded, replay, proxies, issuer):  # noqa: F811
    raw = await _medplum_page(seeded, replay, "Patient?_count=100")
    replay.body = raw[:1] + b"@" + raw[1:]
    streaming, _ = await proxies(replay.base)
    resp = await streaming.get("/fhir/R4/Patient", headers=bearer(issuer.token(**CALLERS["physician (decrypted)"])))
    assert resp.status == 502
    outcome = await resp.json()
    assert outcome["issue"][0]["diagnostics"] == "the upstream answered with invalid JSON"


async def test_a_canary_met_mid_stream_cuts_the_answer_before_its_entry(seeded, proxies, issuer):  # noqa: F811
    text = (ROOT / "policies/satusehat.yaml").read_text() + "\ncanaries: {resources: [Patient/p-12], action: block}\n"
    streaming, _ = await proxies(seeded.base_url, compile_text(text, "satusehat+canary.yaml"))
    thief = bearer(issuer.token(sub="sweeper", **CALLERS["physician (decrypted)"]))
    resp = await streaming.get("/fhir/R4/Patient?_count=100", headers=thief)
    assert resp.status == 200 and _streamed(resp)
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            received += chunk
    # entries went out (a batch is one upstream chunk, at most 64 KiB: pat-a is 200 KB before the canary),
    # and the connection was cut before the canary's batch
    assert b'"id":"pat-a"' in received and b'"id":"p-12"' not in received
    assert (await streaming.get("/fhir/R4/Patient/pat-a", headers=thief)).status == 403  # blocked from now on


async def test_a_streamed_page_is_audited_like_a_whole_one(seeded, proxy_for, satusehat, issuer, tmp_path):  # noqa: F811
    trail, key_file = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    init_trail(trail, key_file)
    streaming = await proxy_for(
        seeded.base_url,
        satusehat,
        stream_threshold=THRESHOLD,
        auth="jwt",
        oidc_issuer=issuer.url,
        audience=AUDIENCE,
        audit_trail=str(trail),
    )
    auth = bearer(issuer.token(**CALLERS["analytics client (no group: masked)"]))
    resp = await streaming.get("/fhir/R4/Patient?_count=100", headers=auth)
    assert _streamed(resp)
    await resp.read()
    await streaming.server.close()  # flushes the sink
    (event,) = [orjson.loads(line)["event"] for line in trail.read_text().splitlines()]
    named = [e["what"]["reference"] for e in event["entity"] if "reference" in e.get("what", {})]
    assert named == [f"Patient/{_pid(i)}" for i in range(PATIENTS)] and event["outcome"] == "0"
    details = {d["type"]: d["valueString"] for e in event["entity"] for d in e.get("detail", [])}
    assert "identity" in details["masked-groups"] and "decrypted-groups" not in details
    assert NIK not in trail.read_text()
