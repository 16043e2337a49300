"""The demo's story: a hospital EMR sends one SATUSEHAT-style transaction through fhircrypt.

The hospital's Organization is registered at the server first (its id is configuration:
it names the hospital's MRN system in the policy). Then one transaction Bundle, linked by
``urn:uuid:`` references as SATUSEHAT clients write them, creates the attending
Practitioner, the telemedicine Location, the Patient, the Encounter, a Condition, a lab
Observation and a MedicationRequest. Every placeholder of the sample files is resolved to
a resource the demo created; one left over is an error, never shown as data.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from demo import report
from proxy.coverage.command import Outputs, Scan, scan_upstream
from proxy.keymgmt.keyring import Keyring, load_keyring, save_keyring
from proxy.keymgmt.providers.local import generate_kek, load_local_kek
from proxy.migrate.commands import Connection
from proxy.migrate.run import Options
from proxy.policy.compiler import compile_text
from proxy.settings import Settings
from proxy.web.app import create_app
from proxy.web.runtime import RUNTIME
from tests.upstream_server import UpstreamServer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "satusehat"
POLICY = "policies/satusehat.yaml"
SAMPLES = ("patient.json", "encounter.json", "condition.json", "observation-hemoglobin.json", "medication-request.json")
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
NIK = "3175042903870007"  # the sample patient's NIK, for the curl search by blind index

ORGANIZATION = {"resourceType": "Organization", "active": True, "name": "RSUD Melati Sejahtera"}
# what the samples point at that has no sample file, keyed by the placeholder that names it
DIRECTORY = {
    "PRACTITIONER_ID": {
        "resourceType": "Practitioner",
        "active": True,
        "name": [{"text": "dr. Ratnaningsih Kusumastuti, Sp.PD", "family": "Kusumastuti"}],
    },
    "LOCATION_ID": {"resourceType": "Location", "status": "active", "name": "Ruang Telemedisin Poli Penyakit Dalam"},
}
ORGANIZATION_PLACEHOLDER = "REPLACE-WITH-ORGANIZATION-ID"  # in the samples (the policy takes a variable)
BPJS_SYSTEM = "https://fhir.example-hospital.id/id/bpjs"  # the system the samples write BPJS numbers under
REFERENCE = re.compile(r"\b[A-Z][A-Za-z]+/([A-Z]+_ID)\b")  # "Patient/PATIENT_ID"
LEFTOVER = re.compile(r"\b[A-Z]+_ID\b|REPLACE-WITH-[A-Z-]+")


class DemoError(Exception):
    """The demo could not run as written (a sample, the server or the proxy answered otherwise)."""


@dataclass
class Written:
    """One resource of the transaction: what the application sees and what the server stores."""

    reference: str  # Patient/<id>
    source: str  # the sample file, or "" for the demo's directory resources
    seen: dict
    stored: dict


def resolve(text: str, source: str, references: dict[str, str], organization_id: str) -> dict:
    """A sample with every placeholder replaced by a resource of the demo; a placeholder left is an error."""
    text = text.replace(ORGANIZATION_PLACEHOLDER, organization_id)
    text = REFERENCE.sub(lambda m: references.get(m.group(1), m.group(0)), text)
    left = LEFTOVER.search(text)
    if left:
        raise DemoError(f"{source}: the placeholder {left.group(0)} names no resource of the demo")
    return json.loads(text)


def transaction(organization_id: str) -> tuple[dict, list[str]]:
    """The transaction Bundle and, per entry, the sample file it came from ("" for directory entries)."""
    samples = {name: (FIXTURES / name).read_text() for name in SAMPLES}
    placeholders = {f"{json.loads(text)['resourceType'].upper()}_ID": name for name, text in samples.items()}
    urns = {p: f"urn:uuid:{uuid.uuid4()}" for p in [*DIRECTORY, *placeholders]}
    references = {**urns, "ORGANIZATION_ID": f"Organization/{organization_id}"}
    resources = [(p, "", DIRECTORY[p]) for p in DIRECTORY]
    resources += [
        (p, name, resolve(samples[name], name, references, organization_id)) for p, name in placeholders.items()
    ]
    entries = [
        {"fullUrl": urns[p], "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
        for p, _, r in resources
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, [name for _, name, _ in resources]


def dev_keyring(workdir: Path) -> Keyring:
    """The demo's own keyring and KEK (in .fhircrypt/demo, ignored by git), made on first use."""
    kek_file, ring_file = workdir / "kek.txt", workdir / "keyring.json"
    workdir.mkdir(parents=True, exist_ok=True)
    if not kek_file.exists():
        kek_file.touch(mode=0o600)
        kek_file.write_text(generate_kek() + "\n")
    provider = load_local_kek(str(kek_file), environ={})
    if not ring_file.exists():
        save_keyring(ring_file, Keyring.generate(), provider)
    return load_keyring(ring_file, provider)


async def _json(resp: aiohttp.ClientResponse, expected: int, what: str) -> dict:
    body = await resp.json(content_type=None)
    if resp.status != expected:
        issues = "; ".join(i.get("diagnostics", "") for i in body.get("issue", [])) if isinstance(body, dict) else ""
        raise DemoError(f"{what}: HTTP {resp.status} {issues}".rstrip())
    return body


async def _write(http: aiohttp.ClientSession, proxy: str, upstream: str, organization_id: str) -> list[Written]:
    bundle, sources = transaction(organization_id)
    async with http.post(proxy, data=json.dumps(bundle), headers=FHIR_JSON) as r:
        answer = await _json(r, 200, "the transaction")
    written = []
    for entry, source in zip(answer["entry"], sources, strict=True):
        location = entry["response"]["location"].split("/_history")[0]
        reference = "/".join(location.split("/")[-2:])
        async with http.get(f"{proxy}/{reference}") as r:
            seen = await _json(r, 200, f"read {reference} through fhircrypt")
        async with http.get(f"{upstream}/{reference}", headers=FHIR_JSON) as r:
            stored = await _json(r, 200, f"read {reference} at the server")
        written.append(Written(reference, source, seen, stored))
    return written


async def run(
    root: Path, port: int, upstream_port: int, *, full: bool, keep_running: bool, coverage: Path | None = None
) -> int:
    keyring = dev_keyring(root / ".fhircrypt" / "demo")
    needles = json.loads((FIXTURES / "needles.json").read_text())
    upstream = await UpstreamServer(port=upstream_port).start_async()
    runner: web.AppRunner | None = None
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{upstream.base_url}/Organization", json=ORGANIZATION, headers=FHIR_JSON) as r:
                organization_id = (await _json(r, 201, "registering the Organization"))["id"]
            values = {"FHIRCRYPT_ORGANIZATION_ID": organization_id, "FHIRCRYPT_BPJS_SYSTEM": BPJS_SYSTEM}
            policy = compile_text((root / POLICY).read_text(), POLICY, values)
            policy.require_configured()
            settings = Settings(
                upstream=upstream.base_url,
                policy=POLICY,
                keyring="",
                auth="none",
                public_base_url="http://127.0.0.1:0/fhir/R4",
            )
            runner = web.AppRunner(create_app(settings, policy, keyring), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            proxy = f"http://127.0.0.1:{runner.addresses[0][1]}/fhir/R4"
            runner.app[RUNTIME].public_base = proxy  # the real port is known only now
            print(report.header(proxy, upstream.base_url, policy.name, organization_id))
            written = await _write(http, proxy, upstream.base_url, organization_id)
        directory = {f"Organization/{organization_id}", *(w.reference for w in written if not w.source)}
        leaks = report.leaks(written, needles, upstream.dump(), directory)
        width = shutil.get_terminal_size((160, 40)).columns
        print(report.summary(written, needles, leaks))
        print(report.sides(written, width) if full else report.excerpt(written, width))
        if coverage is not None:  # what the policy leaves in the clear on the demo's data (docs/coverage-example.html)
            types = tuple(sorted({w.reference.split("/")[0] for w in written} | {"Organization"}))
            out = Outputs(str(coverage.with_suffix(".json")), str(coverage))
            await scan_upstream(Connection(upstream.base_url), Scan(policy), Options(types=types), None, out)
        if keep_running:
            patient = next(w.reference for w in written if w.reference.startswith("Patient/"))
            print(report.try_it(proxy, upstream.base_url, patient, NIK))
            await asyncio.Event().wait()
        return 1 if any(leaks.values()) else 0
    except DemoError as exc:
        print(f"demo failed: {exc}")
        return 1
    finally:
        if runner is not None:
            await runner.cleanup()
        upstream.stop()
