"""Closed defaults (issue 15): identifiers under systems and extensions under URLs the policy does not name.

Each case is written through the real proxy to the real upstream under the shipped SATUSEHAT
policy with ``identifiers.unlisted_systems`` and ``extensions.unlisted`` set to each mode, and
must end encrypted, refused or forwarded as configured; what the upstream stores is scanned.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import orjson
import pytest

from proxy.keymgmt.keyring import Keyring
from proxy.migrate.assess import Plan, State, assess
from proxy.policy.closed import canonical
from proxy.policy.compiler import CompiledPolicy, compile_text
from proxy.policy.loader import PolicyError
from proxy.transform import markers as mk
from proxy.transform.masked import has_masked, merge_masked
from proxy.transform.records import ALL_GROUPS, ReadReport, decrypt_resource, encrypt_resource
from tests import test_auth
from tests.conftest import FHIR_JSON, ROOT, assert_no_plaintext
from tests.test_auth import AUDIENCE, bearer

issuer = test_auth.issuer  # the real OpenID provider of the role matrix (a fixture)

SATUSEHAT = (ROOT / "policies" / "satusehat.yaml").read_text()
NIK_SYSTEM = "https://fhir.kemkes.go.id/id/nik"
UNKNOWN_BPJS = "https://simrs.rs-contoh.id/id/no-kartu-bpjs"
RELIGION_URL = "http://hl7.org/fhir/StructureDefinition/patient-religion"

MISCASED_NIK = "3171022509900011"
BPJS = "0002223334445"
REF_NIK = "3171026605850003"
RELIGION = "Kristen Protestan"
CONTAINED_BPJS = "0009876543210"


SENTINEL_LINE = (
    "sentinel: {nik: refuse, bpjs: refuse, ihs: refuse, phone: report, email: report, "
    "name: encrypt, group: demographics}\n"
)


def variant(identifiers: str, extensions: str, text: str = SATUSEHAT, sentinel: str = "off") -> CompiledPolicy:
    """The shipped SATUSEHAT policy with the two closed defaults set as given (and, by default, the
    PHI sentinel off, so that what is tested is the closed default alone: test_sentinel.py has both)."""
    assert text.count(SENTINEL_LINE) == 1
    text = text.replace(SENTINEL_LINE, f"sentinel: {{nik: {sentinel}, bpjs: {sentinel}, ihs: {sentinel}}}\n")
    out = text.replace("  unlisted_systems: encrypt\n", f"  unlisted_systems: {identifiers}\n")
    out = out.replace("  unlisted: encrypt\n", f"  unlisted: {extensions}\n")
    assert out.count(f"unlisted_systems: {identifiers}") == 1 and out.count(f"  unlisted: {extensions}") == 1
    return compile_text(out, f"satusehat-{identifiers}-{extensions}.yaml")


def patient_miscased_nik() -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.kemkes.go.id/id/NIK/", "value": MISCASED_NIK}],
        "gender": "female",
    }


def patient_unknown_bpjs() -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": UNKNOWN_BPJS, "value": BPJS}], "gender": "male"}


def encounter_with_nik_reference() -> dict:
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "Patient/p-ref", "identifier": {"system": NIK_SYSTEM, "value": REF_NIK}},
    }


def patient_religion() -> dict:
    return {
        "resourceType": "Patient",
        "extension": [
            {
                "url": RELIGION_URL,
                "valueCodeableConcept": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v3-ReligiousAffiliation", "code": "1013"}
                    ],
                    "text": RELIGION,
                },
            }
        ],
        "gender": "male",
    }


ETHNICITY_URL = "https://simrs.rs-contoh.id/fhir/StructureDefinition/suku"
ETHNICITY = "Minangkabau"
GUARDIAN_RELIGION = "Buddha Theravada"
WARD_NOTE = "pasien tahanan, dijaga polisi"


def patient_contact_religion() -> dict:
    """An extension on a backbone element (Patient.contact), which the policy does not encrypt."""
    return {
        "resourceType": "Patient",
        "gender": "female",
        "contact": [
            {
                "extension": [{"url": RELIGION_URL, "valueString": GUARDIAN_RELIGION}],
                "organization": {"reference": "Organization/o1"},
            }
        ],
    }


def encounter_location_note() -> dict:
    """An EMR's own extension on a data type one level down (Encounter.location.period)."""
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "location": [
            {
                "location": {"reference": "Location/ward-3"},
                "period": {
                    "start": "2026-12-01",
                    "extension": [{"url": ETHNICITY_URL, "valueString": f"{ETHNICITY}; {WARD_NOTE}"}],
                },
            }
        ],
    }


def observation_with_contained_patient() -> dict:
    return {
        "resourceType": "Observation",
        "contained": [
            {"resourceType": "Patient", "id": "p1", "identifier": [{"system": UNKNOWN_BPJS, "value": CONTAINED_BPJS}]}
        ],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": "#p1"},
    }


# name: (resource, needle, setting that decides, path a refusal names, system or URL it names)
CASES = {
    "BPJS under an unknown system": (patient_unknown_bpjs, BPJS, "identifiers", "Patient.identifier[0]", UNKNOWN_BPJS),
    "NIK inside Reference.identifier": (
        encounter_with_nik_reference,
        REF_NIK,
        "identifiers",
        "Encounter.subject.identifier",
        NIK_SYSTEM,
    ),
    "religion in an unlisted extension": (
        patient_religion,
        RELIGION,
        "extensions",
        "Patient.extension[0]",
        RELIGION_URL,
    ),
    "religion in an extension of a backbone element": (
        patient_contact_religion,
        GUARDIAN_RELIGION,
        "extensions",
        "Patient.contact[0].extension[0]",
        RELIGION_URL,
    ),
    "free text in an extension of a data type": (
        encounter_location_note,
        ETHNICITY,
        "extensions",
        "Encounter.location[0].period.extension[0]",
        ETHNICITY_URL,
    ),
    "BPJS in a contained Patient": (
        observation_with_contained_patient,
        CONTAINED_BPJS,
        "identifiers",
        "Observation.contained[0].identifier[0]",
        UNKNOWN_BPJS,
    ),
}


async def _post(client, resource: dict):
    return await client.post(f"/fhir/R4/{resource['resourceType']}", data=orjson.dumps(resource), headers=FHIR_JSON)


@pytest.mark.parametrize("mode", ["encrypt", "refuse", "allow"])
@pytest.mark.parametrize("case", list(CASES))
async def test_each_case_ends_encrypted_refused_or_forwarded_as_configured(proxy_for, clean_upstream, case, mode):
    make, needle, setting, path, named = CASES[case]
    policy = variant(mode if setting == "identifiers" else "encrypt", mode if setting == "extensions" else "encrypt")
    client = await proxy_for(clean_upstream.base_url, policy)
    resource = make()
    resp = await _post(client, resource)
    if mode == "refuse":
        assert resp.status == 400, await resp.text()
        diagnostics = (await resp.json())["issue"][0]["diagnostics"]
        assert diagnostics.startswith(f"{path}:") and f"'{named}'" in diagnostics, diagnostics
        assert needle not in await resp.text()
        assert clean_upstream.requests() == [] and clean_upstream.dump() == []
        return
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    back = await (await client.get(f"/fhir/R4/{resource['resourceType']}/{created['id']}")).json()
    for key in ("id", "meta"):
        back.pop(key)
    assert back == resource  # the authorized reader (development mode) gets exactly what was written
    stored = clean_upstream.dump()
    if mode == "encrypt":
        assert_no_plaintext(stored, [needle])
        assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), [needle])
    else:
        assert needle in orjson.dumps(stored).decode()  # allow: today's behaviour, forwarded in the clear


@pytest.mark.parametrize("mode", ["encrypt", "refuse", "allow"])
async def test_a_miscased_nik_system_is_the_nik_encrypted_and_indexed_in_every_mode(proxy_for, clean_upstream, mode):
    client = await proxy_for(clean_upstream.base_url, variant(mode, mode))
    resource = patient_miscased_nik()
    resp = await _post(client, resource)
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert_no_plaintext(clean_upstream.dump(), [MISCASED_NIK])
    (stored,) = clean_upstream.dump()
    index_systems = {i["system"] for i in stored["identifier"] if "fhircrypt.dev" in i["system"]}
    assert index_systems == {"https://fhircrypt.dev/fhir/i/nik/identifier"}
    for system in (NIK_SYSTEM, "HTTPS://FHIR.KEMKES.GO.ID/id/nik/", "https://fhir.kemkes.go.id/id/%6Eik"):
        found = await (await client.get(f"/fhir/R4/Patient?identifier={system}|{MISCASED_NIK}")).json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [created["id"]], system
        assert found["entry"][0]["resource"]["identifier"] == resource["identifier"]
    assert MISCASED_NIK not in orjson.dumps(clean_upstream.requests()).decode()


async def test_bundles_and_patches_carry_the_closed_defaults(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, variant("encrypt", "encrypt"))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient_unknown_bpjs(), "request": {"method": "POST", "url": "Patient"}},
            {"resource": patient_religion(), "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    location = (await resp.json())["entry"][0]["response"]["location"]
    parts = location.split("/")
    pid = parts[parts.index("Patient") + 1]
    added = {"system": "https://other-insurer.example/member", "value": "MBR-5550001"}
    patch = [{"op": "add", "path": "/identifier/-", "value": added}]
    resp = await client.patch(
        f"/fhir/R4/Patient/{pid}", data=orjson.dumps(patch), headers={"Content-Type": "application/json-patch+json"}
    )
    assert resp.status == 200, await resp.text()
    back = await (await client.get(f"/fhir/R4/Patient/{pid}")).json()
    assert back["identifier"] == [{"system": UNKNOWN_BPJS, "value": BPJS}, added]
    assert_no_plaintext(clean_upstream.dump(), [BPJS, RELIGION, "MBR-5550001"])
    assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), [BPJS, RELIGION, "MBR-5550001"])

    clean_upstream.reset()
    refusing = await proxy_for(clean_upstream.base_url, variant("refuse", "refuse"))
    resp = await refusing.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 400 and (await resp.json())["issue"][0]["diagnostics"].startswith("Patient.identifier[0]: ")
    assert clean_upstream.requests() == []


async def test_searching_an_unlisted_system_is_refused_and_reaches_nothing(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, variant("encrypt", "encrypt"))
    resp = await client.get(f"/fhir/R4/Patient?identifier={UNKNOWN_BPJS}|{BPJS}")
    assert resp.status == 400
    assert "identifiers.unlisted_systems" in (await resp.json())["issue"][0]["diagnostics"]
    assert clean_upstream.requests() == []
    resp = await client.get("/fhir/R4/Encounter?subject=Patient/p-ref")  # references stay searchable
    assert resp.status == 200, await resp.text()


async def test_unauthorized_readers_get_the_closed_values_masked(proxy_for, clean_upstream, issuer):
    policy = variant("encrypt", "encrypt")
    writer = await proxy_for(clean_upstream.base_url, policy)
    resource = {**patient_unknown_bpjs(), "extension": patient_religion()["extension"]}
    created = await (await _post(writer, resource)).json()
    proxy = await proxy_for(clean_upstream.base_url, policy, auth="jwt", oidc_issuer=issuer.url, audience=AUDIENCE)

    async def read(role: str) -> dict:
        token = issuer.token(realm_access={"roles": [role]}, scope="user/*.rs")
        return await (await proxy.get(f"/fhir/R4/Patient/{created['id']}", headers=bearer(token))).json()

    physician = await read("physician")
    assert physician["identifier"] == resource["identifier"] and physician["extension"] == resource["extension"]
    pharmacist = await read("pharmacist")  # demographics, not identity
    assert pharmacist["extension"] == resource["extension"]
    assert pharmacist["identifier"] == [
        {
            "system": UNKNOWN_BPJS,
            "_value": {
                "extension": [
                    {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}
                ]
            },
        }
    ]
    billing = await read("billing")  # insurance only
    assert billing["extension"] == [  # a simple extension stays valid masked: the marker sits in its value[x]
        {
            "url": RELIGION_URL,
            "valueCodeableConcept": {
                "extension": [
                    {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}
                ]
            },
        }
    ]
    assert {"code": "MASKED"}.items() <= billing["meta"]["security"][0].items()
    assert BPJS not in orjson.dumps(billing).decode() and RELIGION not in orjson.dumps(billing).decode()


# --------------------------------------------------------------------------- policy check


def test_canonical_forms_fold_case_slash_and_escapes():
    assert canonical("HTTPS://Fhir.Kemkes.go.id/id/NIK/") == canonical(NIK_SYSTEM)
    assert canonical("https://fhir.kemkes.go.id/id/%6e%69k") == canonical(NIK_SYSTEM)
    assert (
        canonical("https://x.example/a%2fb")
        == canonical("https://x.example/a%2Fb")
        != canonical("https://x.example/a/b")
    )
    assert canonical("https://fhir.kemkes.go.id/id/nik-ibu") != canonical(NIK_SYSTEM)
    assert canonical("urn:oid:2.16.840.1.113883.4.3.25") == "urn:oid:2.16.840.1.113883.4.3.25"


def test_two_spellings_of_one_system_in_a_policy_are_a_load_error():
    text = SATUSEHAT.replace("  clear: []             #", "  clear: ['https://fhir.kemkes.go.id/id/NIK/']  #")
    with pytest.raises(PolicyError) as err:
        compile_text(text, "broken.yaml")
    assert "'https://fhir.kemkes.go.id/id/NIK/'" in str(err.value) and f"'{NIK_SYSTEM}'" in str(err.value)
    assert str(err.value).startswith("broken.yaml:")


def test_encrypt_needs_a_declared_group():
    with pytest.raises(PolicyError, match="encrypt needs a group"):
        compile_text(SATUSEHAT.replace("  group: identity\n  clear: []", "  clear: []"), "x.yaml")
    with pytest.raises(PolicyError, match="unknown group 'nobody'"):
        compile_text(SATUSEHAT.replace("  group: identity\n  clear: []", "  group: nobody\n  clear: []"), "x.yaml")


def _check(path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "proxy", "policy", "check", str(path), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_policy_check_flags_every_placeholder_and_near_miss_in_a_broken_copy(tmp_path):
    broken = SATUSEHAT.replace("id/nik-ibu'", "id/NIK-IBU'").replace("id/kk'", "id/KK/'")
    broken = broken.replace("  unlisted_systems: encrypt\n", "  unlisted_systems: allow\n")
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    relaxed, strict = _check(path), _check(path, "--strict")
    assert relaxed.returncode == 0, relaxed.stderr
    assert strict.returncode == 1 and strict.stdout == relaxed.stdout
    findings = [line.strip() for line in relaxed.stdout.splitlines() if line.startswith("  - warning")]
    codes = sorted(line.split("]")[0].removeprefix("- warning [") for line in findings)
    uses = broken.count("${FHIRCRYPT_")  # one finding per use of a deployment variable set to a placeholder
    assert codes == ["closed.identifiers-open", "near-miss-system", "near-miss-system"] + ["placeholder"] * uses
    near = [f for f in findings if "near-miss" in f]
    assert "'https://fhir.kemkes.go.id/id/NIK-IBU'" in near[0] and "'https://fhir.kemkes.go.id/id/nik-ibu'" in near[0]
    assert "'https://fhir.kemkes.go.id/id/KK/'" in near[1]
    assert any("REPLACE-WITH-ORGANIZATION-ID" in f for f in findings)
    assert sum("example-hospital" in f for f in findings) == broken.count("${FHIRCRYPT_BPJS_SYSTEM}")


def test_the_shipped_policies_close_both_defaults_and_fail_strict_only_on_their_placeholders():
    for name in ("satusehat", "hipaa"):
        result = _check(ROOT / "policies" / f"{name}.yaml", "--strict")
        warnings = [line for line in result.stdout.splitlines() if line.startswith("  - warning")]
        assert warnings and all("[placeholder]" in w for w in warnings), warnings
        assert result.returncode == 1
        assert "identifiers under systems the policy does not name: encrypt" in result.stdout
        assert "extensions the policy does not name: encrypt" in result.stdout


def test_a_masked_unlisted_value_written_back_is_restored_from_the_stored_version():
    """The masked write-back path (merge_masked) finds closed-default slots like listed ones."""
    policy = variant("encrypt", "encrypt")
    rp = policy.for_type("Patient")
    ring = Keyring.generate()
    original = {**patient_unknown_bpjs(), "extension": patient_religion()["extension"]}
    stored = copy.deepcopy(original)
    encrypt_resource(stored, rp, ring)
    masked = copy.deepcopy(stored)
    decrypt_resource(masked, rp, ring, frozenset({"insurance"}), policy.unenveloped, ReadReport())
    assert has_masked(masked, rp) and BPJS not in orjson.dumps(masked).decode()
    assert merge_masked(masked, copy.deepcopy(original), rp) == []
    assert masked.pop("meta") == {} and masked == original  # (the label's emptied meta is the caller's)


def test_policy_check_names_personal_data_a_policy_leaves_clear_and_accepts_a_stated_reason(tmp_path):
    """Types of the Patient compartment without a rule, and their HumanName/ContactPoint/Address/
    Attachment/Annotation elements no rule covers, are warnings; ``knowingly_clear`` with a reason
    turns one into info."""
    without_person = re.sub(r"\n  Person:.*?\n(?=  [A-Z])", "\n", SATUSEHAT, count=1, flags=re.S)
    assert without_person != SATUSEHAT
    policy = compile_text(without_person, "gap.yaml")
    clear = sorted(f.message.split(" ")[0] for f in policy.findings if f.code == "clear-phi-element")
    assert clear == ["Person.address", "Person.name", "Person.photo", "Person.telecom"]
    stated = without_person.replace(
        "knowingly_clear:\n", "knowingly_clear:\n  Person: the EMR never sends Person resources\n"
    )
    policy = compile_text(stated, "gap.yaml")
    assert not [f for f in policy.findings if f.code == "clear-phi-element"]
    assert any(f.code == "knowingly-clear" and f.message.startswith("Person.name") for f in policy.findings)
    for entry, error in (("Person: ''", "needs a reason"), ("Person.nickname: x", "not an R4 resource type")):
        broken = without_person.replace("knowingly_clear:\n", f"knowingly_clear:\n  {entry}\n")
        with pytest.raises(PolicyError, match=error):
            compile_text(broken, "broken.yaml")


def test_records_written_before_nested_extensions_were_closed_move_with_previous_policy():
    """fhircrypt 0.1 closed the resource's own extension list only. Its records with an unlisted extension
    on a backbone element hold it in the clear where the catch-all now expects ciphertext: they fail
    verification (masked, never returned as data) until reencrypt, given the policy with
    ``extensions.nested: false`` as the previous one, rewrites them; then they read back whole."""
    current = variant("encrypt", "encrypt")
    before = compile_text(
        SATUSEHAT.replace("  unlisted: encrypt\n", "  unlisted: encrypt\n  nested: false\n"), "satusehat-0.1.yaml"
    )
    assert any(f.code == "closed.nested-extensions-open" for f in before.findings)
    ring = Keyring.generate()
    written = patient_contact_religion()
    stored = copy.deepcopy(written)
    encrypt_resource(stored, before.resources["Patient"], ring)
    assert GUARDIAN_RELIGION in orjson.dumps(stored).decode()  # 0.1 left it in the clear

    report = ReadReport()
    read = copy.deepcopy(stored)
    decrypt_resource(read, current.resources["Patient"], ring, ALL_GROUPS, current.unenveloped, report)
    assert report.failures and GUARDIAN_RELIGION not in orjson.dumps(read).decode()
    assert assess(copy.deepcopy(stored), Plan(current, ring)).state is State.FAILED

    moved = assess(copy.deepcopy(stored), Plan(current, ring, previous=before))
    assert moved.state is State.OLD_POLICY and moved.replacement is not None
    assert GUARDIAN_RELIGION not in orjson.dumps(moved.replacement).decode()
    report = ReadReport()
    back = moved.replacement
    decrypt_resource(back, current.resources["Patient"], ring, ALL_GROUPS, current.unenveloped, report)
    assert not report.failures and back["contact"] == written["contact"]


def test_a_clear_extension_where_ciphertext_was_expected_is_masked_in_a_valid_form():
    """A simple extension found in the clear at a covered location (written around the proxy, or before
    the location was closed) is masked, not returned; a primitive value's mask goes to ``_value…`` (a
    JSON object in ``valueString`` would be invalid FHIR), a complex value's inside the value."""
    policy = variant("encrypt", "encrypt")
    ring = Keyring.generate()
    stored = {"resourceType": "Patient", "gender": "male"}
    encrypt_resource(stored, policy.resources["Patient"], ring)
    stored["extension"] = [
        {"url": RELIGION_URL, "valueString": RELIGION},
        {"url": ETHNICITY_URL, "valueCodeableConcept": {"text": ETHNICITY}},
    ]
    report = ReadReport()
    decrypt_resource(stored, policy.resources["Patient"], ring, ALL_GROUPS, policy.unenveloped, report)
    assert report.failures
    religion, ethnicity = stored["extension"]
    assert set(religion) == {"url", "_valueString"} and set(ethnicity) == {"url", "valueCodeableConcept"}
    assert religion["_valueString"] == ethnicity["valueCodeableConcept"] == mk.masked_form()
