"""The PHI sentinel (detectors on what the proxy forwards in the clear) and the shipped policies'
deployment variables (no placeholder an operator can forget)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import orjson
import pytest
from prometheus_client import REGISTRY

from proxy.policy.compiler import compile_file, compile_text
from proxy.policy.loader import PolicyError
from proxy.server import check_startup
from proxy.transform.sentinel import detect, valid_nik
from tests.conftest import FHIR_JSON, ROOT, assert_no_plaintext, make_settings

NIK = "3171011208900001"  # DKI Jakarta (31), Jakarta Selatan (71), district 01, born 12-08-1990, male
NIK_WOMAN = "3273015208900002"  # Jawa Barat, Kota Bandung; day 52 = 12 + 40
BPJS = "0001234567890"
IHS = "P02478375538"

# --------------------------------------------------------------------------- detectors


@pytest.mark.parametrize(
    "nik",
    [
        NIK,
        NIK_WOMAN,
        "1101010101000001",  # Aceh, 1 January 2000
        "9601012902040001",  # Papua Barat Daya (2022), 29 February 2004 (leap year)
        "5171017112990001",  # Bali; a woman born 31-12-1999
        # SATUSEHAT's published sandbox patients (satusehat.kemkes.go.id/platform/docs/id/fhir/resources/patient)
        "9271060312000001",
        "9204014804000002",
        "9104224509000003",
    ],
)
def test_valid_niks_are_recognised(nik):
    assert valid_nik(nik)
    assert detect(f"pasien NIK {nik} datang sendiri") == "nik"
    assert detect(f"{nik[:4]} {nik[4:8]} {nik[8:12]} {nik[12:]}") == "nik"  # as printed on the KTP
    assert detect(f"NIK-{nik}") == detect(f"nik:{nik}") == detect(f"(NIK={nik})") == "nik"  # behind a label


@pytest.mark.parametrize(
    ("nik", "why"),
    [
        ("1071011208900001", "province 10 does not exist"),
        ("2071011208900001", "province 20 does not exist"),
        ("9771011208900001", "province 97 does not exist"),
        ("3100011208900001", "regency 00"),
        ("3171001208900001", "district 00"),
        ("3171013208900001", "day 32"),
        ("3171017208900001", "women's day 72 is day 32"),
        ("3171014008900001", "day 40 is neither a man's nor a woman's day"),
        ("3171011213900001", "month 13"),
        ("3171013002900001", "30 February"),
        ("3171012902010001", "29 February 2001"),
        ("3171013104900001", "31 April"),
        ("3171011208900000", "serial 0000"),
        ("317101120890001", "15 digits"),
    ],
)
def test_invalid_niks_are_not(nik, why):
    assert not valid_nik(nik), why
    assert detect(f"nomor {nik}") is None, why


@pytest.mark.parametrize(
    "text",
    [
        "Hb 12.5 g/dL, Ht 38%, leukosit 11.200/uL, trombosit 250.000/uL",
        "TD 120/80 mmHg, nadi 88 x/menit, suhu 37.8 C, SpO2 98%",
        "Kontrol 2024-08-12 pukul 08:30; hasil lab 12-08-2024 10:30",
        "LOINC 718-7, 8480-6, 8462-4; ICD-10 E11.9, I10, A15.0; SNOMED 38341003",
        "Accession 9912345678901234",  # 16 digits, province 99 does not exist
        "Accession 1012345678901234",
        "Specimen barcode 31710112089000011",  # 17 digits: not a NIK inside
        "kreatinin 1.2345678901234567 mg/dL",  # a long decimal
        "Amoxicillin 500 mg 3x1 selama 7 hari, batch 2308154401",
        "glukosa 0.8123456 mmol/L",
        "Urin protein +2, keton +1",
        "RM-2024-000123",
        "order 2023-3273012903870002",  # a valid NIK structure inside a digit-dash-digit run
        "lot 31-3273012903870002-7",
    ],
)
def test_realistic_clinical_text_is_not_flagged(text):
    assert detect(text) is None


@pytest.mark.parametrize(
    ("text", "detector"),
    [
        (f"kartu BPJS {BPJS}", "bpjs"),
        (f"IHS {IHS}", "ihs"),
        ("Nomor IHS P03647103112 (sandbox)", "ihs"),
        ("IHS-P03647103112", "ihs"),
        (f"BPJS-{BPJS}", "bpjs"),
        ("hubungi 0812-3456-7890", "phone"),
        ("telp +62 812 3456 7890", "phone"),
        ("WA 6281234567890", "phone"),
        ("US contact +1 415 555 2671", "phone"),
        ("email budi.santoso@example.co.id", "email"),
    ],
)
def test_other_detectors(text, detector):
    assert detect(text) == detector


def test_names_are_words_of_the_request_names_only():
    names = frozenset({"budi", "santoso"})
    assert detect("Pasien Budi mengeluh pusing", names) == "name"
    assert detect("pasien SANTOSO kontrol", names) == "name"
    assert detect("Budiman datang", names) is None  # a word, not a substring
    assert detect("Pasien Budi mengeluh pusing") is None


# --------------------------------------------------------------------------- policy


POLICY = """
fhircrypt-policy: 1
name: sentinel-test
groups: {identity: {}, demographics: {}, clinical: {}}
sentinel: {nik: {mode}, bpjs: {mode}, ihs: {mode}, phone: {mode}, email: {mode}, name: {mode}}
resources:
  Patient:
    elements:
      - {path: identifier.where(system='https://fhir.kemkes.go.id/id/nik').value, group: identity, id: nik}
      - {path: name, group: demographics, id: name, search: {params: [name], prefix: 3}}
      - {path: address.line, group: demographics}
  Observation:
    elements:
      - {path: value, group: clinical}
operations:
  validate: {parameters: [profile]}
"""


def policy(mode: str, group: str = ""):
    text = POLICY.replace("name: {mode}}", "name: {mode}" + group + "}").replace("{mode}", mode)
    return compile_text(text, f"sentinel-{mode}.yaml")


def test_encrypt_needs_a_group_to_read_back_what_it_seals():
    with pytest.raises(PolicyError, match="encrypt needs a group"):
        policy("encrypt")


def test_without_the_block_every_detector_reports():
    text = "\n".join(line for line in POLICY.splitlines() if not line.startswith("sentinel:"))
    compiled = compile_text(text, "no-block.yaml")
    assert set(compiled.sentinel.actions.values()) == {"report"}
    assert compiled.sentinel.name_keys == {"Patient": ("name",)}


# --------------------------------------------------------------------------- through the proxy


def observation_with_note(text: str) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "Keluhan"},
        "valueString": "stabil",
        "note": [{"text": text}],
    }


def flag_with_text(text: str) -> dict:  # Flag: a type the policy does not cover at all
    return {"resourceType": "Flag", "status": "active", "code": {"text": text}, "subject": {"display": "x"}}


def transaction_with_name_in_note() -> dict:
    patient = {"resourceType": "Patient", "name": [{"family": "Santoso", "given": ["Budi"]}]}
    note = observation_with_note("Pasien Budi mengeluh pusing sejak kemarin")
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:p1", "resource": patient, "request": {"method": "POST", "url": "Patient"}},
            {"resource": note, "request": {"method": "POST", "url": "Observation"}},
        ],
    }


ENTRY = "Bundle.entry[0].request: "  # a refusal in a Bundle entry is located at the entry; a report names the parameter

# (request: method, url, body, content type; the needle that must not leave on refusal; the path named; detector)
CASES = {
    "NIK in Observation.note (a clear element)": (
        ("POST", "/fhir/R4/Observation", observation_with_note(f"NIK pasien {NIK}"), FHIR_JSON),
        NIK,
        "Observation.note[0].text",
        "nik",
    ),
    "NIK in an uncovered type": (
        ("POST", "/fhir/R4/Flag", flag_with_text(f"KTP {NIK_WOMAN} hilang"), FHIR_JSON),
        NIK_WOMAN,
        "Flag.code.text",
        "nik",
    ),
    "a name repeated in a clear element": (
        ("POST", "/fhir/R4", transaction_with_name_in_note(), FHIR_JSON),
        "mengeluh",
        "Observation.note[0].text",
        "name",
    ),
    "a NIK in a clear search parameter": (
        ("GET", f"/fhir/R4/Patient?address-city={NIK}", None, FHIR_JSON),
        NIK,
        "query: search parameter 'address-city'",
        "nik",
    ),
    "a NIK in a search of a batch entry": (
        (
            "POST",
            "/fhir/R4",
            {
                "resourceType": "Bundle",
                "type": "batch",
                "entry": [{"request": {"method": "GET", "url": f"Patient?address-city={NIK}"}}],
            },
            FHIR_JSON,
        ),
        NIK,
        f"{ENTRY}query: search parameter 'address-city'",
        "nik",
    ),
    "an e-mail address in an operation parameter": (
        (
            "POST",
            "/fhir/R4/Flag/$validate",
            {"resourceType": "Parameters", "parameter": [{"name": "profile", "valueString": "budi@example.co.id"}]},
            FHIR_JSON,
        ),
        "budi@example.co.id",
        "$validate.parameter[0].valueString",
        "email",
    ),
    "a BPJS number in a JSON Patch of an uncovered type": (
        (
            "PATCH",
            "/fhir/R4/Flag/f1",
            [{"op": "replace", "path": "/code/text", "value": f"BPJS {BPJS}"}],
            {"Content-Type": "application/json-patch+json"},
        ),
        BPJS,
        "the patch document[0].value",
        "bpjs",
    ),
}


def _reports(detector: str) -> float:
    return REGISTRY.get_sample_value("fhircrypt_sentinel_reports_total", {"detector": detector}) or 0.0


async def _send(client, request):
    method, url, body, headers = request
    data = orjson.dumps(body) if body is not None else None
    return await client.request(method, url, data=data, headers=headers)


# Under encrypt, the hits in written resources of covered types are sealed; the rest cannot be and is refused
SEALED = {"NIK in Observation.note (a clear element)", "a name repeated in a clear element"}


@pytest.mark.parametrize("mode", ["refuse", "encrypt", "report", "off"])
@pytest.mark.parametrize("case", list(CASES))
async def test_each_case_ends_refused_sealed_reported_or_forwarded_as_configured(
    proxy_for, clean_upstream, caplog, case, mode
):
    request, needle, path, detector = CASES[case]
    client = await proxy_for(clean_upstream.base_url, policy(mode, ", group: identity"))
    before = _reports(detector)
    with caplog.at_level(logging.WARNING, logger="fhircrypt"):
        resp = await _send(client, request)
    text = await resp.text()
    if mode == "encrypt" and case in SEALED:
        assert resp.status in (200, 201), text
        assert_no_plaintext(clean_upstream.dump(), [needle])
        assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), [needle])
        assert _reports(detector) == before
        return
    if mode in ("refuse", "encrypt"):
        assert resp.status == 400, text
        diagnostics = (await resp.json())["issue"][0]["diagnostics"]
        assert diagnostics.startswith(f"{path}: ") and f"(sentinel.{detector}: {mode}" in diagnostics, diagnostics
        assert needle not in text
        assert clean_upstream.requests() == [] and clean_upstream.dump() == []
        return
    assert resp.status != 400 or "sentinel" not in text, text  # forwarded (the PATCH target may not exist: 404)
    assert clean_upstream.requests(), "nothing was forwarded"
    reported = [r for r in caplog.records if getattr(r, "event", None) == "sentinel"]
    if mode == "report":
        assert _reports(detector) == before + 1
        assert [(r.detectors, r.paths) for r in reported] == [
            ({detector: 1}, [{"detector": detector, "path": path.removeprefix(ENTRY), "count": 1}])
        ]
        assert all(needle not in r.getMessage() and needle not in str(r.__dict__) for r in reported)
    else:
        assert _reports(detector) == before and reported == []


async def test_a_name_sealed_in_the_patient_and_clear_in_the_same_patient_is_not_a_secret(proxy_for, clean_upstream):
    """A policy that encrypts only name.family leaves given names readable: those are no secret,
    so the same word elsewhere in the request is not a hit."""
    text = POLICY.replace("{mode}", "refuse").replace(
        "path: name, group: demographics, id: name, search: {params: [name], prefix: 3}",
        "path: name.family, group: demographics",
    )
    client = await proxy_for(clean_upstream.base_url, compile_text(text, "family-only.yaml"))
    patient = {
        "resourceType": "Patient",
        "name": [{"family": "Santoso", "given": ["Budi"]}],
        "address": [{"text": "rumah Budi"}],
    }
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    patient["address"] = [{"text": "rumah keluarga Santoso"}]
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert resp.status == 400 and "Patient.address[0].text" in await resp.text()


async def test_encrypted_values_and_blind_indexes_are_never_hits(proxy_for, clean_upstream, satusehat):
    """The shipped policy refuses NIKs in clear elements, yet a NIK in its encrypted place is fine:
    what is checked is the resource after encryption."""
    client = await proxy_for(clean_upstream.base_url, satusehat)
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.kemkes.go.id/id/nik", "value": NIK}],
        "name": [{"text": "Budi Santoso"}],
        "telecom": [{"system": "phone", "value": "081234567890"}],
    }
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    assert_no_plaintext(clean_upstream.dump(), [NIK, "Santoso", "081234567890"])


async def test_the_sentinel_catches_what_an_open_closed_default_lets_through(proxy_for, clean_upstream):
    """identifiers.unlisted_systems: allow with the shipped sentinel: a BPJS number under an unknown
    system is still kept from the server (refused), by a second, independent line of defence."""
    from tests.test_closed_defaults import SATUSEHAT, variant

    client = await proxy_for(clean_upstream.base_url, variant("allow", "encrypt", SATUSEHAT, sentinel="refuse"))
    patient = {"resourceType": "Patient", "identifier": [{"system": "https://simrs.example/bpjs", "value": BPJS}]}
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)
    assert resp.status == 400 and "(sentinel.bpjs: refuse)" in await resp.text()
    assert clean_upstream.requests() == []


# --------------------------------------------------------------------------- deployment variables

VARIABLES = {
    "satusehat": ("FHIRCRYPT_ORGANIZATION_ID", "FHIRCRYPT_BPJS_SYSTEM"),
    "hipaa": ("FHIRCRYPT_MRN_SYSTEM", "FHIRCRYPT_MEDICAID_SYSTEM"),
}
CONFIGURED = {
    "FHIRCRYPT_ORGANIZATION_ID": "10000004",
    "FHIRCRYPT_BPJS_SYSTEM": "https://simrs.rsud-melati.id/id/bpjs",
    "FHIRCRYPT_MRN_SYSTEM": "urn:oid:2.16.840.1.113883.3.9999.1",
    "FHIRCRYPT_MEDICAID_SYSTEM": "urn:oid:2.16.840.1.113883.4.3.25.1",
}


@pytest.mark.parametrize("name", list(VARIABLES))
def test_the_shipped_policies_carry_variables_not_placeholders(name):
    path = ROOT / "policies" / f"{name}.yaml"
    unset = compile_file(path, {})
    codes = {f.code for f in unset.findings}
    assert "placeholder" not in codes
    messages = [f.message for f in unset.findings if f.code == "variable-unset"]
    assert all(any(v in m for m in messages) for v in VARIABLES[name]), messages
    with pytest.raises(PolicyError, match=VARIABLES[name][0]):
        unset.require_configured()
    configured = compile_file(path, CONFIGURED)
    configured.require_configured()
    assert not [f for f in configured.findings if f.code in ("variable-unset", "placeholder")]


def test_the_organisation_id_lands_in_the_mrn_system():
    rp = compile_file(ROOT / "policies" / "satusehat.yaml", CONFIGURED).for_type("Patient")
    mrn = next(el for el in rp.elements if el.field_id == "mrn")
    assert mrn.nav[-1].criteria == (("system", "http://sys-ids.kemkes.go.id/mr/10000004"),)


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRCRYPT_")}
    return {**env, **values}


@pytest.mark.parametrize("name", list(VARIABLES))
def test_policy_check_strict_fails_on_an_unset_variable_and_passes_when_configured(name):
    cmd = [sys.executable, "-m", "proxy", "policy", "check", str(ROOT / "policies" / f"{name}.yaml"), "--strict"]
    unset = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert unset.returncode == 1 and all(v in unset.stdout for v in VARIABLES[name]), unset.stdout
    configured = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(**CONFIGURED))
    assert configured.returncode == 0, configured.stdout + configured.stderr


def test_serve_refuses_to_start_naming_the_unset_variable(tmp_path, monkeypatch):
    ring = tmp_path / "ring.json"
    ring.write_text("{}")
    monkeypatch.delenv("FHIRCRYPT_BPJS_SYSTEM")
    settings = make_settings("http://127.0.0.1:1/fhir", policy=str(ROOT / "policies" / "satusehat.yaml"))
    settings = settings.__class__(**{**settings.__dict__, "keyring": str(ring)})
    problem = check_startup(settings)
    assert problem is not None and "FHIRCRYPT_BPJS_SYSTEM" in problem and "FHIRCRYPT_ORGANIZATION_ID" not in problem


def test_a_location_never_carries_a_client_key_that_could_be_a_value():
    from proxy.outcome import FhirError
    from proxy.policy.sentinel import SentinelSettings
    from proxy.transform.sentinel import check_value

    refuse = SentinelSettings(actions={"nik": "refuse"})
    with pytest.raises(FhirError) as caught:
        check_value(refuse, {"ktp": {NIK_WOMAN: {"note": f"NIK {NIK}"}}}, "patch[0].value")
    text = str(caught.value.issues[0].diagnostics) + str(caught.value.issues[0].expression)
    assert "patch[0].value.ktp.?.note:" in text and NIK_WOMAN not in text and NIK not in text


def test_refusing_detectors_run_first_and_detectors_that_are_off_never_hide_others():
    from proxy.outcome import FhirError
    from proxy.policy.sentinel import SentinelSettings
    from proxy.transform.sentinel import check_value

    text = f"telp 0812-3456-7890, NIK {NIK}"
    with pytest.raises(FhirError, match=r"sentinel\.nik: refuse"):
        check_value(SentinelSettings(actions={"phone": "report", "nik": "refuse"}), text, "x")
    with pytest.raises(FhirError, match=r"sentinel\.phone: refuse"):
        check_value(SentinelSettings(actions={"nik": "off", "phone": "refuse"}), text, "x")
    check_value(SentinelSettings(actions={"nik": "off", "email": "refuse"}), text, "x")  # nothing to refuse


async def test_the_hits_of_one_request_are_logged_in_one_line_and_each_is_counted(proxy_for, clean_upstream, caplog):
    """A transaction of many resources may report hundreds of values: one log line for the request
    (counts by detector, the paths with their counts), while the metric counts every hit."""
    flags = [{**flag_with_text(f"KTP {NIK} hilang"), "subject": {"display": "hubungi 0812-3456-7890"}}] * 30
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": f, "request": {"method": "POST", "url": "Flag"}} for f in flags],
    }
    client = await proxy_for(clean_upstream.base_url, policy("report"))
    before = _reports("nik"), _reports("phone")
    with caplog.at_level(logging.WARNING, logger="fhircrypt"):
        resp = await client.post("/fhir/R4", data=orjson.dumps(bundle), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "sentinel"]
    assert line.detectors == {"nik": 30, "phone": 30} and (_reports("nik"), _reports("phone")) == (
        before[0] + 30,
        before[1] + 30,
    )
    assert sorted(line.paths, key=lambda p: p["path"]) == [
        {"detector": "nik", "path": "Flag.code.text", "count": 30},
        {"detector": "phone", "path": "Flag.subject.display", "count": 30},
    ]
    assert line.more_paths == 0 and line.request_id == resp.headers["X-Request-ID"]
    # what the proxy put on the record (logging's own fields hold timings, where "3456" may occur by chance)
    standard = logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    ours = str({k: v for k, v in line.__dict__.items() if k not in standard}) + line.getMessage()
    assert NIK not in ours and "3456" not in ours
