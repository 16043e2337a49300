"""python -m bench.pagememory [--patients 200 1000 3000]: the proxy's memory for one large search page, read
whole versus streamed entry by entry (``stream_threshold``, proxy.web.pagestream).

One process, one event loop: a small aiohttp upstream answering every GET with a prebuilt searchset of
N encrypted SATUSEHAT Patients (the benchmark's at-rest Patient under distinct ids, ~18 KB each), the
proxy's own app (``create_app``, ``--auth none``, policies/satusehat.yaml) in front of it, and a client
that reads the answer in 64 KiB chunks and keeps only their count. The page's bytes exist before
tracing starts and the upstream sends them as they are, so what ``tracemalloc`` sees as the peak over
the request is the proxy's own: the upstream body it holds, the parsed page and the answer it writes
(Python allocations only; that is where a parsed page lives). Wall time is measured in a separate,
untraced run. Paths: ``whole`` (``stream_threshold`` above any page, ``max_response`` 1 GiB: today's
path for pages up to 64 MiB) and ``streamed`` (the default 1 MiB threshold).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import tracemalloc

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.core import DEPLOYMENT, POLICY, encrypt_for_storage, patient_bytes
from proxy.keymgmt.keyring import Keyring
from proxy.policy.compiler import compile_file
from proxy.settings import Settings
from proxy.web.app import create_app

MIB = 1024 * 1024
PUBLIC = "http://proxy.bench/fhir/R4"


def page(n: int, base: str, policy, keyring: Keyring) -> bytes:
    """A searchset of ``n`` at-rest Patients as Medplum would send it (compact JSON)."""
    at_rest = orjson.loads(patient_bytes())
    encrypt_for_storage(at_rest, policy, keyring)
    entries = []
    for i in range(n):
        resource = {"resourceType": "Patient", "id": f"p{i}", **{k: v for k, v in at_rest.items() if k != "id"}}
        entries.append({"fullUrl": f"{base}/Patient/p{i}", "resource": resource, "search": {"mode": "match"}})
    bundle = {
        "resourceType": "Bundle",
        "id": "bench",
        "type": "searchset",
        "total": n,
        "link": [{"relation": "self", "url": f"{base}/Patient"}],
        "entry": entries,
    }
    return orjson.dumps(bundle)


async def _through_proxy(upstream_base: str, policy, keyring: Keyring, threshold: int, traced: bool) -> tuple:
    settings = Settings(
        upstream=upstream_base,
        policy="",
        keyring="",
        public_base_url=PUBLIC,
        auth="none",
        upstream_timeout=300.0,
        stream_threshold=threshold,
        max_response=1024 * MIB,
    )
    server = TestServer(create_app(settings, policy, keyring))
    await server.start_server(access_log=None)
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url("/fhir/R4/Patient"))
            await (await session.get(url + "?warm-up")).read()
            if traced:
                tracemalloc.start()
                tracemalloc.reset_peak()
            started = time.perf_counter()
            received = 0
            async with session.get(url) as resp:
                assert resp.status == 200, resp.status
                async for chunk in resp.content.iter_chunked(1 << 16):
                    received += len(chunk)
            seconds = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1] if traced else 0
            if traced:
                tracemalloc.stop()
            return received, seconds, peak
    finally:
        await server.close()


async def run(counts: list[int]) -> list[dict]:
    policy = compile_file(POLICY, DEPLOYMENT)
    keyring = Keyring.generate()
    body = {"bytes": b""}

    async def answer(request: web.Request) -> web.StreamResponse:
        """The page in 64 KiB writes, each waiting while the proxy does not read: the upstream's own
        socket buffer stays small and out of the proxy's figure (a server in another process)."""
        out = web.StreamResponse(headers={"Content-Type": "application/fhir+json"})
        await out.prepare(request)
        data = memoryview(body["bytes"])
        for at in range(0, len(data), 1 << 16):
            await out.write(data[at : at + (1 << 16)])
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_get("/fhir/R4/{tail:.*}", answer)
    upstream = TestServer(app)
    await upstream.start_server(access_log=None)
    base = str(upstream.make_url("/fhir/R4"))
    rows = []
    try:
        for n in counts:
            body["bytes"] = page(n, base, policy, keyring)
            for path, threshold in (("whole", 1 << 40), ("streamed", Settings.stream_threshold)):
                received, _, peak = await _through_proxy(base, policy, keyring, threshold, traced=True)
                _, seconds, _ = await _through_proxy(base, policy, keyring, threshold, traced=False)
                rows.append(
                    {
                        "patients": n,
                        "page_mib": round(len(body["bytes"]) / MIB, 1),
                        "answer_mib": round(received / MIB, 1),
                        "path": path,
                        "peak_mib": round(peak / MIB, 1),
                        "seconds": round(seconds, 2),
                    }
                )
                print(rows[-1], flush=True)
    finally:
        await upstream.close()
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| Patients | page at rest (MiB) | answer (MiB) | path | peak traced (MiB) | wall (s) |",
        "|--:|--:|--:|---|--:|--:|",
    ]
    for r in rows:
        cells = (r["patients"], r["page_mib"], r["answer_mib"], r["path"], r["peak_mib"], r["seconds"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pagememory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[200, 1000, 3000])
    args = parser.parse_args()
    print(table(asyncio.run(run(args.patients))))


if __name__ == "__main__":
    main()
