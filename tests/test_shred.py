"""Crypto-shredding: per-patient keys, the patient key stores (SQLite and PostgreSQL), the
``fhircrypt shred`` command with its legal-hold list, and shredded reads through the proxy."""

from __future__ import annotations

import copy
import os
import uuid
from datetime import UTC, date, datetime, timedelta

import aiohttp
import orjson
import pytest

from proxy.cli import main
from proxy.keymgmt.keyring import Keyring, save_keyring
from proxy.keymgmt.patientkeys import (
    KeyShredded,
    PatientKeyCache,
    PatientKeyError,
    ReadKeys,
    is_handle,
    new_handle,
    open_patient_key,
    patient_tag,
    seal_patient_key,
)
from proxy.keymgmt.providers.local import LocalKeyProvider
from proxy.keystore import open_store
from proxy.keystore.base import Hold, LegalHoldActive, PatientShredded, StoredKey, now
from proxy.policy.explain import explain
from proxy.policy.loader import PolicyError
from proxy.transform import markers as mk
from proxy.transform.keyselect import PENDING, key_subject, write_subjects
from tests.conftest import FHIR_JSON, TEST_POLICY, assert_no_plaintext, unit_policy
from tests.postgres_server import PostgresServer

POLICY = unit_policy(TEST_POLICY + "keys: {per_patient: true}\n")
NIK_A, NIK_B = "3201019988770001", "3201019988770002"
NEEDLES_A = [NIK_A, "Wibisono", "Kartasasmita", "9.87", "12.34", "anemia ringan qqq"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def postgres():
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request, tmp_path):
    """A fresh, empty patient key store of each kind (PostgreSQL: a new database per test)."""
    if request.param == "sqlite":
        return str(tmp_path / "patient-keys.db")
    import psycopg

    server = request.getfixturevalue("postgres")
    name = "t_" + uuid.uuid4().hex
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.url.replace("@/postgres?", f"@/{name}?")


@pytest.fixture
def store(store_location):
    s = open_store(store_location)
    yield s
    s.close()


@pytest.fixture
def keyring_files(tmp_path, keyring):
    """The session keyring saved to a file, for the CLI (the proxy uses the same keys in memory)."""
    kek = os.urandom(32)
    (tmp_path / "kek.bin").write_bytes(kek)
    save_keyring(tmp_path / "keyring.json", keyring, LocalKeyProvider(kek))
    return ["--keyring", str(tmp_path / "keyring.json"), "--kek-file", str(tmp_path / "kek.bin")]


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ---------------------------------------------------------------- pure parts


def test_policy_option_compiles_and_is_checked():
    assert POLICY.per_patient_keys and not unit_policy().per_patient_keys
    assert "the patient's own key" in explain(POLICY) and "the patient's own key" not in explain(unit_policy())
    with pytest.raises(PolicyError, match="per_patient: must be true or false"):
        unit_policy(TEST_POLICY + "keys: {per_patient: yes-please}\n")
    with pytest.raises(PolicyError, match="unknown field in keys"):
        unit_policy(TEST_POLICY + "keys: {per_patent: true}\n")


def test_key_subject_follows_the_patient_compartment():
    assert key_subject({"resourceType": "Patient", "id": "a1"}) == "a1"
    assert key_subject({"resourceType": "Patient"}) == PENDING  # the server assigns the id
    obs = {"resourceType": "Observation", "subject": {"reference": "Patient/a1"}}
    assert key_subject(obs) == "a1"
    both = obs | {"performer": [{"reference": "Patient/b2"}]}
    assert key_subject(both) is None  # two patients: the master key (documented)
    assert key_subject({"resourceType": "Observation", "subject": {"reference": "Group/g"}}) is None
    assert key_subject({"resourceType": "Medication"}) is None
    contained = obs | {"contained": [{"resourceType": "Observation", "subject": {"reference": "Patient/c3"}}]}
    assert write_subjects(contained, {"Observation"}) == {"a1", "c3"}
    assert write_subjects(contained, {"Patient"}) == set()  # uncovered types are not encrypted: no key


def test_patient_key_sealing_binds_handle_and_tag(keyring):
    handle, key = new_handle(), os.urandom(32)
    assert is_handle(handle) and not is_handle("k1")
    tag = patient_tag(keyring, "a1")
    assert len(tag) == 32 and tag != patient_tag(keyring, "a2") and tag == patient_tag(keyring, "a1")
    kid, sealed = seal_patient_key(keyring, handle, tag, key)
    assert open_patient_key(keyring, handle, tag, kid, sealed) == key
    with pytest.raises(PatientKeyError, match="does not open"):
        open_patient_key(keyring, handle, patient_tag(keyring, "a2"), kid, sealed)  # moved to another patient
    with pytest.raises(PatientKeyError, match="does not open"):
        open_patient_key(Keyring.generate(), handle, tag, kid, sealed)
    assert key.hex() not in repr(StoredKey(handle, tag, kid, sealed))


def test_cache_is_bounded_in_size_and_age(keyring, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("proxy.keymgmt.patientkeys.time.monotonic", lambda: clock[0])
    cache = PatientKeyCache(max_entries=2, ttl=60)
    a, b, c = new_handle(), new_handle(), new_handle()
    cache.put(a, b"A" * 32, "tag-a")
    cache.put(b, b"B" * 32)
    cache.put(c, b"C" * 32)
    assert cache.get(a) is None and cache.get(b) == b"B" * 32  # the oldest went
    clock[0] += 61
    assert cache.get(b) is None and cache.missing({b, c}) == {b, c}  # older than the shred bound
    cache.mark_shredded(c)
    keys = ReadKeys(keyring, cache)
    with pytest.raises(KeyShredded):
        keys.master_key(c)
    assert keys.master_key(keyring.primary_id) == keyring.primary()[1]
    assert "B" * 8 not in repr(cache) + repr(keys)


# ---------------------------------------------------------------- the stores (SQLite and PostgreSQL)


def _key(keyring, pid: str | None) -> StoredKey:
    handle = new_handle()
    tag = patient_tag(keyring, pid) if pid else None
    return StoredKey(handle, tag, *seal_patient_key(keyring, handle, tag, os.urandom(32)))


def test_store_keys_shred_and_tombstones(store, keyring):
    first, second, other = _key(keyring, "a1"), _key(keyring, "a1"), _key(keyring, "b2")
    for k in (first, second, other):
        store.add_key(k)
    tag = first.tag
    assert store.key_for_patient(tag).handle in (first.handle, second.handle)
    found, gone = store.lookup({first.handle, other.handle, new_handle()})
    assert sorted(found, key=lambda k: k.handle) == sorted([first, other], key=lambda k: k.handle) and gone == set()

    stone = store.shred(tag, "dpo", "erasure-request")
    assert (stone.keys_destroyed, stone.shredded_by, stone.reason) == (2, "dpo", "erasure-request")
    found, shredded = store.lookup({first.handle, second.handle, other.handle})
    assert [k.handle for k in found] == [other.handle] and shredded == {first.handle, second.handle}
    assert store.shred(tag, "someone-else", "again") == stone  # idempotent: the first tombstone stays
    with pytest.raises(PatientShredded):
        store.key_for_patient(tag)
    with pytest.raises(PatientShredded):
        store.add_key(_key(keyring, "a1"))  # nothing new for a shredded patient
    assert store.tombstone(other.tag) is None


def test_store_binds_keys_of_patients_created_without_an_id(store, keyring):
    pending = _key(keyring, None)
    store.add_key(pending)
    tag = patient_tag(keyring, "new-1")
    assert store.key_for_patient(tag) is None and store.unbound() == 1
    assert store.bind(pending.handle, tag, "k1", "resealed")
    assert store.unbound() == 0
    assert not store.bind(pending.handle, tag, "k1", "again")  # bound once
    assert store.key_for_patient(tag).handle == pending.handle


def test_store_legal_hold_refuses_shredding_until_it_ends(store, keyring):
    tag = patient_tag(keyring, "held")
    store.add_key(_key(keyring, "held"))
    until = (datetime.now(UTC).date() + timedelta(days=365 * 25)).isoformat()
    store.add_hold(Hold(tag, "sealed", until, "retention", "records-office", now()))
    with pytest.raises(LegalHoldActive) as refused:
        store.shred(tag, "dpo", "erasure-request")
    assert refused.value.hold.until == until
    assert store.key_for_patient(tag) is not None  # nothing was destroyed
    after = date.fromisoformat(until) + timedelta(days=1)
    assert store.shred(tag, "dpo", "retention-expired", today=after).keys_destroyed == 1
    assert [h.tag for h in store.holds()] == [tag]
    assert store.remove_hold(tag) and store.holds() == []


# ---------------------------------------------------------------- through the proxy


def _patient(nik: str, name: str) -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.kemkes.go.id/id/nik", "value": nik}],
        "name": [{"text": name, "family": name.split()[-1]}],
        "gender": "female",
    }


def _observation(pid: str, value: float, note: str) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "Hemoglobin"},
        "subject": {"reference": f"Patient/{pid}"},
        "valueQuantity": {"value": value, "unit": "g/dL"},
        "note": [{"text": note}],
    }


async def _create(client, resource: dict) -> dict:
    resp = await client.post(f"/fhir/R4/{resource['resourceType']}", data=orjson.dumps(resource), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    return await resp.json()


def _handle(stored: dict) -> str:
    envelope = next(e["valueString"] for e in stored["extension"] if e["url"] == mk.ENVELOPE_URL)
    return envelope.split(".")[1]


def _assert_shredded(resource: dict) -> None:
    text = orjson.dumps(resource).decode()
    assert mk.CIPHERTEXT_URL not in text and mk.ENVELOPE_URL not in text
    assert {"system": mk.TAG_SYSTEM, "code": "shredded"}.items() <= resource["meta"]["tag"][-1].items()
    assert any(s["code"] == "MASKED" for s in resource["meta"]["security"])


async def test_shredding_a_patient_through_the_proxy(
    proxy_for, clean_upstream, keyring, keyring_files, store_location, capsys, monkeypatch
):
    clock = [1000.0]  # the cache's clock, so the replica bound is checked without waiting
    monkeypatch.setattr("proxy.keymgmt.patientkeys.time.monotonic", lambda: clock[0])
    client = await proxy_for(clean_upstream.base_url, POLICY, patient_key_store=store_location)
    a = await _create(client, _patient(NIK_A, "Wibisono Kartasasmita"))  # the server assigns the id
    b = await _create(client, _patient(NIK_B, "Sri Rahayu"))
    obs_a = await _create(client, _observation(a["id"], 9.87, "anemia ringan qqq"))
    changed = copy.deepcopy(obs_a) | {"valueQuantity": {"value": 12.34, "unit": "g/dL"}}
    resp = await client.put(f"/fhir/R4/Observation/{obs_a['id']}", data=orjson.dumps(changed), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    obs_b = await _create(client, _observation(b["id"], 14.5, "normal"))

    # at rest: each patient's records under that patient's own random handle, no plaintext
    stored = {(r["resourceType"], r["id"], r["meta"]["versionId"]): r for r in clean_upstream.dump()}
    handles_a = {_handle(r) for (t, i, _), r in stored.items() if i in (a["id"], obs_a["id"])}
    handles_b = {_handle(r) for (t, i, _), r in stored.items() if i in (b["id"], obs_b["id"])}
    assert len(handles_a) == 1 and len(handles_b) == 1 and handles_a != handles_b
    assert all(is_handle(h) and a["id"] not in h for h in handles_a)
    assert_no_plaintext(stored.values(), NEEDLES_A)
    read = await (await client.get(f"/fhir/R4/Patient/{a['id']}")).json()
    assert read["name"][0]["text"] == "Wibisono Kartasasmita"
    backup = clean_upstream.dump()  # every version, as a database backup holds them

    # a legal hold refuses the shred; after removing it, the shred goes through
    until = (datetime.now(UTC).date() + timedelta(days=365 * 25)).isoformat()
    store_args = ["--patient-key-store", store_location, *keyring_files]
    code, out, _ = cli(
        ["shred", "hold", "add", f"Patient/{a['id']}", "--until", until, "--reason", "uu-retention", *store_args],
        capsys,
    )
    assert code == 0 and until in out
    code, out, _ = cli(["shred", "hold", "list", *store_args], capsys)
    assert f"Patient/{a['id']}  until {until}  reason uu-retention" in out
    code, _, err = cli(["shred", f"Patient/{a['id']}", "--reason", "erasure-request", *store_args], capsys)
    assert code == 3 and "legal hold" in err and until in err
    assert (await client.get(f"/fhir/R4/Patient/{a['id']}")).headers.get("X-Fhircrypt-Shredded") is None
    code, _, _ = cli(["shred", "hold", "remove", f"Patient/{a['id']}", *store_args], capsys)
    assert code == 0
    code, out, _ = cli(["shred", f"Patient/{a['id']}", "--by", "dpo", *store_args], capsys)
    assert code == 0 and "1 key(s) destroyed" in out and "by dpo" in out
    code, _, err = cli(["shred", "Patient/x", "--reason", "free text with spaces", *store_args], capsys)
    assert code == 2 and "reason" in err

    # the replica that cached the key keeps it at most --patient-key-ttl (60 s), then honours the shred
    assert (await client.get(f"/fhir/R4/Patient/{a['id']}")).headers.get("X-Fhircrypt-Shredded") is None
    clock[0] += 61
    assert (await client.get(f"/fhir/R4/Patient/{a['id']}")).headers.get("X-Fhircrypt-Shredded") == "1"

    # another replica (no cached keys) over the same store: every version masked, labelled "shredded"
    replica = await proxy_for(clean_upstream.base_url, POLICY, patient_key_store=store_location)
    resp = await replica.get(f"/fhir/R4/Patient/{a['id']}")
    assert resp.status == 200 and resp.headers["X-Fhircrypt-Shredded"] == "1"
    assert "X-Fhircrypt-Integrity" not in resp.headers  # shredded is not damaged
    patient = await resp.json()
    _assert_shredded(patient)
    assert patient["gender"] == "female" and "name" in patient  # the element stays, masked
    for version in ("1", "2"):
        resp = await replica.get(f"/fhir/R4/Observation/{obs_a['id']}/_history/{version}")
        assert resp.status == 200
        obs = await resp.json()
        _assert_shredded(obs)
        assert obs["dataAbsentReason"]["coding"][0]["code"] == "masked" and "valueQuantity" not in obs
    history = await replica.get(f"/fhir/R4/Observation/{obs_a['id']}/_history")
    assert history.headers["X-Fhircrypt-Shredded"] == "2"
    for entry in (await history.json())["entry"]:
        _assert_shredded(entry["resource"])
    search = await (await replica.get(f"/fhir/R4/Observation?subject=Patient/{a['id']}")).json()
    assert search["entry"] and all("shredded" in orjson.dumps(e["resource"]).decode() for e in search["entry"])
    for response in (patient, search, await (await replica.get(f"/fhir/R4/Patient/{a['id']}/_history")).json()):
        assert_no_plaintext([response], NEEDLES_A)

    # the other patient is untouched
    other = await (await replica.get(f"/fhir/R4/Observation/{obs_b['id']}")).json()
    assert other["valueQuantity"]["value"] == 14.5 and "tag" not in other.get("meta", {})
    # nothing new is written for the shredded patient; updates cannot restore masked elements
    resp = await replica.post(
        "/fhir/R4/Observation", data=orjson.dumps(_observation(a["id"], 1.0, "x")), headers=FHIR_JSON
    )
    assert resp.status == 409 and "crypto-shredded" in await resp.text()
    resp = await replica.put(f"/fhir/R4/Patient/{a['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert resp.status == 400  # the "shredded" tag is fhircrypt's: never written back
    patient["meta"].pop("tag")
    resp = await replica.put(f"/fhir/R4/Patient/{a['id']}", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert resp.status == 409 and "crypto-shredded" in await resp.text()

    # the backup taken before the shred, restored into an empty server, stays unreadable
    clean_upstream.reset()
    latest: dict[tuple[str, str], dict] = {}
    for r in backup:
        latest[(r["resourceType"], r["id"])] = r
    async with aiohttp.ClientSession() as raw:
        for (rtype, rid), r in latest.items():
            restored = {k: v for k, v in r.items() if k != "meta"} | {"meta": {"tag": r["meta"]["tag"]}}
            async with raw.put(
                f"{clean_upstream.base_url}/{rtype}/{rid}", data=orjson.dumps(restored), headers=FHIR_JSON
            ) as resp:
                assert resp.status in (200, 201), await resp.text()
    restored_a = await replica.get(f"/fhir/R4/Observation/{obs_a['id']}")
    assert restored_a.headers["X-Fhircrypt-Shredded"] == "1"
    _assert_shredded(await restored_a.json())
    restored_b = await (await replica.get(f"/fhir/R4/Patient/{b['id']}")).json()
    assert restored_b["name"][0]["text"] == "Sri Rahayu"


async def test_patients_created_around_the_proxy_and_shared_resources(
    proxy_for, clean_upstream, keyring_files, store_location, capsys
):
    client = await proxy_for(clean_upstream.base_url, POLICY, patient_key_store=store_location)
    around = _patient(NIK_B, "Sri Rahayu") | {"id": "outside-1"}
    async with (  # written straight to the server, never seen by the proxy
        aiohttp.ClientSession() as raw,
        raw.put(f"{clean_upstream.base_url}/Patient/outside-1", json=around) as resp,
    ):
        assert resp.status in (200, 201)
    obs = await _create(client, _observation("outside-1", 7.5, "dari luar"))
    shared = _observation("outside-1", 8.5, "bersama") | {"performer": [{"reference": "Patient/other-2"}]}
    both = await _create(client, shared)
    put = _patient(NIK_A, "Budi Santoso") | {"id": "client-id-3"}  # a client-assigned id: its own key at once
    resp = await client.put("/fhir/R4/Patient/client-id-3", data=orjson.dumps(put), headers=FHIR_JSON)
    assert resp.status in (200, 201), await resp.text()
    stored = {r["id"]: r for r in clean_upstream.dump()}
    assert is_handle(_handle(stored[obs["id"]])) and is_handle(_handle(stored["client-id-3"]))
    assert _handle(stored[both["id"]]) == "k1"  # two patients' compartments: the master key (documented)

    code, out, _ = cli(["shred", "Patient/outside-1", "--patient-key-store", store_location, *keyring_files], capsys)
    assert code == 0 and "1 key(s) destroyed" in out
    replica = await proxy_for(clean_upstream.base_url, POLICY, patient_key_store=store_location)
    assert (await replica.get(f"/fhir/R4/Observation/{obs['id']}")).headers["X-Fhircrypt-Shredded"] == "1"
    kept = await (await replica.get(f"/fhir/R4/Observation/{both['id']}")).json()
    assert kept["note"][0]["text"] == "bersama"  # the shared record is not reached by shredding one patient
    assert (await (await replica.get("/fhir/R4/Patient/client-id-3")).json())["name"][0]["text"] == "Budi Santoso"


async def test_an_update_that_moves_a_record_to_another_patient(
    proxy_for, clean_upstream, keyring_files, store_location, capsys
):
    client = await proxy_for(clean_upstream.base_url, POLICY, patient_key_store=store_location)
    obs = await _create(client, _observation("first-1", 5.5, "salah pasien"))
    moved = copy.deepcopy(obs) | {"subject": {"reference": "Patient/second-2"}, "note": [{"text": "pasien benar"}]}
    resp = await client.put(f"/fhir/R4/Observation/{obs['id']}", data=orjson.dumps(moved), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    versions = {r["meta"]["versionId"]: _handle(r) for r in clean_upstream.dump()}
    assert versions["1"] != versions["2"] and all(is_handle(h) for h in versions.values())

    code, _, _ = cli(["shred", "Patient/first-1", "--patient-key-store", store_location, *keyring_files], capsys)
    assert code == 0
    replica = await proxy_for(clean_upstream.base_url, POLICY, patient_key_store=store_location)
    old = await replica.get(f"/fhir/R4/Observation/{obs['id']}/_history/1")
    assert old.headers["X-Fhircrypt-Shredded"] == "1"  # the version written for the first patient is erased
    current = await (await replica.get(f"/fhir/R4/Observation/{obs['id']}")).json()
    assert current["note"][0]["text"] == "pasien benar"  # the version under the second patient's key is not


async def test_an_unreachable_store_refuses_rather_than_guessing(proxy_for, clean_upstream, tmp_path):
    location = tmp_path / "patient-keys.db"
    client = await proxy_for(clean_upstream.base_url, POLICY, patient_key_store=str(location))
    a = await _create(client, _patient(NIK_A, "Wibisono Kartasasmita"))
    location.unlink()
    location.mkdir()  # the store is gone: SQLite cannot open it
    resp = await client.post(
        "/fhir/R4/Observation", data=orjson.dumps(_observation("unseen-9", 9.87, "x")), headers=FHIR_JSON
    )
    assert resp.status == 503 and "patient key store is unavailable" in await resp.text()
    assert resp.headers["Retry-After"] == "5"
    assert not any(r["resourceType"] == "Observation" for r in clean_upstream.dump())  # nothing under a master key
    # the key cached when the Patient was created (and bound) keeps serving reads and writes
    assert (await client.get(f"/fhir/R4/Patient/{a['id']}")).status == 200
    await _create(client, _observation(a["id"], 9.87, "x"))
    replica = await proxy_for(clean_upstream.base_url, POLICY, patient_key_store=str(tmp_path / "other.db"))
    resp = await replica.get(f"/fhir/R4/Patient/{a['id']}")  # a store without the key: damaged, not shredded
    assert resp.status == 200 and "X-Fhircrypt-Integrity" in resp.headers and "X-Fhircrypt-Shredded" not in resp.headers
    assert_no_plaintext([await resp.json()], NEEDLES_A)


async def test_per_patient_policy_needs_a_store(proxy_for, clean_upstream):
    with pytest.raises(ValueError, match="patient key store"):
        await proxy_for(clean_upstream.base_url, POLICY)
