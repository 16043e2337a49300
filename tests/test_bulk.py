"""Bulk Data export through the proxy, against the test upstream's $export (kick-off, status, NDJSON files).

The large-export test runs the proxy as its own process (``fhircrypt serve``) and samples
its resident memory while 100,000 resources stream through it: memory must stay flat.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.policy.compiler import compile_text
from tests.conftest import FHIR_JSON, PUBLIC_BASE, ROOT, load_fixture
from tests.serving import free_port, make_keyring

FIXED = {"ORGANIZATION_ID": "org-1", "PRACTITIONER_ID": "prac-1", "ENCOUNTER_ID": "enc-1"}
ASYNC = {"Prefer": "respond-async"}
POLICY_TEXT = (ROOT / "policies" / "satusehat.yaml").read_text()


def _local(url: str) -> str:
    """A proxy URL as the test client addresses it (the public base is http://proxy.test/fhir/R4)."""
    assert url.startswith(PUBLIC_BASE), url
    return url[len("http://proxy.test") :]


async def _bulk_options(upstream, **options) -> None:
    async with aiohttp.ClientSession() as session:
        url = upstream.base_url.replace("/fhir/R4", "/$admin/bulk-options")
        async with session.post(url, json=options) as resp:
            assert resp.status == 200, await resp.text()


async def _manifest(client, kickoff: str, timeout: float = 5.0) -> dict:
    """Kick an export off through the proxy and poll its status link until the manifest comes."""
    resp = await client.get(kickoff, headers=ASYNC)
    assert resp.status == 202, await resp.text()
    status_link = resp.headers["Content-Location"]
    assert f"{PUBLIC_BASE}/$fhircrypt-link/status/" in status_link
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await client.get(_local(status_link))
        if resp.status == 200:
            return await resp.json()
        assert resp.status == 202, await resp.text()
        await asyncio.sleep(0.1)
    raise AssertionError("the export did not complete")


async def _stored(client) -> tuple[dict, dict]:
    patient = load_fixture("satusehat/patient.json", FIXED)
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)).json()
    observation = load_fixture("satusehat/observation-hemoglobin.json", {**FIXED, "PATIENT_ID": created["id"]})
    resp = await client.post("/fhir/R4/Observation", data=orjson.dumps(observation), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    return patient, observation


def _as_sent(resource: dict) -> dict:
    """Without what the server assigns (id, version meta, HAPI's meta.source) and the reference the test fixed up."""
    out = {k: v for k, v in resource.items() if k not in ("id", "subject")}
    meta = {k: v for k, v in out.pop("meta", {}).items() if k not in ("versionId", "lastUpdated", "source")}
    return {**out, "meta": meta} if meta else out


async def test_an_export_streams_every_file_decrypted_through_proxy_links(proxy_for, clean_upstream, satusehat):
    client = await proxy_for(clean_upstream.base_url, satusehat)
    patient, observation = await _stored(client)
    manifest = await _manifest(client, "/fhir/R4/$export?_type=Patient,Observation")
    assert manifest["requiresAccessToken"] is True
    assert manifest["request"].startswith(PUBLIC_BASE)
    files = {item["type"]: item["url"] for item in manifest["output"]}
    assert set(files) == {"Patient", "Observation"}
    for url in files.values():
        assert url.startswith(f"{PUBLIC_BASE}/$fhircrypt-link/file/")
    for rtype, original in (("Patient", patient), ("Observation", observation)):
        resp = await client.get(_local(files[rtype]))
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/fhir+ndjson")
        text = await resp.text()
        assert "fhircrypt.dev" not in text
        (line,) = text.splitlines()
        resource = orjson.loads(line)
        assert _as_sent(resource) == _as_sent(original)
    # the same at Patient level
    manifest = await _manifest(client, "/fhir/R4/Patient/$export")
    assert {item["type"] for item in manifest["output"]} >= {"Patient", "Observation"}


async def test_links_are_only_followed_when_the_proxy_minted_them(proxy_for, clean_upstream, satusehat, keyring):
    client = await proxy_for(clean_upstream.base_url, satusehat)
    await _stored(client)
    manifest = await _manifest(client, "/fhir/R4/$export?_type=Patient")
    file_link = _local(manifest["output"][0]["url"])
    clean_upstream.reset()
    token = file_link.rsplit("/", 1)[1]
    forged = keyring.link_signer.sign("status http://127.0.0.1:1/elsewhere")
    for bad in (
        file_link[:-1] + ("B" if file_link.endswith("A") else "A"),  # tampered MAC
        file_link.replace("/file/", "/status/"),  # a file token used as a status link
        f"/fhir/R4/$fhircrypt-link/file/{forged}",  # right key, wrong kind
        f"/fhir/R4/$fhircrypt-link/other/{token}",
    ):
        resp = await client.get(bad)
        assert resp.status == 404, (bad, await resp.text())
        assert (await resp.json())["resourceType"] == "OperationOutcome"
    assert clean_upstream.requests() == []


async def test_pre_signed_files_are_refused_or_proxied_as_the_policy_says(proxy_for, clean_upstream, satusehat):
    client = await proxy_for(clean_upstream.base_url, satusehat)
    patient, _ = await _stored(client)
    await _bulk_options(clean_upstream, requiresAccessToken=False)
    resp = await client.get("/fhir/R4/$export?_type=Patient", headers=ASYNC)
    status_link = _local(resp.headers["Content-Location"])
    for _ in range(50):
        resp = await client.get(status_link)
        if resp.status != 202:
            break
        await asyncio.sleep(0.1)
    assert resp.status == 502
    assert "pre-signed" in (await resp.json())["issue"][0]["diagnostics"]
    proxying = compile_text(POLICY_TEXT + "\nbulk: {presigned: proxy}\n", "satusehat+bulk.yaml")
    client = await proxy_for(clean_upstream.base_url, proxying)
    manifest = await _manifest(client, "/fhir/R4/$export?_type=Patient")
    link = manifest["output"][0]["url"]
    assert "/$fhircrypt-link/open/" in link and manifest["requiresAccessToken"] is True
    resp = await client.get(_local(link), headers={"Authorization": "Bearer not-for-the-object-store"})
    assert resp.status == 200
    (line,) = (await resp.text()).splitlines()
    assert orjson.loads(line)["name"] == patient["name"]
    presigned = [r for r in clean_upstream.requests() if "/presigned/" in r["url"]]
    assert presigned and all("authorization" not in {k.lower() for k in r["headers"]} for r in presigned)


async def test_a_file_that_fails_midway_is_cut_off_not_finished(proxy_for, aiohttp_server, satusehat, keyring):
    """An upstream file with a line the proxy cannot process: the client must see a broken transfer."""
    app = web.Application()

    async def kickoff(request):
        return web.Response(status=202, headers={"Content-Location": f"{base}/status/1"})

    async def status(request):
        return web.json_response(
            {
                "transactionTime": "2026-01-01T00:00:00Z",
                "request": f"{base}/$export",
                "requiresAccessToken": True,
                "output": [{"type": "Patient", "url": f"{base}/file/1.ndjson"}],
                "error": [],
            }
        )

    async def broken_file(request):
        out = web.StreamResponse(headers={"Content-Type": "application/fhir+ndjson"})
        await out.prepare(request)
        await out.write(b'{"resourceType":"Basic","id":"a","code":{"text":"fine"}}\n' * 2000)
        await out.write(b"not json at all\n")
        await out.write(b'{"resourceType":"Basic","id":"b","code":{"text":"after"}}\n')
        await out.write_eof()
        return out

    app.router.add_get("/fhir/R4/$export", kickoff)
    app.router.add_get("/fhir/R4/status/1", status)
    app.router.add_get("/fhir/R4/file/1.ndjson", broken_file)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}/fhir/R4"
    client = await proxy_for(base, satusehat)
    manifest = await _manifest(client, "/fhir/R4/$export")
    resp = await client.get(_local(manifest["output"][0]["url"]))
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_100000_resource_export_streams_through_a_separate_proxy_in_flat_memory(clean_upstream, tmp_path):
    """The proxy as its own process: peak resident memory while 100,000 Observations stream through it
    stays within a fixed bound over what it used after a 1,000-line warm-up export."""
    ring, kek = make_keyring(tmp_path)
    port = free_port()
    env = {
        **os.environ,
        "FHIRCRYPT_UPSTREAM": clean_upstream.base_url,
        "FHIRCRYPT_POLICY": "policies/satusehat.yaml",
        "FHIRCRYPT_LISTEN": f"127.0.0.1:{port}",
        "FHIRCRYPT_KEYRING": str(ring),
        "FHIRCRYPT_KEK_FILE": str(kek),
        "FHIRCRYPT_AUTH": "none",
    }
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/fhir/R4"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "the proxy did not start"
                await asyncio.sleep(0.2)
            observation = load_fixture("satusehat/observation-hemoglobin.json", {**FIXED, "PATIENT_ID": "pat-1"})
            async with session.post(f"{base}/Observation", data=orjson.dumps(observation), headers=FHIR_JSON) as r:
                assert r.status == 201, await r.text()

            async def export(copies: int) -> tuple[int, int]:
                await _bulk_options(clean_upstream, copies=copies)
                async with session.get(f"{base}/$export?_type=Observation", headers=ASYNC) as r:
                    status_url = r.headers["Content-Location"]
                while True:
                    async with session.get(status_url) as r:
                        if r.status == 200:
                            manifest = await r.json()
                            break
                    await asyncio.sleep(0.1)
                lines, peak, carry = 0, 0, b""
                async with session.get(manifest["output"][0]["url"]) as r:
                    assert r.status == 200
                    async for chunk in r.content.iter_chunked(1 << 16):
                        data = carry + chunk
                        lines += data.count(b"\n")
                        carry = data[data.rfind(b"\n") + 1 :]
                        if lines and lines % 1000 < 50:
                            assert b"fhircrypt.dev" not in chunk
                        peak = max(peak, _rss_kib(proc.pid))
                return lines, peak

            warm_lines, warm_peak = await export(1000)
            assert warm_lines == 1000
            lines, peak = await export(100_000)
            assert lines == 100_000
            growth_mib = (peak - warm_peak) / 1024
            print(f"proxy RSS: {warm_peak / 1024:.1f} MiB after 1,000 lines, peak {peak / 1024:.1f} MiB over 100,000")
            # 100,000 decrypted Observations are ~100 MB: buffering even a fraction would show
            assert growth_mib < 40, f"proxy memory grew by {growth_mib:.1f} MiB during the export"
    finally:
        proc.terminate()
        proc.wait(timeout=15)
