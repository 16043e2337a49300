"""fhircrypt reencrypt and keys retire against the real test upstream.

Plaintext is loaded straight into the upstream (as a hospital's server holds it before
fhircrypt), then migrated; what the upstream stores is scanned for the fixtures'
needles and read back through the proxy. Interruptions and concurrent clinical writes
come from a small forwarding server in front of the real upstream, so the migration
meets real HTTP failures and real 412s.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import struct
import subprocess
import sys
import termios
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.keymgmt.keyring import Keyring, load_keyring, save_keyring
from proxy.keymgmt.providers.local import LocalKeyProvider, generate_kek, parse_kek
from proxy.migrate.assess import Plan, State, assess, envelope_key_ids
from proxy.migrate.commands import Connection, reencrypt, retire
from proxy.migrate.run import Options
from proxy.migrate.shards import parse_shard, shard_of
from proxy.migrate.walker import history
from tests.conftest import (
    FHIR_JSON,
    FIXTURES,
    ROOT,
    TEST_POLICY,
    assert_no_plaintext,
    sealed_groups,
    spoil,
    unit_policy,
)
from tests.test_shipped_policies import CREATED_IDS, ORDER, _fixture, _without_server_meta

FIXED = {placeholder: f"{name.split('.')[0]}-1" for name, placeholder in CREATED_IDS.items()}


async def _put(session: aiohttp.ClientSession, base: str, resource: dict) -> dict:
    url = f"{base}/{resource['resourceType']}/{resource['id']}"
    async with session.put(url, data=orjson.dumps(resource), headers=FHIR_JSON) as resp:
        assert resp.status in (200, 201), await resp.text()
        return await resp.json()


async def load_satusehat(base: str) -> dict[str, dict]:
    """Every SATUSEHAT fixture stored in plaintext directly in the upstream; returns them by reference."""
    originals = {}
    async with aiohttp.ClientSession() as session:
        for name in ORDER["satusehat"]:
            resource = _fixture("satusehat", name, FIXED)
            resource["id"] = FIXED.get(CREATED_IDS.get(name, ""), name.split(".")[0] + "-1")
            await _put(session, base, resource)
            originals[f"{resource['resourceType']}/{resource['id']}"] = resource
    return originals


async def load_patients(base: str, n: int) -> list[str]:
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            patient = {
                "resourceType": "Patient",
                "id": f"p{i}",
                "identifier": [{"system": "https://fhir.kemkes.go.id/id/nik", "value": f"31750400000{i:05d}"}],
                "name": [{"family": f"Plainname{i}", "given": ["Budi"]}],
                "gender": "male",
            }
            await _put(session, base, patient)
    return [f"31750400000{i:05d}" for i in range(n)] + [f"Plainname{i}" for i in range(n)]


def current_versions(upstream) -> list[dict]:
    """The latest stored version of every resource that is not deleted (what reads return)."""
    dump = upstream.dump_all()
    latest: dict[tuple[str, str], dict] = {}
    for r in dump["resources"]:
        latest[(r["resourceType"], r["id"])] = r
    for d in dump["deleted"]:
        latest.pop((d["resourceType"], d["id"]), None)
    return list(latest.values())


def puts(upstream, status: int | None = None) -> list[dict]:
    return [r for r in upstream.requests() if r["method"] == "PUT" and (status is None or r["status"] == status)]


def satusehat_needles() -> list[str]:
    needles = json.loads((FIXTURES / "satusehat" / "needles.json").read_text())
    return [n for name in ORDER["satusehat"] for n in needles[name]]


def opts(**kw) -> Options:
    """Run options; Patient only unless told (the test policies cover every type through Reference.display)."""
    return Options(types=kw.pop("types", ("Patient",)), **{"workers": 4, **kw})


@pytest.fixture
def ring() -> Keyring:
    return Keyring.generate()


# --------------------------------------------------------------------------- adoption


async def test_adopting_a_plaintext_server(clean_upstream, satusehat, ring, proxy_for, tmp_path):
    originals = await load_satusehat(clean_upstream.base_url)
    conn = Connection(clean_upstream.base_url)
    types = tuple(sorted({r.split("/")[0] for r in originals}))
    report = tmp_path / "dry.json"

    # a dry run reports every resource as plaintext and writes nothing
    before, loaded = clean_upstream.dump(), len(puts(clean_upstream))
    code = await reencrypt(conn, Plan(satusehat, ring), opts(types=types, dry_run=True), None, str(report))
    assert code == 0
    assert clean_upstream.dump() == before and len(puts(clean_upstream)) == loaded
    dry = json.loads(report.read_text())
    assert sum(v.get("plaintext", 0) for v in dry["remaining"].values()) == len(originals)

    # the real run: nothing covered stays in plaintext in any current version
    code = await reencrypt(conn, Plan(satusehat, ring), opts(types=types), None, str(report))
    assert code == 0, report.read_text()
    done = json.loads(report.read_text())
    assert done["remaining"] == {}
    assert sum(c.get("encrypted", 0) for c in done["by_type"].values()) == len(originals)
    stored = current_versions(clean_upstream)
    assert len(stored) == len(originals)
    assert_no_plaintext(stored, satusehat_needles())
    assert all(envelope_key_ids(r) == {ring.primary_id} for r in stored)

    # through the proxy every resource reads back exactly as it was stored in plaintext
    client = await proxy_for(clean_upstream.base_url, satusehat, ring)
    for ref, original in originals.items():
        back = await (await client.get(f"/fhir/R4/{ref}")).json()
        expected = _without_server_meta(original)
        assert _without_server_meta(back) == expected, ref

    # idempotent: a second run finds everything current and writes nothing
    writes = len(puts(clean_upstream))
    code = await reencrypt(conn, Plan(satusehat, ring), opts(types=types), None, str(report))
    assert code == 0
    again = json.loads(report.read_text())
    assert len(puts(clean_upstream)) == writes
    assert sum(c.get("current", 0) for c in again["by_type"].values()) == len(originals)


async def test_old_versions_stay_in_history(clean_upstream, ring):
    """The documented limit: reencrypt writes new versions; earlier plaintext versions stay in _history."""
    policy = unit_policy()
    needles = await load_patients(clean_upstream.base_url, 3)
    assert await reencrypt(Connection(clean_upstream.base_url), Plan(policy, ring), opts(), None, None) == 0
    assert_no_plaintext(current_versions(clean_upstream), needles)
    with pytest.raises(AssertionError, match="plaintext found at rest"):
        assert_no_plaintext(clean_upstream.dump(), needles)


# --------------------------------------------------------------------------- a forwarding server


class Relay:
    """Forwards every request to the real upstream; ``before_put`` may act first, ``down_after`` cuts it off."""

    def __init__(
        self, upstream_base: str, down_after: int | None = None, before_put=None, seconds: bool = False
    ) -> None:
        self.upstream_base = upstream_base.rstrip("/")
        self.down_after = down_after
        self.before_put = before_put
        self.seconds = seconds  # answer like a server that keeps lastUpdated to the second (many ties)
        self.queries: list[str] = []
        self.session: aiohttp.ClientSession | None = None
        self.puts = 0
        self.server: TestServer | None = None
        self.base = ""

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "PUT":
            self.puts += 1
            if self.down_after is not None and self.puts > self.down_after:
                return web.Response(status=503, text="down")
            if self.before_put:
                await self.before_put(request.path)
        path = request.path_qs.split("/fhir/R4", 1)[1]
        self.queries.append(path)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "if-match", "accept")}
        url = self.upstream_base + path
        async with self.session.request(request.method, url, data=await request.read(), headers=headers) as resp:
            body = await resp.read()
        if self.seconds and resp.status == 200:
            doc = orjson.loads(body)
            for r in [doc, *(e["resource"] for e in doc.get("entry", []) if "resource" in e)]:
                if "lastUpdated" in r.get("meta", {}):
                    r["meta"]["lastUpdated"] = r["meta"]["lastUpdated"][:19] + "Z"
            body = orjson.dumps(doc)
        # the upstream's links name the relay, as a proxy's would: a link to another origin is never followed
        body = body.replace(self.upstream_base.encode(), self.base.encode())
        return web.Response(status=resp.status, body=body, content_type="application/fhir+json")

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app)
        self.session = aiohttp.ClientSession()
        await self.server.start_server()
        self.base = str(self.server.make_url("/fhir/R4"))
        return self.base

    async def __aexit__(self, *exc) -> None:
        await self.server.close()
        await self.session.close()


# --------------------------------------------------------------------------- resume, conflicts, ties


async def test_more_resources_than_a_page_sharing_one_instant(clean_upstream, ring):
    """A transaction stamps its entries alike on a server with second precision: the tie-break still
    visits every resource exactly once."""
    policy = unit_policy()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    for i in range(12):
        patient = {"resourceType": "Patient", "id": f"t{i}", "name": [{"family": f"Tiedname{i}"}]}
        bundle["entry"].append({"request": {"method": "PUT", "url": f"Patient/t{i}"}, "resource": patient})
    async with (
        aiohttp.ClientSession() as session,
        session.post(clean_upstream.base_url, data=orjson.dumps(bundle), headers=FHIR_JSON) as resp,
    ):
        assert resp.status == 200, await resp.text()
    relay = Relay(clean_upstream.base_url, seconds=True)
    async with relay as relay_base:
        code = await reencrypt(Connection(relay_base), Plan(policy, ring), opts(page_size=3), None, None)
    assert code == 0
    written = Counter(r["url"].rsplit("/", 1)[1] for r in puts(clean_upstream, 200))
    assert set(written) == {f"t{i}" for i in range(12)} and set(written.values()) == {1}
    assert_no_plaintext(current_versions(clean_upstream), [f"Tiedname{i}" for i in range(12)])
    assert any("_lastUpdated=le" in q for q in relay.queries)  # the tie group was listed on its own


async def test_interrupted_run_resumes_from_its_checkpoint(clean_upstream, ring, tmp_path):
    policy = unit_policy()
    needles = await load_patients(clean_upstream.base_url, 40)
    checkpoint = tmp_path / "run.checkpoint"
    plan = Plan(policy, ring)
    async with Relay(clean_upstream.base_url, down_after=17) as relay_base:
        code = await reencrypt(Connection(relay_base), plan, opts(page_size=5), str(checkpoint), None)
    assert code == 3  # the upstream went away mid-run
    saved = json.loads(checkpoint.read_text())
    cursor = saved["cursors"]["Patient"]
    assert cursor["since"] and not cursor["done"]
    assert checkpoint.stat().st_mode & 0o777 == 0o600

    clean_upstream_log_start = len(clean_upstream.requests())
    code = await reencrypt(Connection(clean_upstream.base_url), plan, opts(page_size=5), str(checkpoint), None)
    assert code == 0
    resumed = clean_upstream.requests()[clean_upstream_log_start:]
    first_page = next(r for r in resumed if r["method"] == "GET" and "_sort=_lastUpdated" in r["url"])
    assert "_lastUpdated=ge" in first_page["url"]  # resumed at the cursor, not from the start
    assert_no_plaintext(current_versions(clean_upstream), needles)
    written = Counter(r["url"] for r in puts(clean_upstream, 200))
    assert len(written) == 40 and set(written.values()) == {1}  # every resource written exactly once


V1_POLICY = TEST_POLICY.replace("name: unit-test\n", "name: unit-test\ndefaults: {at_rest_format: v1}\n")


def _formats(upstream) -> Counter:
    """How many current resources have an envelope of each format."""
    return Counter(
        e["valueString"][:2]
        for r in current_versions(upstream)
        for e in r.get("extension", ())
        if e.get("url") == "https://fhircrypt.dev/fhir/StructureDefinition/envelope"
    )


async def test_v1_records_are_moved_to_v2_resumably_and_once(clean_upstream, ring, tmp_path, proxy_for):
    """Element format v1 (what earlier versions wrote) to v2: interrupted, resumed, then nothing left to do."""
    needles = await load_patients(clean_upstream.base_url, 30)
    conn = Connection(clean_upstream.base_url)
    assert await reencrypt(conn, Plan(unit_policy(V1_POLICY), ring), opts(), None, None) == 0
    assert _formats(clean_upstream) == {"v1": 30}
    assert assess(current_versions(clean_upstream)[0], Plan(unit_policy(), ring)).state is State.OLD_POLICY

    checkpoint, plan = tmp_path / "v2.checkpoint", Plan(unit_policy(), ring)
    async with Relay(clean_upstream.base_url, down_after=13) as relay_base:
        assert await reencrypt(Connection(relay_base), plan, opts(page_size=5), str(checkpoint), None) == 3
    moved = _formats(clean_upstream)
    assert 0 < moved["v2"] < 30  # part of the way when the upstream went away
    start = len(clean_upstream.requests())
    assert await reencrypt(conn, plan, opts(page_size=5), str(checkpoint), None) == 0
    assert _formats(clean_upstream) == {"v2": 30}
    assert_no_plaintext(current_versions(clean_upstream), needles)
    rewritten = Counter(r["url"] for r in clean_upstream.requests()[start:] if r["method"] == "PUT")
    assert len(rewritten) == 30 - moved["v2"] and set(rewritten.values()) == {1}  # each once, none twice

    start = len(clean_upstream.requests())
    assert await reencrypt(conn, plan, opts(), None, None) == 0  # idempotent: every record is current
    assert not [r for r in clean_upstream.requests()[start:] if r["method"] == "PUT"]
    client = await proxy_for(clean_upstream.base_url, unit_policy(), ring)
    back = await (await client.get("/fhir/R4/Patient/p7")).json()
    assert back["name"][0]["family"] == "Plainname7" and back["identifier"][0]["value"] == needles[7]


async def test_a_concurrent_write_is_never_overwritten(clean_upstream, ring, proxy_for):
    """A clinical write lands between the migration's read and its PUT: 412, re-read, the writer's data kept."""
    policy = unit_policy()
    await load_patients(clean_upstream.base_url, 3)
    hit: list[str] = []

    async def clinical_write(path: str) -> None:
        if hit:
            return
        hit.append(path)
        rid = path.rsplit("/", 1)[1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{clean_upstream.base_url}/Patient/{rid}") as resp:
                current = await resp.json()
            current["name"][0]["family"] = "Concurrentwriter"
            await _put(session, clean_upstream.base_url, current)

    async with Relay(clean_upstream.base_url, before_put=clinical_write) as relay_base:
        code = await reencrypt(Connection(relay_base), Plan(policy, ring), opts(), None, None)
    assert code == 0
    assert len(puts(clean_upstream, 412)) == 1
    client = await proxy_for(clean_upstream.base_url, policy, ring)
    rid = hit[0].rsplit("/", 1)[1]
    back = await (await client.get(f"/fhir/R4/Patient/{rid}")).json()
    assert back["name"][0]["family"] == "Concurrentwriter"
    assert_no_plaintext(current_versions(clean_upstream), ["Concurrentwriter", "Plainname"])


# --------------------------------------------------------------------------- rotation and retirement


def _provider() -> LocalKeyProvider:
    return LocalKeyProvider(parse_kek(generate_kek()))


async def test_rotation_reencrypt_and_retire(clean_upstream, ring, proxy_for, tmp_path):
    policy = unit_policy()
    conn = Connection(clean_upstream.base_url)
    provider = _provider()
    path = tmp_path / "keyring.json"
    await load_patients(clean_upstream.base_url, 6)
    assert await reencrypt(conn, Plan(policy, ring), opts(), None, None) == 0
    old = ring.primary_id
    new = ring.rotate()
    save_keyring(path, ring, provider)
    types = ("Patient", "Observation")

    # every resource still uses the old key: the retirement is refused and the keyring unchanged
    report = tmp_path / "retire.json"
    assert await retire(conn, ring, provider, str(path), old, types, 4, str(report)) == 1
    assert json.loads(report.read_text())["in_use"] == {"Patient": 6}
    assert load_keyring(path, provider).key_ids == [old, new]

    # reencrypt moves everything to the new primary; then the retirement succeeds, but with --history
    # it is refused: the versions written under the old key stay in _history
    assert await reencrypt(conn, Plan(policy, ring, frozenset({old})), opts(), None, None) == 0
    assert {k for r in current_versions(clean_upstream) for k in envelope_key_ids(r)} == {new}
    assert await retire(conn, ring, provider, str(path), old, types, 4, str(report), with_history=True) == 1
    assert json.loads(report.read_text())["in_history"] == {"Patient": 6}
    assert load_keyring(path, provider).key_ids == [old, new]
    assert await retire(conn, ring, provider, str(path), old, types, 4, str(report)) == 0
    retired = load_keyring(path, provider)
    assert retired.key_ids == [new] and retired.primary_id == new

    # the proxy with the retired keyring reads every current version; the old version under the
    # retired key comes back masked (the documented cost of retiring without purging history)
    client = await proxy_for(clean_upstream.base_url, policy, retired)
    page = await (await client.get("/fhir/R4/Patient?_count=50")).json()
    assert sorted(e["resource"]["name"][0]["family"] for e in page["entry"]) == sorted(
        f"Plainname{i}" for i in range(6)
    )
    old_version = await (await client.get("/fhir/R4/Patient/p0/_history/2")).json()
    assert "name" not in old_version or "family" not in old_version["name"][0]
    assert any(s.get("code") == "MASKED" for s in old_version["meta"]["security"])


async def test_history_is_paged_completely(clean_upstream, ring):
    """Medplum gives no next links for type history: the pager uses _offset and sees every version once."""
    policy = unit_policy()
    await load_patients(clean_upstream.base_url, 5)
    assert await reencrypt(Connection(clean_upstream.base_url), Plan(policy, ring), opts(), None, None) == 0
    async with Connection(clean_upstream.base_url).open(2) as up:
        versions = [v async for page in history(up, "Patient", 3) for v in page]
    stored = [(r["id"], r["meta"]["versionId"]) for r in clean_upstream.dump() if r["resourceType"] == "Patient"]
    assert sorted((v["id"], v["meta"]["versionId"]) for v in versions) == sorted(stored)
    assert len(stored) == 10


async def test_retire_refuses_while_one_resource_still_uses_the_key(clean_upstream, ring, tmp_path):
    policy = unit_policy()
    conn = Connection(clean_upstream.base_url)
    await load_patients(clean_upstream.base_url, 4)
    assert await reencrypt(conn, Plan(policy, ring), opts(), None, None) == 0
    old = ring.primary_id
    ring.rotate()
    async with aiohttp.ClientSession() as session:  # only Patient/p2 moves to the new key
        async with session.get(f"{clean_upstream.base_url}/Patient/p2") as resp:
            stored = await resp.json()
        await _put(session, clean_upstream.base_url, assess(stored, Plan(policy, ring, frozenset({old}))).replacement)
    provider = _provider()
    path = tmp_path / "keyring.json"
    save_keyring(path, ring, provider)
    report = tmp_path / "retire.json"
    assert await retire(conn, ring, provider, str(path), old, ("Patient",), 2, str(report)) == 1
    assert json.loads(report.read_text())["in_use"] == {"Patient": 3}
    assert old in load_keyring(path, provider).key_ids
    assert await retire(conn, ring, provider, str(path), ring.primary_id, ("Patient",), 2, None) == 2  # the primary


async def test_retire_refuses_when_resources_use_per_patient_keys(clean_upstream, ring, tmp_path, capsys):
    """Per-patient keys are sealed by keyring keys in the patient key store, which the scan cannot
    see: with any in use, retiring a keyring key is refused rather than risk unreadable patients."""
    policy = unit_policy()
    await load_patients(clean_upstream.base_url, 1)
    assert await reencrypt(Connection(clean_upstream.base_url), Plan(policy, ring), opts(), None, None) == 0
    old = ring.primary_id
    ring.rotate()
    conn = Connection(clean_upstream.base_url)
    assert await reencrypt(conn, Plan(policy, ring, frozenset({old})), opts(), None, None) == 0  # nothing on k1
    async with aiohttp.ClientSession() as session:  # as the proxy writes it under a patient's own key
        async with session.get(f"{clean_upstream.base_url}/Patient/p0") as resp:
            stored = await resp.json()
        envelope = next(e for e in stored["extension"] if e["url"].endswith("/envelope"))
        parts = envelope["valueString"].split(".")
        envelope["valueString"] = ".".join([parts[0], "p_" + "0" * 32, *parts[2:]])
        await _put(session, clean_upstream.base_url, {**stored, "id": "p1"})
    provider, path = _provider(), tmp_path / "keyring.json"
    save_keyring(path, ring, provider)
    assert await retire(conn, ring, provider, str(path), old, ("Patient",), 2, None) == 1
    assert "per-patient keys" in capsys.readouterr().err
    assert old in load_keyring(path, provider).key_ids


# --------------------------------------------------------------------------- policies and integrity

NEWER_POLICY = TEST_POLICY.replace(
    "      - {path: birthDate, group: demographics}",
    "      - {path: birthDate, group: demographics}\n      - {path: gender, group: demographics}",
)


async def test_older_policy_is_detected_and_moved_with_previous_policy(clean_upstream, ring, proxy_for):
    old_policy, new_policy = unit_policy(), unit_policy(NEWER_POLICY)
    conn = Connection(clean_upstream.base_url)
    await load_patients(clean_upstream.base_url, 3)
    assert await reencrypt(conn, Plan(old_policy, ring), opts(), None, None) == 0

    # under the newer policy, the stored resources do not verify: reported and left alone
    writes = len(puts(clean_upstream))
    assert await reencrypt(conn, Plan(new_policy, ring), opts(), None, None) == 1
    assert len(puts(clean_upstream)) == writes

    # given the policy they were written under, they are re-encrypted under the newer one
    plan = Plan(new_policy, ring, previous=old_policy)
    assert await reencrypt(conn, plan, opts(), None, None) == 0
    assert_no_plaintext(current_versions(clean_upstream), ['"gender":"male"'])
    client = await proxy_for(clean_upstream.base_url, new_policy, ring)
    back = await (await client.get("/fhir/R4/Patient/p1")).json()
    assert back["gender"] == "male" and back["name"][0]["family"] == "Plainname1"
    assert await reencrypt(conn, Plan(new_policy, ring), opts(), None, None) == 0  # now current


def test_a_new_blind_index_marks_the_resource_as_written_under_an_older_policy(ring):
    old_policy = unit_policy()
    indexed = unit_policy(
        TEST_POLICY.replace(
            "group: identity, id: nik}", "group: identity, id: nik, search: {params: [identifier], normalize: digits}}"
        )
    )
    assert indexed.resources["Patient"].elements[0].indexes, "the policy must index the NIK for this test"
    patient = {"resourceType": "Patient", "identifier": [{"system": "https://fhir.kemkes.go.id/id/nik", "value": "1"}]}
    stored = assess(copy.deepcopy(patient), Plan(old_policy, ring)).replacement
    assert assess(stored, Plan(old_policy, ring)).state is State.CURRENT
    moved = assess(stored, Plan(indexed, ring))
    assert moved.state is State.OLD_POLICY
    assert assess(moved.replacement, Plan(indexed, ring)).state is State.CURRENT


async def test_tampered_resources_are_reported_and_left_alone(clean_upstream, ring, tmp_path):
    policy = unit_policy()
    conn = Connection(clean_upstream.base_url)
    await load_patients(clean_upstream.base_url, 2)
    assert await reencrypt(conn, Plan(policy, ring), opts(), None, None) == 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{clean_upstream.base_url}/Patient/p0") as resp:
            stored = await resp.json()
        spoil(sealed_groups(stored)["demographics"])
        tampered = await _put(session, clean_upstream.base_url, stored)
    report = tmp_path / "report.json"
    assert await reencrypt(conn, Plan(policy, ring, to_primary=True), opts(), None, str(report)) == 1
    result = json.loads(report.read_text())
    assert result["remaining"] == {"Patient": {"failed": 1}}
    assert result["undone_ids"] == {"Patient": ["p0"]}  # ids to investigate, never values
    reasons = [k for k in result["by_type"]["Patient"] if k.startswith("reason: ")]
    assert reasons == ["reason: record MAC does not verify"] or reasons == ["reason: ciphertext does not verify"]
    async with aiohttp.ClientSession() as session, session.get(f"{clean_upstream.base_url}/Patient/p0") as resp:
        assert (await resp.json())["meta"]["versionId"] == tampered["meta"]["versionId"]  # not rewritten


# --------------------------------------------------------------------------- shards


def test_shard_parsing():
    assert parse_shard("0/3") == (0, 3) and parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/3", "1/0", "a/b", "1"):
        with pytest.raises(ValueError):
            parse_shard(bad)


async def test_shards_cover_every_resource_exactly_once(clean_upstream, ring):
    policy = unit_policy()
    needles = await load_patients(clean_upstream.base_url, 30)
    conn = Connection(clean_upstream.base_url)
    scanned = 0
    for i in range(3):
        report_opts = opts(shard=(i, 3))
        assert await reencrypt(conn, Plan(policy, ring), report_opts, None, None) == 0
    written = Counter(r["url"].rsplit("/", 1)[1] for r in puts(clean_upstream, 200))
    assert set(written) == {f"p{i}" for i in range(30)} and set(written.values()) == {1}
    for i in range(3):
        mine = {rid for rid in written if shard_of("Patient", rid, 3) == i}
        scanned += len(mine)
    assert scanned == 30
    assert_no_plaintext(current_versions(clean_upstream), needles)


# --------------------------------------------------------------------------- the command line


def test_command_line_dry_run_then_run(upstream, tmp_path):
    """The real command: exit codes, the JSON report on stdout, secrets only from files."""
    upstream.reset()
    import asyncio

    asyncio.run(load_patients(upstream.base_url, 5))
    kek = tmp_path / "kek.txt"
    kek.write_text(generate_kek())
    ring = tmp_path / "keyring.json"
    save_keyring(ring, Keyring.generate(), LocalKeyProvider(parse_kek(kek.read_text())))
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    token = tmp_path / "upstream-token"
    token.write_text("upstream-bearer-secret\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FHIRCRYPT_KEK_FILE": str(kek)}
    env["FHIRCRYPT_UPSTREAM_TOKEN_FILE"] = str(token)
    base = [sys.executable, "-m", "proxy", "reencrypt", "--upstream", upstream.base_url, "--policy", str(policy)]
    base += ["--keyring", str(ring), "--report", "-", "--types", "Patient"]
    dry = subprocess.run([*base, "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["remaining"] == {"Patient": {"plaintext": 5}}
    assert "would change: Patient: plaintext 5" in dry.stderr
    sent = {r["headers"].get("authorization") for r in upstream.requests() if "_sort" in r["url"]}
    assert sent == {"Bearer upstream-bearer-secret"}  # the upstream's token, from the file
    assert "upstream-bearer-secret" not in dry.stdout + dry.stderr
    # on a terminal (stderr is a pty here) a progress bar shows counts, rate and the writes so far
    terminal, child_end = os.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    run = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=child_end, env=env, text=True)
    os.close(child_end)
    stdout, _ = run.communicate(timeout=120)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the child's end is closed and drained
        while chunk := os.read(terminal, 65536):
            shown += chunk
    os.close(terminal)
    text = shown.decode(errors="replace")
    assert run.returncode == 0, text
    assert "5/5" in text and "written=5" in text and "res/s" in text
    assert json.loads(stdout)["by_type"]["Patient"]["encrypted"] == 5
    assert "Plainname" not in stdout + text  # reports carry counts, never values
    retire = [sys.executable, "-m", "proxy", "keys", "retire", "k1", "--upstream", upstream.base_url]
    refused = subprocess.run([*retire, "--keyring", str(ring)], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "primary" in refused.stderr
    typo = subprocess.run([*base, "--types", "Patinet"], capture_output=True, text=True, env=env, timeout=120)
    assert typo.returncode == 2 and "not R4 resource types: Patinet" in typo.stderr
    missing = {**env, "FHIRCRYPT_UPSTREAM_TOKEN_FILE": str(tmp_path / "absent")}
    no_token = subprocess.run(base, capture_output=True, text=True, env=missing, timeout=120)
    assert no_token.returncode == 2 and "FHIRCRYPT_UPSTREAM_TOKEN_FILE" in no_token.stderr
    assert Path(ring).exists()


# --------------------------------------------------------------------------- at scale

# 10,000 (the figure) takes about five minutes on a 2-core machine: the suite runs 2,000, the
# same code paths; FHIRCRYPT_REENCRYPT_SCALE=10000 runs the full figure.
SCALE = int(os.environ.get("FHIRCRYPT_REENCRYPT_SCALE", "2000"))


async def load_many(base: str, n: int) -> None:
    """``n`` plaintext Observations in batches (faster than one request each)."""
    async with aiohttp.ClientSession() as session:
        for start in range(0, n, 500):
            entries = []
            for i in range(start, min(n, start + 500)):
                obs = {
                    "resourceType": "Observation",
                    "id": f"o{i}",
                    "status": "final",
                    "code": {"text": "hemoglobin"},
                    "valueString": f"Scaleneedle{i}",
                }
                entries.append({"request": {"method": "PUT", "url": f"Observation/o{i}"}, "resource": obs})
            bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
            async with session.post(base, data=orjson.dumps(bundle), headers=FHIR_JSON) as resp:
                assert resp.status == 200, await resp.text()


async def test_ten_thousand_plaintext_resources_interrupted_and_resumed(clean_upstream, ring, tmp_path, proxy_for):
    """The issue's scenario: a large plaintext store, a run cut off half way with a clinical writer active,
    resumed from its checkpoint; at the end nothing is plaintext and the writer's update is intact."""
    policy = unit_policy()
    await load_many(clean_upstream.base_url, SCALE)
    checkpoint = tmp_path / "scale.checkpoint"
    plan, run_opts = Plan(policy, ring), opts(types=("Observation",), page_size=200, workers=8)
    writer_hit: list[str] = []
    targets = {"o7", "o77", "o777"}

    async def clinical_write(path: str) -> None:
        rid = path.rsplit("/", 1)[1]
        if rid in targets:  # once each: the migration's retry of the same resource goes through
            targets.discard(rid)
            writer_hit.append(path)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{clean_upstream.base_url}/Observation/{rid}") as resp:
                    current = await resp.json()
                current["valueString"] = f"Writer{rid}"
                await _put(session, clean_upstream.base_url, current)

    async with Relay(clean_upstream.base_url, down_after=SCALE // 2, before_put=clinical_write) as relay_base:
        assert await reencrypt(Connection(relay_base), plan, run_opts, str(checkpoint), None) == 3
    assert await reencrypt(Connection(clean_upstream.base_url), plan, run_opts, str(checkpoint), None) == 0
    stored = current_versions(clean_upstream)
    assert len(stored) == SCALE
    assert_no_plaintext(stored, ["Scaleneedle", "Writer"])
    assert len(writer_hit) == 3 and len(puts(clean_upstream, 412)) == 3
    client = await proxy_for(clean_upstream.base_url, policy, ring)
    for path in writer_hit:
        rid = path.rsplit("/", 1)[1]
        back = await (await client.get(f"/fhir/R4/Observation/{rid}")).json()
        assert back["valueString"] == f"Writer{rid}"
