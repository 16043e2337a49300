"""Index format v2 next to v1 data, against the real test upstream.

Writes store v2 index identifiers (short system, base32 token); data written before keeps v1
ones until ``fhircrypt reencrypt`` moves it. A mix of both must read and search exactly like
data of one format, and the move must be resumable and idempotent.
"""

from __future__ import annotations

import copy
from collections import Counter

import aiohttp
import orjson
import pytest

from proxy.keymgmt.keyring import Keyring
from proxy.migrate.assess import Plan
from proxy.migrate.commands import Connection, reencrypt
from proxy.policy.compiler import CompiledPolicy
from proxy.transform import markers as mk
from proxy.transform.indexes import spec_texts
from proxy.transform.records import ALL_GROUPS, ReadReport, decrypt_resource
from tests.conftest import FHIR_JSON
from tests.test_reencrypt import Relay, current_versions, load_patients, opts, puts

NIK = "https://fhir.kemkes.go.id/id/nik"
OLD = {
    "resourceType": "Patient",
    "id": "p-old",
    "identifier": [{"system": NIK, "value": "3175042903870007"}],
    "name": [{"family": "Wiryasentana", "given": ["Budiarto"]}],
    "gender": "male",
    "birthDate": "1987-03-29",
    "telecom": [{"system": "phone", "value": "081377745210"}, {"system": "email", "value": "budi@contoh.id"}],
}
NEW = {
    "resourceType": "Patient",
    "id": "p-new",
    "identifier": [{"system": NIK, "value": "3273011204800001"}],
    "name": [{"family": "Santoso", "given": ["Budiman"]}],
    "gender": "male",
    "birthDate": "1980-04-12",
    "telecom": [{"system": "phone", "value": "081255556666"}],
}
QUERIES = {
    f"identifier={NIK}|3175042903870007": ["p-old"],
    f"identifier={NIK}|3273011204800001": ["p-new"],
    f"identifier={NIK}|": ["p-new", "p-old"],
    "name=budi": ["p-new", "p-old"],
    "family=wir": ["p-old"],
    "given=budim": ["p-new"],
    "birthdate=1987": ["p-old"],
    "birthdate=1980-04-12": ["p-new"],
    "phone=081377745210": ["p-old"],
    "phone=phone|081255556666": ["p-new"],
    "email=budi@contoh.id": ["p-old"],
    "email=081377745210": [],
    "telecom=phone|": ["p-new", "p-old"],
    "telecom=email|": ["p-old"],
    "telecom=081255556666": ["p-new"],
}


@pytest.fixture
def ring() -> Keyring:
    return Keyring.generate()


def _index_formats(resource: dict) -> set[str]:
    systems = [i["system"] for i in resource.get("identifier", ()) if i.get("system", "").startswith(mk.INDEX_BASES)]
    return {"v1" if s.startswith(mk.BLIND_INDEX_BASE) else "v2" for s in systems}


def as_v1(stored: dict, policy: CompiledPolicy, ring: Keyring) -> dict:
    """``stored`` as a fhircrypt before index format v2 wrote it: the same ciphertexts, v1 index identifiers."""
    rp = policy.resources[stored["resourceType"]]
    plain = copy.deepcopy(stored)
    report = ReadReport()
    decrypt_resource(plain, rp, ring, ALL_GROUPS, policy.unenveloped, report)
    assert not report.failures
    old = copy.deepcopy(stored)
    old["identifier"] = [i for i in old["identifier"] if not i["system"].startswith(mk.INDEX_BASES)] + [
        {"system": mk.BLIND_INDEX_BASE + spec.label, "value": t}
        for spec, texts in spec_texts(plain, rp)
        for t in sorted(ring.indexer.tokens(spec.label, texts))
    ]
    return old


async def _age_to_v1(upstream, policy: CompiledPolicy, ring: Keyring, ids: set[str]) -> None:
    async with aiohttp.ClientSession() as session:
        for r in current_versions(upstream):
            if r["id"] in ids:
                url = f"{upstream.base_url}/Patient/{r['id']}"
                async with session.put(url, data=orjson.dumps(as_v1(r, policy, ring)), headers=FHIR_JSON) as resp:
                    assert resp.status == 200, await resp.text()


async def _search(client, query: str) -> list[str]:
    resp = await client.get(f"/fhir/R4/Patient?{query}")
    assert resp.status == 200, (query, await resp.text())
    return sorted(e["resource"]["id"] for e in (await resp.json()).get("entry", []))


async def test_a_mix_of_v1_and_v2_indexes_reads_and_searches_and_reencrypt_moves_v1_to_v2(
    clean_upstream, satusehat, ring, proxy_for
):
    client = await proxy_for(clean_upstream.base_url, satusehat, ring)
    for patient in (OLD, NEW):
        resp = await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
    await _age_to_v1(clean_upstream, satusehat, ring, {"p-old"})
    stored = {r["id"]: r for r in current_versions(clean_upstream)}
    assert _index_formats(stored["p-old"]) == {"v1"} and _index_formats(stored["p-new"]) == {"v2"}
    # v2 answers phone= and email= from telecom's own system|value texts: no tokens of their own
    systems = {i["system"] for i in stored["p-new"]["identifier"]}
    assert mk.INDEX_BASE + "telecom/telecom" in systems
    assert not systems & {mk.INDEX_BASE + "telecom/phone", mk.INDEX_BASE + "telecom/email"}

    async def reads_and_searches() -> None:
        for patient in (OLD, NEW):
            back = await (await client.get(f"/fhir/R4/Patient/{patient['id']}")).json()
            assert {k: v for k, v in back.items() if k != "meta"} == patient
        for query, expected in QUERIES.items():
            assert await _search(client, query) == expected, query

    await reads_and_searches()

    conn, plan = Connection(clean_upstream.base_url), Plan(satusehat, ring)
    before = len(puts(clean_upstream))
    assert await reencrypt(conn, plan, opts(), None, None) == 0
    written = [r["url"] for r in puts(clean_upstream)[before:]]
    assert written == ["/fhir/R4/Patient/p-old"]  # only the v1 resource is moved
    stored = {r["id"]: r for r in current_versions(clean_upstream)}
    assert _index_formats(stored["p-old"]) == {"v2"} and _index_formats(stored["p-new"]) == {"v2"}
    await reads_and_searches()

    before = len(puts(clean_upstream))
    assert await reencrypt(conn, plan, opts(), None, None) == 0
    assert len(puts(clean_upstream)) == before  # idempotent: everything is current


async def test_moving_v1_indexes_to_v2_resumes_from_its_checkpoint(clean_upstream, satusehat, ring, tmp_path):
    await load_patients(clean_upstream.base_url, 20)
    conn, plan = Connection(clean_upstream.base_url), Plan(satusehat, ring)
    assert await reencrypt(conn, plan, opts(), None, None) == 0  # adopted: encrypted, v2 indexes
    await _age_to_v1(clean_upstream, satusehat, ring, {f"p{i}" for i in range(20)})
    assert all(_index_formats(r) == {"v1"} for r in current_versions(clean_upstream))

    checkpoint, start = tmp_path / "v2.checkpoint", len(clean_upstream.requests())
    async with Relay(clean_upstream.base_url, down_after=7) as relay_base:
        assert await reencrypt(Connection(relay_base), plan, opts(page_size=4), str(checkpoint), None) == 3
    assert await reencrypt(conn, plan, opts(page_size=4), str(checkpoint), None) == 0
    written = Counter(
        r["url"] for r in clean_upstream.requests()[start:] if r["method"] == "PUT" and r["status"] == 200
    )
    assert len(written) == 20 and set(written.values()) == {1}  # each moved exactly once across both runs
    assert all(_index_formats(r) == {"v2"} for r in current_versions(clean_upstream))
