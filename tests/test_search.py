"""Search on encrypted elements through blind indexes, compared with the same server holding plaintext.

The same patients are stored twice: once in plaintext straight at the upstream, once
through the proxy. Every supported query must return the same resources both ways, and
in the encrypted run the upstream must never receive a searched value.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import urllib.parse
import urllib.request

import orjson
import pytest

from proxy.keymgmt.keyring import Keyring
from proxy.migrate.assess import Plan, State, assess
from proxy.policy.compiler import CompiledPolicy, compile_text
from proxy.transform.indexes import spec_texts
from proxy.transform.markers import ENVELOPE_URL, INDEX_BASE, INDEX_BASES, index_system
from proxy.transform.namechain import CHAIN
from tests.conftest import DEPLOYMENT, FHIR_JSON, PUBLIC_BASE, ROOT, assert_no_plaintext, leaked
from tests.upstream_server import UpstreamServer

NIK = "https://fhir.kemkes.go.id/id/nik"
BPJS = "https://fhir.example-hospital.id/id/bpjs"
IHS = "https://fhir.kemkes.go.id/id/ihs-number"


def _patient(pid, nik, bpjs, family, given, birth, phone, email, gender="female"):
    return {
        "resourceType": "Patient",
        "id": pid,
        "gender": gender,
        "birthDate": birth,
        "identifier": [
            {"system": NIK, "value": nik},
            {"system": BPJS, "value": bpjs},
            {"system": IHS, "value": f"P{nik[-8:]}"},
        ],
        "name": [{"use": "official", "family": family, "given": given}],
        "telecom": [{"system": "phone", "value": phone}, {"system": "email", "value": email}],
    }


PATIENTS = [
    _patient(
        "p-sri",
        "3174015507880001",
        "0001122334401",
        "Wulandari",
        ["Sri", "Rahayu"],
        "1988-07-15",
        "081311112222",
        "sri.w@contoh.id",
    ),
    _patient(
        "p-budi",
        "3273012903870002",
        "0001122334402",
        "Santoso",
        ["Budiarto"],
        "1987-03-29",
        "081233334444",
        "budi@contoh.id",
        "male",
    ),
    _patient(
        "p-budiman",
        "3273011204870003",
        "0001122334403",
        "Harjono",
        ["Budiman"],
        "1987-04-12",
        "081255556666",
        "budiman@contoh.id",
        "male",
    ),
    _patient(
        "p-siti",
        "3578016001900004",
        "0001122334404",
        "Santoso",
        ["Siti", "Aminah"],
        "1990-01-20",
        "081277778888",
        "siti.a@contoh.id",
    ),
    _patient(
        "p-agus",
        "6171010505650005",
        "0001122334405",
        "Pratama",
        ["Agus"],
        "1965-05-05",
        "085699990000",
        "agus.p@contoh.id",
        "male",
    ),
]
SECRETS = [
    v
    for p in PATIENTS
    for v in (
        p["identifier"][0]["value"],
        p["identifier"][1]["value"],
        p["name"][0]["family"],
        p["birthDate"],
        p["telecom"][0]["value"],
        p["telecom"][1]["value"],
        *p["name"][0]["given"],
    )
]


QUERIES = [
    f"identifier={NIK}|3273012903870002",
    "identifier=3273012903870002",
    f"identifier={NIK}|3273012903870002,{NIK}|3578016001900004",
    f"identifier={NIK}|3273012903870002&identifier={BPJS}|0001122334402",
    f"identifier={NIK}|3273012903870002&identifier={BPJS}|0001122334403",
    f"identifier={BPJS}|0001122334405",
    f"identifier={IHS}|P01900004",
    "name=budi",
    "name=BUDI",
    "name=santoso",
    "name=wulan",
    "name=budi,siti",
    "name=santoso&name=siti",
    "family=santoso",
    "family=budi",
    "given=budi",
    "given=rahayu",
    "birthdate=1987-03-29",
    "birthdate=eq1990-01-20",
    "birthdate=1987",
    "phone=081233334444",
    "email=siti.a@contoh.id",
    "telecom=phone|085699990000",
    "telecom=085699990000",
    "name=budi&birthdate=1987",
    "name=budi&gender=male",
    "gender=female",
    "name=budi&_count=1",
    "name:exact=Budiarto",
    "given:exact=Sri,Siti",
    "identifier=0000000000000000",
    f"identifier={BPJS}|",
    f"identifier={NIK}|",
    f"identifier={NIK}|,{BPJS}|0001122334405",
]


def _direct(upstream, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"{upstream.base_url}/{path}",
        method=method,
        data=orjson.dumps(body) if body is not None else None,
        headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
    )
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read() or b"{}")


def _ids(bundle: dict) -> list[str]:
    return sorted(e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") != "include")


@pytest.fixture
async def client(proxy_for, clean_upstream, satusehat):
    return await proxy_for(clean_upstream.base_url, satusehat)


_CHAINED_NAMES = "search: {params: [name, family, given], prefix: 3, chain: true}"


def satusehat_chained() -> CompiledPolicy:
    """The shipped SATUSEHAT policy, whose name prefixes are chains in the name (search.chain)."""
    text = (ROOT / "policies" / "satusehat.yaml").read_text()
    assert _CHAINED_NAMES in text
    return compile_text(text, "satusehat.yaml", DEPLOYMENT)


def satusehat_tokens() -> CompiledPolicy:
    """The shipped SATUSEHAT policy with name prefixes as index identifier tokens (what it shipped before
    chains, and what deployments that have not re-encrypted still hold)."""
    text = (ROOT / "policies" / "satusehat.yaml").read_text()
    assert _CHAINED_NAMES in text
    return compile_text(text.replace(", chain: true}", "}"), "satusehat-tokens.yaml", DEPLOYMENT)


def satusehat_server_systems() -> CompiledPolicy:
    """The shipped SATUSEHAT policy with system-only identifier searches answered by the server from the
    clear system (defaults.identifier_system_search: server): no ``S|*`` token for a system spelled as listed."""
    text = (ROOT / "policies" / "satusehat.yaml").read_text()
    old = "\ndefaults:\n"
    assert old in text
    return compile_text(
        text.replace(old, old + "  identifier_system_search: server\n"), "satusehat-server-systems.yaml", DEPLOYMENT
    )


@pytest.fixture(params=["tokens", "chain", "server-systems"])
async def any_client(request, proxy_for, clean_upstream, satusehat):
    """The proxy with names indexed by identifier tokens, with name chains, and with system-only
    identifier searches answered from the clear system."""
    policies = {"tokens": satusehat_tokens(), "chain": satusehat, "server-systems": satusehat_server_systems()}
    return await proxy_for(clean_upstream.base_url, policies[request.param])


async def test_search_results_match_a_plaintext_server_and_values_never_reach_it(any_client, clean_upstream):
    client = any_client
    for patient in PATIENTS:
        _direct(clean_upstream, "PUT", f"Patient/{patient['id']}", patient)
    expected = {q: (_ids(b := _direct(clean_upstream, "GET", f"Patient?{q}")), b.get("total")) for q in QUERIES}
    assert expected["name=budi"][0] == ["p-budi", "p-budiman"]  # the plaintext server works as assumed
    assert sum(1 for ids, _ in expected.values() if ids) >= len(QUERIES) - 3  # the suite is not vacuous

    clean_upstream.reset()
    for patient in PATIENTS:
        resp = await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
    for query in QUERIES:
        resp = await client.get(f"/fhir/R4/Patient?{query}")
        assert resp.status == 200, (query, await resp.text())
        bundle = await resp.json()
        assert (_ids(bundle), bundle.get("total")) == expected[query], query
        for entry in bundle.get("entry", []):
            original = next(p for p in PATIENTS if p["id"] == entry["resource"]["id"])
            assert entry["resource"]["identifier"] == original["identifier"]  # decrypted, indexes stripped
    log = orjson.dumps(clean_upstream.requests()).decode()
    assert not leaked(SECRETS, log)
    assert not leaked(SECRETS, orjson.dumps(clean_upstream.dump()).decode())


async def test_a_mix_of_format_v1_and_v2_records_is_searched_and_read_like_plaintext(
    proxy_for, clean_upstream, satusehat
):
    """What earlier versions wrote (at-rest format v1) and what this one writes (v2), side by side in one
    server: every query finds the ids and totals a plaintext server finds, and every match reads back."""
    for patient in PATIENTS:
        _direct(clean_upstream, "PUT", f"Patient/{patient['id']}", patient)
    expected = {q: (_ids(b := _direct(clean_upstream, "GET", f"Patient?{q}")), b.get("total")) for q in QUERIES}

    clean_upstream.reset()
    v1 = dataclasses.replace(
        satusehat, resources={t: dataclasses.replace(rp, at_rest_format="v1") for t, rp in satusehat.resources.items()}
    )
    writers = [await proxy_for(clean_upstream.base_url, v1), await proxy_for(clean_upstream.base_url, satusehat)]
    for i, patient in enumerate(PATIENTS):
        url = f"/fhir/R4/Patient/{patient['id']}"
        resp = await writers[i % 2].put(url, data=orjson.dumps(patient), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
    envelopes = [
        e["valueString"][:2] for r in clean_upstream.dump() for e in r["extension"] if e["url"] == ENVELOPE_URL
    ]
    assert sorted(envelopes) == sorted("v1" if i % 2 == 0 else "v2" for i in range(len(PATIENTS)))
    reader = writers[1]
    for query in QUERIES:
        bundle = await (await reader.get(f"/fhir/R4/Patient?{query}")).json()
        assert (_ids(bundle), bundle.get("total")) == expected[query], query
        for entry in bundle.get("entry", []):
            original = next(p for p in PATIENTS if p["id"] == entry["resource"]["id"])
            assert {k: v for k, v in entry["resource"].items() if k != "meta"} == original, query
    assert not leaked(SECRETS, orjson.dumps(clean_upstream.dump()).decode())


SYSTEM_QUERIES = [
    f"identifier={NIK}|",
    f"identifier={NIK.upper()}|",
    f"identifier={NIK}|,{BPJS}|0001122334405",
    f"identifier={NIK}|&identifier={BPJS}|",
    f"identifier={NIK}|&name=santoso",
]


def _spelled(patient: dict, nik_system: str) -> dict:
    return {**patient, "identifier": [{**patient["identifier"][0], "system": nik_system}, *patient["identifier"][1:]]}


def _index_tokens(resource: dict) -> set[str]:
    return {f"{i['system']}|{i['value']}" for i in resource["identifier"] if i["system"].startswith(INDEX_BASES)}


def _with_every_system_token(stored: dict, plain: dict, policy: CompiledPolicy, ring: Keyring) -> dict:
    """``stored`` with the index identifiers fhircrypt wrote before system-only searches went to the clear
    system: an ``S|*`` token for every encrypted identifier value."""
    rp = policy.resources["Patient"]
    own = [i for i in stored["identifier"] if not i["system"].startswith(INDEX_BASES)]
    texts = {spec.label: texts for spec, texts in spec_texts(plain, rp) if spec.v2_via is None}  # no name chains
    tokens = [{"system": index_system(k), "value": t} for k, v in texts.items() for t in ring.indexer.tokens_v2(k, v)]
    return {**stored, "identifier": own + tokens}


async def test_system_only_identifier_search_finds_new_old_and_otherwise_spelled_identifiers(
    proxy_for, clean_upstream, keyring
):
    """With identifier_system_search: server, ``identifier=S|`` goes to the server as it is, OR-ed with the
    ``S|*`` tokens: identifiers written now (no token), written before (token) and under another spelling of
    S (token) are all found, with the ids and totals of the plaintext server."""
    policy = satusehat_server_systems()
    client = await proxy_for(clean_upstream.base_url, policy)
    # p-siti spells the NIK system in capitals: the same system to the proxy, and to Medplum's token search
    patients = [*PATIENTS[:3], _spelled(PATIENTS[3], NIK.upper())]
    for patient in patients:
        _direct(clean_upstream, "PUT", f"Patient/{patient['id']}", patient)
    expected = {q: (_ids(b := _direct(clean_upstream, "GET", f"Patient?{q}")), b.get("total")) for q in SYSTEM_QUERIES}
    assert expected[f"identifier={NIK}|"][0] == ["p-budi", "p-budiman", "p-siti", "p-sri"]

    clean_upstream.reset()
    for patient in patients:
        resp = await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
        assert resp.status == 201, await resp.text()
    stored = {r["id"]: r for r in clean_upstream.dump()}
    label = "Patient/nik/identifier"
    nik_all = f"{index_system(label)}|{keyring.indexer.tokens_v2(label, [f'{NIK}|*'])[0]}"
    assert {pid for pid, r in stored.items() if nik_all in _index_tokens(r)} == {"p-siti"}  # the other spelling
    old = _with_every_system_token(stored["p-budi"], PATIENTS[1], policy, keyring)  # as written before
    assert nik_all in _index_tokens(old)
    # fhircrypt reencrypt finds the old token set stale for this policy, and the new one current
    assert assess(copy.deepcopy(old), Plan(policy, keyring)).state is State.OLD_POLICY
    assert assess(copy.deepcopy(stored["p-budi"]), Plan(policy, keyring)).state is State.CURRENT
    _direct(clean_upstream, "PUT", "Patient/p-budi", old)
    for query in SYSTEM_QUERIES:
        resp = await client.get(f"/fhir/R4/Patient?{query}")
        assert resp.status == 200, (query, await resp.text())
        bundle = await resp.json()
        assert (_ids(bundle), bundle.get("total")) == expected[query], query
    # a trailing slash is the NIK system to the proxy but not to the server: only the S|* token finds it
    slashed = _spelled(PATIENTS[4], NIK + "/")
    await client.put("/fhir/R4/Patient/p-agus", data=orjson.dumps(slashed), headers=FHIR_JSON)
    assert "p-agus" not in _ids(_direct(clean_upstream, "GET", f"Patient?identifier={NIK}|"))
    found = await (await client.get(f"/fhir/R4/Patient?identifier={NIK}|")).json()
    assert _ids(found) == ["p-agus", "p-budi", "p-budiman", "p-siti", "p-sri"]
    assert not leaked(SECRETS, orjson.dumps(clean_upstream.requests()).decode())


async def test_which_servers_match_a_system_only_search_on_an_identifier_without_a_value(proxy_for, clean_server):
    """What identifier_system_search: server relies on, checked on the stored form: Medplum matches
    ``identifier=S|`` on an identifier whose value is sealed (absent, ``_value`` with extensions only);
    HAPI's JPA server indexes no token for it, so there the default ``index`` (an ``S|*`` token) is needed."""
    client = await proxy_for(clean_server.base_url, satusehat_server_systems(), upstream_timeout=120.0)
    patient = {k: v for k, v in PATIENTS[0].items() if k != "id"}
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)).json()
    (stored,) = clean_server.dump()
    nik = next(i for i in stored["identifier"] if i["system"] == NIK)
    assert "value" not in nik and nik["_value"]["extension"]
    query = f"Patient?identifier={urllib.parse.quote(NIK, safe='')}%7C"
    matched = _ids(_direct(clean_server, "GET", query)) == [created["id"]]
    assert matched is isinstance(clean_server, UpstreamServer)  # Medplum: yes; HAPI: no
    found = _ids(await (await client.get(f"/fhir/R4/{query}")).json())
    assert found == ([created["id"]] if matched else [])


async def test_paging_links_come_back_through_the_proxy(any_client, clean_upstream):
    client = any_client
    for patient in PATIENTS:
        await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
    first = await (await client.get("/fhir/R4/Patient?name=budi&_count=1")).json()
    nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
    assert nxt.startswith(PUBLIC_BASE)
    second = await (await client.get(nxt[len("http://proxy.test") :])).json()
    assert sorted(_ids(first) + _ids(second)) == ["p-budi", "p-budiman"]


def _not_sent(server, values: list[str]) -> None:
    """No value is in anything the upstream stores nor, where it logs them (Medplum), in any request."""
    assert_no_plaintext(server.dump(), values)
    if isinstance(server, UpstreamServer):
        assert not leaked(values, orjson.dumps(server.requests()).decode())


async def test_if_none_exist_by_nik_prevents_duplicate_registration(either_client, clean_server):
    patient = {k: v for k, v in PATIENTS[1].items() if k != "id"}
    header = {"If-None-Exist": f"identifier={NIK}|3273012903870002"}
    first = await either_client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON | header)
    second = await either_client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON | header)
    assert (first.status, second.status) == (201, 200), await second.text()
    assert first.headers["Location"].startswith(f"{PUBLIC_BASE}/Patient/")  # the upstream's base rewritten
    assert (await first.json())["id"] == (await second.json())["id"]
    assert [r["resourceType"] for r in clean_server.dump()] == ["Patient"]
    _not_sent(clean_server, ["3273012903870002"])


async def test_conditional_update_and_delete_by_nik(either_client, clean_server):
    patient = {k: v for k, v in PATIENTS[0].items() if k != "id"}
    resp = await either_client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)
    created = await resp.json()
    query = urllib.parse.quote(f"{NIK}|3174015507880001", safe="")
    moved = {**patient, "birthDate": "1988-07-16"}
    resp = await either_client.put(f"/fhir/R4/Patient?identifier={query}", data=orjson.dumps(moved), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["id"] == created["id"]
    found = await (await either_client.get("/fhir/R4/Patient?birthdate=1988-07-16")).json()
    assert _ids(found) == [created["id"]]
    assert (await either_client.get("/fhir/R4/Patient?birthdate=1988-07-15")).status == 200
    assert (await either_client.delete(f"/fhir/R4/Patient?identifier={query}")).status in (200, 204)
    assert (await either_client.get(f"/fhir/R4/Patient/{created['id']}")).status == 410
    _not_sent(clean_server, [*SECRETS, "1988-07-16"])


async def test_accent_and_case_insensitive_names(client, clean_upstream):
    patient = {"resourceType": "Patient", "name": [{"family": "Nurmalasari", "given": ["Réné"]}]}
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)).json()
    for query in ("given=rene", "given=RÉNÉ", "name=NURMAL"):
        assert _ids(await (await client.get(f"/fhir/R4/Patient?{query}")).json()) == [created["id"]], query


REFUSED = [
    ("name=bu", "needs at least 3 characters"),
    ("birthdate=ge1980-01-01", "exact day"),
    ("birthdate=1987-03", "exact day"),
    ("name:contains=udi", ":contains"),
    ("family:missing=true", ":missing"),
    ("address-city=Bandung", "without a blind index"),
    ("identifier=|3273012903870002", "no system"),
    ("identifier=https://fhircrypt.dev/fhir/blind-index/Patient/nik/identifier|3273012903870002", "reserved"),
    ("_sort=family", "_sort"),
    ("_text=Santoso", "_text"),
    (f"general-practitioner.identifier={NIK}|3273012903870002", "without a blind index"),
    ("organization.partof.name=RS", "more than one level"),
    ("_has:Condition:subject:_has:Observation:patient:code=x", "single-level"),
    ("_has:Observation:specimen:code=x", "no reference from Observation to Patient"),
]


@pytest.mark.parametrize(("query", "phrase"), REFUSED)
async def test_searches_a_blind_index_cannot_answer_are_refused(client, clean_upstream, query, phrase):
    resp = await client.get(f"/fhir/R4/Patient?{query}")
    assert resp.status == 400, await resp.text()
    assert phrase in (await resp.json())["issue"][0]["diagnostics"]
    assert clean_upstream.requests() == []


async def test_post_search_form_is_rewritten_too(client, clean_upstream):
    for patient in PATIENTS:
        await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
    resp = await client.post(
        "/fhir/R4/Patient/_search",
        data=f"identifier={NIK}|3578016001900004",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 200
    assert _ids(await resp.json()) == ["p-siti"]
    assert "3578016001900004" not in orjson.dumps(clean_upstream.requests()).decode()


async def test_condition_code_search(client, clean_upstream):
    condition = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/p-budi"},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "D50.9"}]},
    }
    created = await (await client.post("/fhir/R4/Condition", data=orjson.dumps(condition), headers=FHIR_JSON)).json()
    for query in ("code=http://hl7.org/fhir/sid/icd-10|D50.9", "code=D50.9", "code=http://hl7.org/fhir/sid/icd-10|"):
        assert _ids(await (await client.get(f"/fhir/R4/Condition?{query}")).json()) == [created["id"]], query
    assert _ids(await (await client.get("/fhir/R4/Condition?code=E11")).json()) == []
    assert "D50.9" not in orjson.dumps(clean_upstream.requests()).decode()


async def test_chained_and_reverse_chained_parameters_are_rewritten_on_the_target_type(client, clean_upstream):
    """Medplum's in-memory repository answers chains and _has with empty results, so this test checks
    what reaches the upstream: the inner parameter rewritten to tokens that the target resource holds."""
    for patient in PATIENTS:
        await client.put(f"/fhir/R4/Patient/{patient['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
    budi = next(r for r in clean_upstream.dump() if r["id"] == "p-budi")
    budi_tokens = {f"{i['system']}|{i['value']}" for i in budi["identifier"] if i["system"].startswith(INDEX_BASES)}
    assert budi_tokens and all(t.startswith(INDEX_BASE) for t in budi_tokens)  # written in index format v2
    cases = {
        f"Condition?subject:Patient.identifier={NIK}|3273012903870002": "subject:Patient.identifier",
        "Condition?patient.name=budiarto": "patient:Patient.name",  # a chain: names are chained (search.chain)
        "Patient?_has:Condition:subject:code=D50.9": "_has:Condition:subject:identifier",
    }
    for query, forwarded_name in cases.items():
        clean_upstream.reset()
        resp = await client.get(f"/fhir/R4/{query}")
        assert resp.status == 200, (query, await resp.text())
        (request,) = clean_upstream.requests()
        params = urllib.parse.parse_qsl(urllib.parse.urlsplit(request["url"]).query)
        assert [name for name, _ in params] == [forwarded_name], query
        if forwarded_name.endswith("Patient.identifier"):
            sent = params[0][1].split(",")
            v2 = {t for t in sent if t.startswith(INDEX_BASE)}
            assert v2 and v2 <= budi_tokens, query  # the stored v2 tokens, each OR-ed with its v1 twin
            assert len(v2) * 2 == len(sent) and all(t.startswith(INDEX_BASES) for t in sent), query
        elif forwarded_name.endswith("Patient.name"):  # the chain of "budiarto", a prefix of Budi's stored given
            (given,) = budi["name"][0]["given"]
            assert CHAIN.fullmatch(params[0][1]) and given.startswith(params[0][1]), query
        assert not [s for s in ("3273012903870002", "budiarto", "D50.9") if s in request["url"]]
    resp = await client.get("/fhir/R4/Encounter?subject.name=budi")  # subject: Group or Patient
    assert resp.status == 400 and "name the target type" in (await resp.json())["issue"][0]["diagnostics"]


async def test_exact_follows_the_fhir_specification_case_and_accents_matter(client, clean_upstream):
    """R4 :exact matches whole values, case- and accent-sensitive. Medplum's in-memory :exact ignores
    case and matches prefixes, so these queries are not in the comparison suite; the proxy follows
    the specification."""
    patient = {"resourceType": "Patient", "name": [{"family": "Nurmalasari", "given": ["Réné"]}]}
    created = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)).json()
    assert _ids(await (await client.get("/fhir/R4/Patient?given:exact=Réné")).json()) == [created["id"]]
    for query in ("given:exact=rene", "given:exact=Rene", "given:exact=réné", "family:exact=Nurmala"):
        assert _ids(await (await client.get(f"/fhir/R4/Patient?{query}")).json()) == [], query
