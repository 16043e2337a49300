"""Name prefix search through chains stored in the encrypted name (``search: {..., chain: true}``).

The comparison with a plaintext server and paging run in tests/test_search.py (``any_client``,
both index forms); this file checks what is stored, what a reader gets, what is refused,
and the move from token-indexed names to chains.
"""

from __future__ import annotations

import copy
import dataclasses

import orjson
import pytest

from proxy.keymgmt.keyring import Keyring
from proxy.migrate.assess import Plan, State, assess
from proxy.outcome import FhirError
from proxy.transform import guard
from proxy.transform import markers as mk
from proxy.transform.indexes import index_identifiers
from proxy.transform.namechain import CHAIN, MARK
from proxy.transform.records import ALL_GROUPS, ReadReport, decrypt_resource, encrypt_resource
from proxy.transform.search import Searcher
from tests.conftest import FHIR_JSON
from tests.test_search import PATIENTS, satusehat_chained, satusehat_tokens

BUDI = PATIENTS[1]  # family Santoso, given Budiarto


@pytest.fixture(scope="module")
def chained():
    return satusehat_chained()


def _stored(patient: dict, policy, ring: Keyring) -> dict:
    resource = copy.deepcopy(patient)
    rp = policy.resources["Patient"]
    ids = index_identifiers(resource, rp, ring.indexer)
    encrypt_resource(resource, rp, ring)
    resource["identifier"] = [*resource["identifier"], *ids]
    return resource


def _read(stored: dict, policy, ring: Keyring, grants) -> tuple[dict, ReadReport]:
    back, report = copy.deepcopy(stored), ReadReport()
    decrypt_resource(back, policy.resources["Patient"], ring, grants, policy.unenveloped, report)
    return back, report


def test_the_stored_name_holds_chains_and_no_prefix_identifiers(chained):
    ring = Keyring.generate()
    stored = _stored(BUDI, chained, ring)
    (name,) = stored["name"]
    assert CHAIN.fullmatch(name["family"]) and all(CHAIN.fullmatch(g) for g in name["given"])
    assert "Santoso" not in orjson.dumps(stored).decode() and "Budiarto" not in orjson.dumps(stored).decode()
    systems = [i["system"] for i in stored["identifier"] if i["system"].startswith(mk.INDEX_BASES)]
    # name, family and given keep one :exact token per part they read; the prefixes are in the chains
    assert sum(s.endswith(("/name/name", "/name/family", "/name/given")) for s in systems) == 4
    tokens = _stored(BUDI, satusehat_tokens(), ring)
    assert len(systems) < len([i for i in tokens["identifier"] if i["system"].startswith(mk.INDEX_BASES)]) - 15
    # a longer prefix's chain extends a shorter one's: that is what the server's string search matches
    assert name["family"].startswith(guard_chain(chained, ring, "family", "sant"))


def guard_chain(policy, ring: Keyring, param: str, value: str) -> str:
    (forwarded,) = guard.check_search("Patient", [(param, value)], Searcher(policy.resources, ring.indexer), "q")
    assert forwarded[0] == param
    return forwarded[1]


def test_readers_get_the_name_back_or_masked_never_a_chain(chained):
    ring = Keyring.generate()
    stored = _stored(BUDI, chained, ring)
    back, report = _read(stored, chained, ring, ALL_GROUPS)
    assert back["name"] == BUDI["name"] and not report.failures
    masked, _ = _read(stored, chained, ring, frozenset({"identity"}))
    assert masked["name"] == [mk.masked_form()]
    # a chain moved in from another patient changes what a search finds, never what a read returns
    other = _stored(PATIENTS[0], chained, ring)
    stored["name"][0]["family"] = other["name"][0]["family"]
    back, report = _read(stored, chained, ring, ALL_GROUPS)
    assert back["name"] == BUDI["name"] and not report.failures


def test_an_old_versions_name_replayed_into_a_new_version_never_reads_back(chained):
    """v1: the old version's ciphertext fails its record id. v2: the old stored name carries only its mark
    and chains, the value comes from this version's group; the chains (not covered by the MAC) change
    what a search finds, never what a read returns."""
    ring = Keyring.generate()
    v1 = dataclasses.replace(
        chained, resources={t: dataclasses.replace(rp, at_rest_format="v1") for t, rp in chained.resources.items()}
    )
    for writer in (v1, chained):
        old = _stored(BUDI, writer, ring)
        new = _stored({**BUDI, "name": [{"family": "Santosa", "given": ["Budiarto"]}]}, writer, ring)
        new["name"] = old["name"]  # what version 1 stored for the name, in version 2
        back, report = _read(new, chained, ring, ALL_GROUPS)
        assert "Santoso" not in orjson.dumps(back).decode()
        if writer is v1:
            assert report.failures and back["name"] == [mk.masked_form()]
        else:
            assert not report.failures and back["name"] == [{"family": "Santosa", "given": ["Budiarto"]}]


def test_chain_searches_are_checked_like_token_searches(chained):
    ring = Keyring.generate()
    everyone = Searcher(chained.resources, ring.indexer)
    billing = Searcher(chained.resources, ring.indexer, frozenset({"insurance"}))
    chain = guard_chain(chained, ring, "name", "budi")
    assert CHAIN.fullmatch(chain) and "budi" not in chain
    # a chain coming back in a paging link passes for a caller who may search names, not for another
    assert guard.check_search("Patient", [("name", chain)], everyone, "q") == [("name", chain)]
    with pytest.raises(FhirError) as refused:
        guard.check_search("Patient", [("name", chain)], billing, "q")
    assert refused.value.status == 403
    # the same through a chain on another type (Condition?patient.name=budi and its paging links)
    forwarded = [("patient:Patient.name", chain)]
    assert guard.check_search("Condition", [("patient.name", "budi")], everyone, "q") == forwarded
    assert guard.check_search("Condition", forwarded, everyone, "q") == forwarded
    with pytest.raises(FhirError) as refused:
        guard.check_search("Condition", forwarded, billing, "q")
    assert refused.value.status == 403
    for value in (MARK + "budi", f"{chain},{MARK}x", "bu"):  # not a chain, too short
        with pytest.raises(FhirError) as refused:
            guard.check_search("Patient", [("family", value)], everyone, "q")
        assert refused.value.status == 400 and value not in str(refused.value)
    # longer than a chain's 64 characters: the chain of its first 64 on the searched type (the post-filter
    # proves the whole value), refused inside a chain on another type (no post-filter sees that Patient)
    ((_, long_chain),) = guard.check_search("Patient", [("family", "x" * 65)], everyone, "q")
    assert long_chain == guard_chain(chained, ring, "family", "x" * 64)
    with pytest.raises(FhirError) as refused:
        guard.check_search("Condition", [("patient.family", "x" * 65)], everyone, "q")
    assert refused.value.status == 400
    # :exact keeps its identifier tokens (case and accents matter)
    ((param, value),) = guard.check_search("Patient", [("given:exact", "Budiarto")], everyone, "q")
    assert param == "identifier" and value.startswith(mk.INDEX_BASE)


def test_token_indexed_names_are_moved_to_chains_by_reencrypt(chained):
    ring, tokens = Keyring.generate(), satusehat_tokens()
    stored = _stored(BUDI, tokens, ring)
    assert assess(copy.deepcopy(stored), Plan(tokens, ring)).state is State.CURRENT
    moved = assess(copy.deepcopy(stored), Plan(chained, ring))
    assert moved.state is State.OLD_POLICY and CHAIN.fullmatch(moved.replacement["name"][0]["family"])
    assert assess(moved.replacement, Plan(chained, ring)).state is State.CURRENT


async def test_a_client_cannot_write_the_chain_marker(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, satusehat_chained())
    planted = {**BUDI, "name": [{"family": MARK + "a" * 20}]}
    resp = await client.put(f"/fhir/R4/Patient/{BUDI['id']}", data=orjson.dumps(planted), headers=FHIR_JSON)
    assert resp.status == 400
    assert clean_upstream.dump() == []


async def test_transactions_and_conditional_creates_use_chains(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, satusehat_chained())
    patient = {k: v for k, v in BUDI.items() if k != "id"}
    entry = {"resource": patient, "request": {"method": "POST", "url": "Patient", "ifNoneExist": "family=santoso"}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    for _ in range(2):  # the second transaction finds the first Patient through its chain
        resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
        assert resp.status == 200, await resp.text()
    (stored,) = [r for r in clean_upstream.dump() if r["resourceType"] == "Patient"]
    assert CHAIN.fullmatch(stored["name"][0]["family"])
    found = await (await client.get("/fhir/R4/Patient?family=SANT&given=budiar")).json()
    assert [e["resource"]["name"] for e in found["entry"]] == [BUDI["name"]]
    log = orjson.dumps(clean_upstream.requests()).decode().lower()
    assert "santoso" not in log and "budiar" not in log
