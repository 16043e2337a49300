"""fhircrypt coverage against the real test upstream: exact counts, read-only, resumable, its HTML in Chromium.

The upstream is seeded with the three states a hospital's server holds during adoption:
resources stored in plaintext (before fhircrypt), resources written through the proxy
(encrypted), and resources written through the proxy and then changed around it (partly
encrypted: clear values added where the policy covers them and where it does not, an element
masked without ciphertext).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.coverage import report
from proxy.coverage.command import Outputs, Scan, scan_ndjson, scan_upstream
from proxy.coverage.detectors import simple_detector
from proxy.coverage.scan import Coverage
from proxy.migrate.commands import Connection
from proxy.migrate.run import Options
from proxy.transform import markers as mk
from tests.conftest import FHIR_JSON, ROOT, TEST_POLICY, unit_policy
from tests.test_reencrypt import Relay

NIK = "https://fhir.kemkes.go.id/id/nik"
MRN = "https://example.org/mrn"
TYPES = ("Observation", "Patient")

PLAIN_PATIENT = {
    "resourceType": "Patient",
    "id": "plain",
    "identifier": [{"system": NIK, "value": "3175042903870007"}, {"system": MRN, "value": "3275014601900003"}],
    "name": [{"family": "Plainfamily", "given": ["Budi", "Santoso"]}],
    "telecom": [{"system": "email", "value": "budi@example.org"}],
    "gender": "male",
    "_birthDate": {
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}]
    },
}
SEALED_PATIENT = {
    "resourceType": "Patient",
    "id": "sealed",
    "identifier": [{"system": NIK, "value": "3175042903870008"}],
    "name": [{"family": "Sealedfamily", "given": ["Siti"]}],
    "birthDate": "1987-03-29",
    "gender": "female",
    "address": [{"line": ["Jl. Sudirman 1"], "city": "Jakarta", "postalCode": "10210"}],
}
PARTLY_PATIENT = {"resourceType": "Patient", "id": "partly", "name": [{"family": "Partlyfamily"}], "gender": "other"}
SEALED_OBSERVATION = {
    "resourceType": "Observation",
    "id": "obs-sealed",
    "status": "final",
    "code": {"text": "Glucose"},
    "subject": {"reference": "Patient/sealed"},
    "valueQuantity": {"value": 5.4, "unit": "mmol/L"},
    "note": [{"text": "ask Siti to call back"}],
}
PLAIN_OBSERVATION = {
    "resourceType": "Observation",
    "id": "obs-plain",
    "status": "final",
    "code": {"text": "Remark"},
    "valueString": "NIK 3175042903870009",
}
VALUES = ["3175042903870007", "3275014601900003", "Plainfamily", "budi@example.org", "+6281234567890", "NIK 317504"]

# (encrypted, masked, clear, clear and covered, clear and not covered, PHI-like) by type and element path,
# worked out by hand from the resources above and the test policy
EXPECTED = {
    "Patient": {
        f"Patient.identifier.where(system='{NIK}').value": (1, 0, 1, 1, 0, 1),
        f"Patient.identifier.where(system='{MRN}').value": (0, 0, 1, 0, 1, 1),
        "Patient.name": (2, 0, 0, 0, 0, 0),
        "Patient.name.family": (0, 0, 1, 1, 0, 0),
        "Patient.name.given": (0, 0, 2, 2, 0, 0),
        "Patient.telecom.system": (0, 0, 2, 2, 0, 0),
        "Patient.telecom.value": (0, 0, 2, 2, 0, 2),
        "Patient.gender": (0, 0, 3, 0, 3, 0),
        # the marker written around the proxy sits in a format-v2 record, where a bare marker is what the
        # proxy stores for a value sealed in its group: without keys the scan counts it as encrypted (a
        # read through the proxy finds it out: the record MAC covers every marker)
        "Patient.birthDate": (2, 1, 0, 0, 0, 0),  # the plain Patient's marker: no fhircrypt record, masked
        "Patient.address.line": (1, 0, 0, 0, 0, 0),
        "Patient.address.city": (1, 0, 0, 0, 0, 0),
        "Patient.address.postalCode": (0, 0, 1, 0, 1, 0),
        "Patient.maritalStatus.text": (0, 0, 1, 0, 1, 0),
    },
    "Observation": {
        "Observation.status": (0, 0, 2, 0, 2, 0),
        "Observation.code.text": (0, 0, 2, 0, 2, 0),
        "Observation.subject.reference": (0, 0, 1, 0, 1, 0),
        "Observation.value[x]": (1, 0, 0, 0, 0, 0),
        "Observation.note.text": (1, 0, 0, 0, 0, 0),
        "Observation.valueString": (0, 0, 1, 1, 0, 1),
    },
}


async def _put(session: aiohttp.ClientSession, url: str, resource: dict) -> None:
    async with session.put(url, data=orjson.dumps(resource), headers=FHIR_JSON) as resp:
        assert resp.status in (200, 201), await resp.text()


async def seed(upstream, proxy_for) -> None:
    """Plaintext straight into the upstream, encrypted through the proxy, and one changed around the proxy."""
    base = upstream.base_url
    client = await proxy_for(base, unit_policy())
    for resource in (SEALED_PATIENT, PARTLY_PATIENT, SEALED_OBSERVATION):
        resp = await client.put(
            f"/fhir/R4/{resource['resourceType']}/{resource['id']}", data=orjson.dumps(resource), headers=FHIR_JSON
        )
        assert resp.status in (200, 201), await resp.text()
    async with aiohttp.ClientSession() as session:
        for resource in (PLAIN_PATIENT, PLAIN_OBSERVATION):
            await _put(session, f"{base}/{resource['resourceType']}/{resource['id']}", resource)
        async with session.get(f"{base}/Patient/partly") as resp:
            partly = await resp.json()
        assert "_value" not in str(partly["name"]) and "extension" in partly["name"][0]  # sealed by the proxy
        partly["telecom"] = [{"system": "phone", "value": "+6281234567890"}]  # covered, but written around it
        partly["maritalStatus"] = {"text": "kawin"}  # not covered
        partly["_birthDate"] = {"extension": [mk.dar_masked()]}  # masked, no ciphertext
        await _put(session, f"{base}/Patient/partly", partly)


def rows_of(doc: dict) -> dict:
    keys = ("encrypted", "masked", "clear", "clear_covered", "clear_uncovered", "phi")
    return {t: {r["path"]: tuple(r[k] for k in keys) for r in v["paths"]} for t, v in doc["types"].items()}


def gets_only(upstream, since: int) -> None:
    methods = {r["method"] for r in upstream.requests()[since:]}
    assert methods == {"GET"}, methods


async def test_counts_by_path_are_exact_and_the_scan_only_reads(clean_upstream, proxy_for, tmp_path, capsys):
    await seed(clean_upstream, proxy_for)
    before = len(clean_upstream.requests())
    out = Outputs(str(tmp_path / "report.json"), str(tmp_path / "report.html"))
    code = await scan_upstream(
        Connection(clean_upstream.base_url), Scan(unit_policy()), Options(types=TYPES, page_size=2), None, out
    )
    assert code == 0
    gets_only(clean_upstream, before)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["complete"] and doc["policy"]["digest"] == unit_policy().digest
    assert rows_of(doc) == EXPECTED
    assert {t: v["resources"] for t, v in doc["types"].items()} == {"Patient": 3, "Observation": 2}
    patient = {r["path"]: r for r in doc["types"]["Patient"]["paths"]}
    telecom = patient["Patient.telecom.value"]
    assert telecom["phi_by_detector"] == {"email": 1, "phone": 1}
    assert sorted(telecom["phi_examples"]) == ["Patient/partly telecom[0].value", "Patient/plain telecom[0].value"]
    shown = capsys.readouterr().out + (tmp_path / "report.json").read_text() + (tmp_path / "report.html").read_text()
    assert "Patient.maritalStatus.text" in shown
    assert not [v for v in VALUES if v in shown]  # paths and counts, never values


async def test_without_a_policy_covered_is_unknown(clean_upstream, proxy_for):
    await seed(clean_upstream, proxy_for)
    cov = Coverage()
    # the same classification, resource by resource, as the command applies to each page
    async with aiohttp.ClientSession() as session, session.get(f"{clean_upstream.base_url}/Patient") as resp:
        for entry in (await resp.json())["entry"]:
            cov.add_resource(entry["resource"], None, simple_detector)
    doc = report.build(cov, Scan(None).meta("test", True))
    rows = rows_of(doc)["Patient"]
    assert {p: (e, m, c, phi) for p, (e, m, c, _, _, phi) in rows.items()} == {
        p: (e, m, c, phi) for p, (e, m, c, _, _, phi) in EXPECTED["Patient"].items()
    }
    assert all(covered is None and uncovered is None for _, _, _, covered, uncovered, _ in rows.values())
    assert "clear (no policy given)" in report.html(doc)


async def test_interrupted_scan_resumes_from_its_checkpoint_and_counts_each_value_once(
    clean_upstream, proxy_for, tmp_path, capsys
):
    await seed(clean_upstream, proxy_for)
    checkpoint = tmp_path / "coverage.checkpoint"
    scan, options = Scan(unit_policy()), Options(types=TYPES, page_size=1)

    class Failing(Relay):
        """The server stops answering after a few requests (after the Observations, inside the Patients)."""

        gets = 0

        async def handle(self, request: web.Request) -> web.Response:
            self.gets += 1
            return web.Response(status=503) if self.gets > 8 else await super().handle(request)

    async with Failing(clean_upstream.base_url) as relay_base:
        code = await scan_upstream(Connection(relay_base), scan, options, str(checkpoint), Outputs())
    err = capsys.readouterr().err
    assert code == 2 and "did not answer" in err and "--checkpoint" in err
    saved = json.loads(checkpoint.read_text())
    assert saved["cursors"]["Observation"]["done"] and not saved["cursors"].get("Patient", {}).get("done")

    before = len(clean_upstream.requests())
    code = await scan_upstream(
        Connection(clean_upstream.base_url), scan, options, str(checkpoint), Outputs(str(tmp_path / "r.json"))
    )
    assert code == 0
    resumed = [r["url"] for r in clean_upstream.requests()[before:]]
    assert not any(u.startswith("/fhir/R4/Observation?_sort") for u in resumed)  # the done type is not read again
    assert rows_of(json.loads((tmp_path / "r.json").read_text())) == EXPECTED


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "coverage", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_unreachable_and_slow_servers_fail_with_a_clear_message(tmp_path):
    refused = _run_cli("--upstream", "http://127.0.0.1:9/fhir/R4", "--types", "Patient", "--timeout", "1")
    assert refused.returncode == 2, refused.stderr
    assert "127.0.0.1:9" in refused.stderr and "Traceback" not in refused.stderr

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    async def main() -> subprocess.CompletedProcess:
        app = web.Application()
        app.router.add_get("/{tail:.*}", slow)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            base = str(server.make_url("/fhir/R4"))
            args = ("--upstream", base, "--types", "Patient", "--timeout", "0.3", "--checkpoint", str(tmp_path / "c"))
            return await asyncio.to_thread(_run_cli, *args)
        finally:
            await server.close()

    timed_out = asyncio.run(main())
    assert timed_out.returncode == 2, timed_out.stderr
    assert "did not answer" in timed_out.stderr and "127.0.0.1" in timed_out.stderr
    assert "Traceback" not in timed_out.stderr and "same --checkpoint" in timed_out.stderr


async def test_a_paging_link_to_another_origin_is_never_followed(capsys):
    """A server whose next link names another host: the scan stops (exit 2) and that host gets nothing."""
    elsewhere: list[str] = []
    stamp = "2024-01-01T00:00:00.000Z"
    page = [{"resourceType": "Patient", "id": f"t{i}", "meta": {"lastUpdated": stamp}} for i in range(2)]

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(request.path_qs)
        return web.json_response({"resourceType": "Bundle", "type": "searchset"})

    async with contextlib.AsyncExitStack() as stack:
        other_app = web.Application()
        other_app.router.add_get("/{tail:.*}", other)
        other_server = TestServer(other_app, host="127.0.0.1")
        await other_server.start_server()
        stack.push_async_callback(other_server.close)

        async def fhir(request: web.Request) -> web.Response:
            if request.query.get("_summary") == "count":
                return web.json_response({"resourceType": "Bundle", "type": "searchset", "total": 2})
            # every resource shares one instant: the walk lists it on its own, following next links
            link = [{"relation": "next", "url": str(other_server.make_url("/fhir/R4/Patient?page=2"))}]
            entries = [{"resource": r, "search": {"mode": "match"}} for r in page]
            return web.json_response({"resourceType": "Bundle", "type": "searchset", "entry": entries, "link": link})

        app = web.Application()
        app.router.add_get("/{tail:.*}", fhir)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        stack.push_async_callback(server.close)
        conn = Connection(str(server.make_url("/fhir/R4")))
        code = await scan_upstream(conn, Scan(None), Options(types=("Patient",), page_size=2), None, Outputs())
    assert code == 2 and "outside its own origin" in capsys.readouterr().err
    assert elsewhere == []


def chromium() -> str:
    """Headless Chromium; its absence fails (never skips) under CI, where ./dev installs it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is missing: ./dev test installs it (apt-get install chromium)")
    return found


async def test_command_line_report_renders_in_headless_chromium(clean_upstream, proxy_for, tmp_path):
    await seed(clean_upstream, proxy_for)
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    html, js = tmp_path / "coverage.html", tmp_path / "coverage.json"
    before = len(clean_upstream.requests())
    done = await asyncio.to_thread(
        _run_cli,
        *("--upstream", clean_upstream.base_url, "--policy", str(policy), "--types", *TYPES),
        *("--html", str(html), "--report", str(js)),
    )
    assert done.returncode == 0, done.stderr
    gets_only(clean_upstream, before)
    assert "Patient.maritalStatus.text" in done.stdout and "PHI-like" in done.stdout
    assert rows_of(json.loads(js.read_text())) == EXPECTED
    page = html.read_text()
    assert "http" not in page.replace(NIK, "").replace(MRN, "").replace("http://www.w3.org/2000/svg", "")

    dom = await asyncio.to_thread(
        subprocess.run,
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr
    from html.parser import HTMLParser

    class Elements(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, dict]] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.seen.append((tag, dict(attrs)))

    parsed = Elements()
    parsed.feed(dom.stdout)
    sections = [a["data-type"] for t, a in parsed.seen if t == "section"]
    charts = [a["data-type"] for t, a in parsed.seen if t == "svg" and "chart" in a.get("class", "")]
    tables = [t for t, a in parsed.seen if t == "table" and a.get("class") == "paths"]
    bars = [a["class"] for t, a in parsed.seen if t == "rect"]
    assert sections == ["Observation", "Patient"] and charts == ["all types", *sections] and len(tables) == 2
    assert {"bar encrypted", "bar masked", "bar clear_covered", "bar clear_uncovered"} <= set(bars)
    rows = [t for t, _ in parsed.seen if t == "tr"]
    assert len(rows) == 2 + sum(len(v) for v in EXPECTED.values())  # a header row per table, a row per path


async def test_bulk_export_ndjson_files(clean_upstream, proxy_for, tmp_path, capsys):
    await seed(clean_upstream, proxy_for)
    files = []
    async with aiohttp.ClientSession() as session:
        for rtype in TYPES:
            async with session.get(f"{clean_upstream.base_url}/{rtype}") as resp:
                entries = (await resp.json())["entry"]
            path = tmp_path / f"{rtype}.ndjson"
            path.write_bytes(b"\n".join(orjson.dumps(e["resource"]) for e in entries) + b"\n")
            files.append(str(path))
    assert scan_ndjson(files, Scan(unit_policy()), Outputs(str(tmp_path / "r.json"))) == 0
    assert rows_of(json.loads((tmp_path / "r.json").read_text())) == EXPECTED
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"resourceType": "Patient"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.ndjson line 2"):
        scan_ndjson([str(bad)], Scan(None), Outputs())


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("3175042903870007", "nik"),
        ("NIK: 1101014501990001.", "nik"),
        ("9471010101010001", "nik"),
        ("1001014501990001", None),  # province 10 does not exist
        ("9571010101010001", None),  # nor 95
        ("31750429038700071", None),  # 17 digits: an accession number, not a NIK
        ("budi.santoso@rs-example.co.id", "email"),
        ("+62 812-3456-7890", "phone"),
        ("081234567890", "phone"),
        ("+14155550123", "phone"),
        ("Hb 13.5 g/dL, 2024-03-01, LOINC 718-7", None),
        ("glucose 5.4 mmol/L", None),
    ],
)
def test_simple_detector(value, found):
    assert simple_detector(value) == found


def test_the_detector_is_a_hook():
    """Any callable replaces the simple set (the proxy's sentinel module, once merged)."""
    cov = Coverage()
    cov.add_resource(dict(PLAIN_PATIENT), None, lambda value: "custom" if value == "male" else None)
    assert cov.rows["Patient"]["Patient.gender"]["phi.custom"] == 1
    assert sum(c["phi"] for c in cov.rows["Patient"].values()) == 1


def test_the_readme_links_the_example_report():
    example = ROOT / "docs" / "coverage-example.html"
    assert "docs/coverage-example.html" in (ROOT / "README.md").read_text()
    assert 'class="chart"' in example.read_text()
    assert json.loads(example.with_suffix(".json").read_text())["format"] == report.FORMAT
