"""The post-filter of chained name searches: what the server returns is checked against the decrypted name.

Name chains are not covered by the record MAC, so a server can copy one patient's chain into another
record (or match "contains" rather than "starts with", or a 25-bit chunk can collide). Here the real
test upstream (Medplum) holds the SATUSEHAT patients written through the proxy with name chains, and
the server's administrator copies Budi's family chain into Sri's record: the server then finds Sri
for Budi's family name, and the proxy must take her out of the answer after decryption, whole or
streamed, and leave every other search as it is.
"""

from __future__ import annotations

import copy
import logging

import orjson
import pytest
from prometheus_client import REGISTRY

from proxy.crypto.encoding import b64d
from proxy.keymgmt.keyring import Keyring
from proxy.transform import guard
from proxy.transform.namechain import CHAIN
from proxy.transform.search import Searcher
from tests.conftest import FHIR_JSON
from tests.test_auth import bearer, issuer, jwt_proxy  # noqa: F401 (fixtures: the OpenID provider, the proxy)
from tests.test_search import PATIENTS, _direct, satusehat_chained

SRI, BUDI = PATIENTS[0], PATIENTS[1]  # Sri Rahayu Wulandari; Budiarto Santoso (and p-siti: Sri Aminah Santoso)


@pytest.fixture
async def tampered(proxy_for, clean_upstream):
    """Every patient written through the proxy; then Budi's stored family chain copied into Sri's record."""
    policy = satusehat_chained()
    writer = await proxy_for(clean_upstream.base_url, policy)
    for patient in PATIENTS:
        resp = await writer.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
    stored = {r["id"]: r for r in clean_upstream.dump()}
    siti = copy.deepcopy(stored[SRI["id"]])
    siti["name"][0]["family"] = stored[BUDI["id"]]["name"][0]["family"]
    siti.pop("meta", None)
    _direct(clean_upstream, "PUT", f"Patient/{SRI['id']}", siti)
    return policy


def _ids(bundle: dict) -> list[str]:
    return sorted(e["resource"]["id"] for e in bundle.get("entry", []))


async def _search(client, query: str) -> dict:
    resp = await client.get(f"/fhir/R4/Patient?{query}")
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_a_chain_copied_into_another_record_is_filtered_out(proxy_for, clean_upstream, tampered, keyring, caplog):
    client = await proxy_for(clean_upstream.base_url, tampered)
    forwarded = guard.check_search("Patient", [("family", "santo")], Searcher(tampered.resources, keyring.indexer), "q")
    server = _direct(clean_upstream, "GET", "Patient?" + guard.encode_query(forwarded))
    assert _ids(server) == ["p-budi", "p-siti", SRI["id"]]  # the server is fooled
    before = REGISTRY.get_sample_value("fhircrypt_name_search_removed_total") or 0.0
    with caplog.at_level(logging.WARNING, logger="fhircrypt"):
        found = await _search(client, "family=santo")
    assert _ids(found) == ["p-budi", "p-siti"]
    assert REGISTRY.get_sample_value("fhircrypt_name_search_removed_total") == before + 1
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "name-filter"]
    assert line.removed == 1 and "santo" not in str(line.__dict__).lower()  # a count, never a value
    assert "total" not in found  # the server counted Sri: a total that counts a removed entry is dropped
    assert _ids(await _search(client, "name=SANTOSO")) == ["p-budi", "p-siti"]  # name reads every part
    # several parameters are AND-ed: each is checked (Sri's given name is Sri, her family is not Santoso)
    assert _ids(await _search(client, "family=santo&given=sri")) == []
    assert _ids(await _search(client, "family=santo&given=budi")) == ["p-budi"]
    # comma values are OR-ed: Sri stays where one of them matches her decrypted name
    assert _ids(await _search(client, "family=santo,wulan")) == ["p-budi", "p-siti", SRI["id"]]
    assert _ids(await _search(client, "family=santo,harjo")) == ["p-budi", "p-budiman", "p-siti"]


async def test_a_search_the_filter_does_not_touch_keeps_the_servers_answer(proxy_for, clean_upstream, tampered):
    client = await proxy_for(clean_upstream.base_url, tampered)
    untouched = await _search(client, "family=wulan")  # Sri's own chain is gone: the server does not find her
    assert _ids(untouched) == [] and untouched.get("total") == 0
    kept = await _search(client, "given=budi")  # nothing removed: the server's total stands
    assert _ids(kept) == ["p-budi", "p-budiman"] and kept["total"] == 2
    gender = await _search(client, "gender=female")  # no chained value: no filter
    assert SRI["id"] in _ids(gender)


async def test_the_next_page_is_filtered_by_the_chains_of_its_link(proxy_for, clean_upstream, tampered):
    client = await proxy_for(clean_upstream.base_url, tampered)
    seen: list[str] = []
    page = await _search(client, "family=santo&_count=1&_sort=_id")
    for _ in range(5):
        seen += _ids(page)
        link = next((x["url"] for x in page.get("link", []) if x["relation"] == "next"), None)
        if link is None:
            break
        resp = await client.get(link.partition("/fhir/R4")[1] + link.partition("/fhir/R4")[2])
        assert resp.status == 200, await resp.text()
        page = await resp.json()
    assert seen == ["p-budi", "p-siti"]  # Sri's page (the last) comes back empty


@pytest.mark.parametrize("kind", ["batch", "transaction"])
async def test_the_searches_of_a_batch_are_filtered_each_by_its_own_names(proxy_for, clean_upstream, tampered, kind):
    client = await proxy_for(clean_upstream.base_url, tampered)
    searches = ["Patient?family=santo", "Patient?gender=female", "Patient?given=sri&family=wulan", "Patient?given=budi"]
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [{"request": {"method": "GET", "url": u}} for u in searches],
    }
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    answers = [e["resource"] for e in (await resp.json())["entry"]]
    assert _ids(answers[0]) == ["p-budi", "p-siti"] and "total" not in answers[0]  # Sri, found by the copy: out
    assert SRI["id"] in _ids(answers[1])  # no chained value: the server's answer
    assert _ids(answers[2]) == []  # the copy took Sri's own chain: the server cannot find her, nothing to add
    assert _ids(answers[3]) == ["p-budi", "p-budiman"] and answers[3]["total"] == 2  # nothing removed


async def test_a_page_link_names_the_chains_when_the_servers_link_does_not(
    proxy_for, clean_upstream, tampered, keyring
):
    """HAPI's links (``?_getpages=<handle>``) do not repeat the query: the proxy's signed link names the
    chained parameters as forwarded (chains, never names) and the page is filtered by them."""
    client = await proxy_for(clean_upstream.base_url, tampered)
    first = await _search(client, "family=santo&_count=1&_sort=_id")
    token = next(x["url"] for x in first["link"] if x["relation"] == "next").rpartition("/")[2]
    claim = orjson.loads(b64d(token.partition(".")[0]))[0]
    (named,) = orjson.loads(claim.partition(" ")[2])[5]
    assert named[0] == "family" and CHAIN.fullmatch(named[1]) and "santo" not in claim.lower()
    # a link whose upstream URL carries no name parameter, as HAPI's do: all five patients come back
    url = f"{clean_upstream.base_url}/Patient?_count=10"
    signed = orjson.dumps([None, "search", "type", "Patient", url, [named]]).decode()
    resp = await client.get(f"/fhir/R4/$fhircrypt-link/page/{keyring.link_signer.sign('page ' + signed)}")
    assert resp.status == 200, await resp.text()
    assert _ids(await resp.json()) == ["p-budi", "p-siti"]


async def test_with_real_tokens_a_physician_gets_the_filtered_answer_and_billing_is_refused(
    jwt_proxy,  # noqa: F811
    clean_upstream,
    tampered,
    issuer,  # noqa: F811
):
    """A caller without the name's group cannot search by name (403 before anything is forwarded), so no
    masked name ever has to be judged; a physician's answer is filtered."""
    client = await jwt_proxy(tampered)
    physician = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    resp = await client.get("/fhir/R4/Patient?family=santo", headers=physician)
    assert resp.status == 200 and _ids(await resp.json()) == ["p-budi", "p-siti"]
    sent = len(clean_upstream.requests())
    billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs"))
    refused = await client.get("/fhir/R4/Patient?family=santo", headers=billing)
    assert refused.status == 403 and "santo" not in (await refused.text()).lower()
    assert len(clean_upstream.requests()) == sent


async def test_a_streamed_page_is_filtered_the_same(proxy_for, clean_upstream, tampered):
    whole = await proxy_for(clean_upstream.base_url, tampered)
    streamed = await proxy_for(clean_upstream.base_url, tampered, stream_threshold=1024)
    for query in ("family=santo", "family=santo,wulan", "family=santo&given=sri", "family=santo&_count=2"):
        a, b = await _search(whole, query), await _search(streamed, query)
        assert _ids(a) == _ids(b) and a.get("total") == b.get("total")
    assert "total" not in await _search(streamed, "family=santo")
    kept = await _search(streamed, "given=budi")
    assert _ids(kept) == ["p-budi", "p-budiman"] and kept["total"] == 2


def test_included_resources_are_kept_and_a_match_without_a_mode_is_checked():
    """Medplum's router answers no ``_include``: the page is built here as a server would send it."""
    policy = satusehat_chained()
    ring = Keyring.generate()
    searcher = Searcher(policy.resources, ring.indexer)
    guard.check_search("Patient", [("family", "santo")], searcher, "query")
    query = searcher.chained.query("Patient")
    assert query is not None
    budi, sri = copy.deepcopy(BUDI), copy.deepcopy(SRI)
    organization = {"resourceType": "Organization", "id": "org-1"}
    page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 2,
        "entry": [
            {"resource": budi, "search": {"mode": "match"}},
            {"resource": sri},  # no search.mode: still a match of the searched type
            {"resource": organization, "search": {"mode": "include"}},  # included for Sri: an authorised read
        ],
    }
    assert query.filter_page(page, ring.indexer) == 1
    assert [e["resource"]["id"] for e in page["entry"]] == [BUDI["id"], "org-1"] and "total" not in page
    assert query.filter_page(page, ring.indexer) == 0 and len(page["entry"]) == 2


def test_the_filter_checks_the_folded_name_parts_each_parameter_reads():
    policy = satusehat_chained()
    ring = Keyring.generate()
    searcher = Searcher(policy.resources, ring.indexer)
    guard.check_search("Patient", [("family", "SANTÖ,wul"), ("given", "budi")], searcher, "query")
    query = searcher.chained.query("Patient")
    assert query is not None and len(query.clauses) == 2
    patient = {"resourceType": "Patient", "name": [{"family": "Santoso", "given": ["Budiarto"]}]}
    assert query.matches(patient, ring.indexer)
    assert not query.matches({**patient, "name": [{"family": "Budiarto", "given": ["Santoso"]}]}, ring.indexer)
    assert not query.matches({**patient, "name": [{"text": "Santoso Budiarto"}]}, ring.indexer)
    assert not query.matches({"resourceType": "Patient"}, ring.indexer)  # a masked or missing name never matches
    # a chain (as a paging link carries it) is checked by the chains of the decrypted parts
    chained = Searcher(policy.resources, ring.indexer)
    chain = guard.check_search("Patient", [("name", "budiar")], Searcher(policy.resources, ring.indexer), "q")[0][1]
    guard.check_search("Patient", [("name", chain)], chained, "query")
    by_chain = chained.chained.query("Patient")
    assert by_chain is not None and by_chain.matches(patient, ring.indexer)
    assert not by_chain.matches({**patient, "name": [{"family": "Budiman"}]}, ring.indexer)
    # no chained value in the query: nothing to filter
    plain = Searcher(policy.resources, ring.indexer)
    guard.check_search("Patient", [("gender", "male"), ("given:exact", "Budiarto")], plain, "query")
    assert plain.chained.query("Patient") is None
