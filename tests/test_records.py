"""The pure core: round trips, the at-rest form, masking and integrity, without HTTP."""

from __future__ import annotations

import copy

import orjson
import pytest

from proxy.auth.caller import Caller
from proxy.auth.decision import key_holder, unscoped
from proxy.policy.access import CallerGrants
from proxy.transform import markers as mk
from proxy.transform.records import ALL_GROUPS, ReadReport, ShapeError, decrypt_resource, encrypt_resource
from tests.conftest import unit_policy

POLICY = unit_policy()
NIK = "3201019988770001"
PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"versionId": "1", "tag": [{"system": "urn:x", "code": "keep"}]},
    "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Wibisono Kartasasmita</div>'},
    "extension": [
        {"url": "https://fhir.kemkes.go.id/r4/StructureDefinition/birthPlace", "valueAddress": {"city": "Purwokerto"}}
    ],
    "identifier": [
        {"system": "https://fhir.kemkes.go.id/id/ihs-number", "value": "P00000001"},
        {"system": "https://fhir.kemkes.go.id/id/nik", "value": NIK},
    ],
    "name": [{"use": "official", "text": "Wibisono Kartasasmita", "family": "Kartasasmita", "given": ["Wibisono"]}],
    "telecom": [{"system": "phone", "value": "+62-811-555-0199"}],
    "gender": "male",
    "birthDate": "1971-02-03",
    "_birthDate": {"id": "bd"},
    "address": [{"line": ["Jl. Cempaka Putih 7", "RT 03"], "_line": [None, {"id": "l2"}], "city": "Sokaraja"}],
    "managingOrganization": {"reference": "Organization/o1", "display": "RS Kartika Husada"},
}
NEEDLES = [
    NIK,
    "Wibisono",
    "Kartasasmita",
    "Purwokerto",
    "555-0199",
    "1971-02-03",
    "Cempaka",
    "RT 03",
    "Sokaraja",
    "Kartika Husada",
]
OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "Hemoglobin"},
    "valueQuantity": {"value": 9.87, "unit": "g/dL"},
    "component": [{"code": {"text": "a"}, "valueString": "reaktif-xyz"}, {"code": {"text": "b"}}],
    "note": [{"text": "anemia ringan qqq"}],
    "subject": {"reference": "Patient/p1", "display": "Wibisono K"},
}


def encrypted(resource: dict, keyring) -> dict:
    stored = copy.deepcopy(resource)
    encrypt_resource(stored, POLICY.for_type(resource["resourceType"]), keyring)
    return orjson.loads(orjson.dumps(stored))  # what a server stores and returns


def read(stored: dict, keyring, grants=ALL_GROUPS) -> tuple[dict, ReadReport]:
    out, report = copy.deepcopy(stored), ReadReport()
    decrypt_resource(out, POLICY.for_type(out["resourceType"]), keyring, grants, POLICY.unenveloped, report)
    return out, report


@pytest.mark.parametrize("resource", [PATIENT, OBSERVATION])
def test_round_trip_returns_exactly_what_was_written(resource, keyring):
    stored = encrypted(resource, keyring)
    back, report = read(stored, keyring)
    assert back == resource
    assert report.failures == [] and report.masked == 0


def test_at_rest_form_holds_no_plaintext_and_keeps_what_servers_need(keyring):
    stored = encrypted(PATIENT, keyring)
    text = orjson.dumps(stored).decode()
    assert not [n for n in NEEDLES if n in text]
    assert stored["identifier"][0] == PATIENT["identifier"][0]  # not covered
    nik = stored["identifier"][1]
    assert nik["system"] == "https://fhir.kemkes.go.id/id/nik" and "value" not in nik
    assert nik["_value"]["extension"][0] == mk.dar_masked()
    assert stored["_birthDate"]["extension"][1]["url"] == mk.CIPHERTEXT_URL and "birthDate" not in stored
    assert stored["address"][0]["line"] == [None, None] and len(stored["address"][0]["_line"]) == 2
    birth_place = stored["extension"][0]  # a simple extension keeps its value[x], which holds only the markers
    assert birth_place["url"].endswith("birthPlace") and set(birth_place) == {"url", "valueAddress"}
    assert birth_place["valueAddress"]["extension"][0] == mk.dar_masked()
    assert stored["extension"][-1]["url"] == mk.ENVELOPE_URL
    assert stored["managingOrganization"]["reference"] == "Organization/o1"
    assert stored["text"]["div"] == mk.NEUTRAL_DIV
    assert stored["gender"] == "male" and stored["id"] == "p1"
    assert {"system": mk.TAG_SYSTEM, "code": mk.TAG_CODE} in stored["meta"]["tag"]
    obs = encrypted(OBSERVATION, keyring)
    assert "valueQuantity" not in obs and obs["dataAbsentReason"]["coding"][0]["code"] == "masked"
    assert obs["component"][1] == OBSERVATION["component"][1]


def test_each_write_uses_a_fresh_data_key_and_nonces(keyring):
    a, b = encrypted(PATIENT, keyring), encrypted(PATIENT, keyring)
    assert a["_birthDate"] != b["_birthDate"] and a["extension"][-1] != b["extension"][-1]


def test_callers_without_a_group_get_the_fhir_masked_form(keyring):
    stored = encrypted(PATIENT, keyring)
    out, report = read(stored, keyring, grants=frozenset({"identity"}))
    assert out["identifier"][1]["value"] == NIK
    assert "name" in out and out["name"][0] == {"extension": [mk.dar_masked()]}
    assert "birthDate" not in out and out["_birthDate"] == {"extension": [mk.dar_masked()]}
    assert out["text"]["div"] == mk.NEUTRAL_DIV  # the narrative needs every group
    assert {"system": mk.MASKED_SECURITY_SYSTEM, "code": "MASKED", "display": "masked"} in out["meta"]["security"]
    text = orjson.dumps(out).decode()
    assert mk.CIPHERTEXT_URL not in text and mk.ENVELOPE_URL not in text and mk.TAG_SYSTEM not in text
    assert report.masked >= 5 and not report.failures


def _assert_nothing_returned_as_data(out: dict, report: ReadReport, needles=NEEDLES) -> None:
    assert report.failures, "an integrity failure must be reported"
    text = orjson.dumps(out).decode()
    assert not [n for n in needles if n in text]
    assert mk.CIPHERTEXT_URL not in text


def _ct_ext(element: dict) -> dict:
    return next(e for e in element["extension"] if e["url"] == mk.CIPHERTEXT_URL)


def test_changed_ciphertext_is_never_returned(keyring):
    stored = encrypted(PATIENT, keyring)
    ext = _ct_ext(stored["_birthDate"])
    ext["valueString"] = ext["valueString"][:-4] + "AAAA"
    out, report = read(stored, keyring)
    _assert_nothing_returned_as_data(out, report)


def test_ciphertext_moved_between_elements_is_never_returned(keyring):
    stored = encrypted(PATIENT, keyring)
    line = stored["address"][0]["_line"]
    line[0], line[1] = line[1], line[0]
    out, report = read(stored, keyring)
    _assert_nothing_returned_as_data(out, report)


def test_ciphertext_moved_between_resources_is_never_returned(keyring):
    a, b = encrypted(PATIENT, keyring), encrypted(PATIENT, keyring)
    b["_birthDate"] = a["_birthDate"]
    out, report = read(b, keyring)
    _assert_nothing_returned_as_data(out, report)


def test_an_old_versions_ciphertext_replayed_into_a_new_version_is_never_returned(keyring):
    old = encrypted(PATIENT, keyring)
    new = encrypted({**PATIENT, "meta": {"versionId": "2"}, "birthDate": "1972-02-03"}, keyring)
    new["_birthDate"] = old["_birthDate"]  # same resource, same location, an earlier version's record
    out, report = read(new, keyring)
    _assert_nothing_returned_as_data(out, report)
    assert "1971-02-03" not in orjson.dumps(out).decode()


def test_deleted_encrypted_element_is_detected(keyring):
    stored = encrypted(PATIENT, keyring)
    del stored["telecom"]
    out, report = read(stored, keyring)
    _assert_nothing_returned_as_data(out, report)


def test_plaintext_injected_by_the_server_is_never_returned(keyring):
    stored = encrypted(PATIENT, keyring)
    stored["birthDate"] = "1999-09-09"
    stored["name"].append({"family": "Forged"})
    out, report = read(stored, keyring)
    _assert_nothing_returned_as_data(out, report, ["1999-09-09", "Forged"])
    assert out["name"][0]["family"] == "Kartasasmita"  # the genuine element still decrypts


def test_removed_envelope_or_unknown_key_masks_everything(keyring):
    from proxy.keymgmt.keyring import Keyring

    stored = encrypted(PATIENT, keyring)
    out, report = read(stored, Keyring.generate())
    _assert_nothing_returned_as_data(out, report)
    stripped = copy.deepcopy(stored)
    stripped["extension"] = stripped["extension"][:-1]
    out, report = read(stripped, keyring)
    _assert_nothing_returned_as_data(out, report)


def test_resources_written_around_the_proxy_are_masked_by_default(keyring):
    out, report = read(copy.deepcopy(PATIENT), keyring)
    _assert_nothing_returned_as_data(out, report)


def test_wrong_json_types_at_covered_locations_are_refused_on_write(keyring):
    for bad in ({"name": "Wibisono"}, {"birthDate": {"x": 1}}, {"address": [{"line": "one"}]}):
        resource = {"resourceType": "Patient", **bad}
        with pytest.raises(ShapeError):
            encrypt_resource(resource, POLICY.for_type("Patient"), keyring)


def test_nested_sections_are_encrypted_at_every_depth(keyring, satusehat):
    div = '<div xmlns="http://www.w3.org/1999/xhtml">{}</div>'
    composition = {
        "resourceType": "Composition",
        "status": "final",
        "type": {"text": "resume"},
        "date": "2024-01-01",
        "author": [{"reference": "Practitioner/1"}],
        "title": "Resume Wibisono",
        "section": [
            {
                "title": "Top Wibisono",
                "text": {"status": "generated", "div": div.format("top Wibisono")},
                "section": [
                    {
                        "title": "Nested Wibisono",
                        "entry": [{"reference": "Observation/1", "display": "Hb Wibisono"}],
                        "section": [
                            {"title": "Deep Wibisono", "text": {"status": "generated", "div": div.format("deep")}}
                        ],
                    }
                ],
            }
        ],
    }
    rp = satusehat.for_type("Composition")
    stored = copy.deepcopy(composition)
    encrypt_resource(stored, rp, keyring)
    assert "Wibisono" not in orjson.dumps(stored).decode()
    report = ReadReport()
    decrypt_resource(stored, rp, keyring, ALL_GROUPS, "mask", report)
    assert stored == composition and not report.failures


def test_reordering_policy_entries_keeps_records_readable(keyring):
    from tests.conftest import TEST_POLICY

    stored = encrypted(PATIENT, keyring)
    lines = TEST_POLICY.splitlines()
    first = lines.index(
        "      - {path: identifier.where(system='https://fhir.kemkes.go.id/id/nik').value, group: identity, id: nik}"
    )
    lines[first], lines[first + 1] = lines[first + 1], lines[first]
    reordered = unit_policy("\n".join(lines))
    report = ReadReport()
    decrypt_resource(stored, reordered.for_type("Patient"), keyring, ALL_GROUPS, "mask", report)
    assert stored == PATIENT and not report.failures


def test_unenveloped_allow_returns_the_resource_untouched(keyring):
    legacy = copy.deepcopy(PATIENT)
    report = ReadReport()
    decrypt_resource(legacy, POLICY.for_type("Patient"), keyring, ALL_GROUPS, "allow", report)
    assert legacy == PATIENT and not report.failures


def test_generated_displays_below_a_whole_element_still_cover_the_other_items(keyring):
    from proxy.policy.compiler import compile_text

    policy = compile_text(
        "fhircrypt-policy: 1\nname: t\ngroups: {g: {}}\nreference_display: {group: g}\nresources:\n  Patient:\n"
        "    elements:\n      - {path: \"identifier.where(system='urn:nik')\", group: g}\n",
        "t.yaml",
    )
    patient = {
        "resourceType": "Patient",
        "identifier": [
            {"system": "urn:nik", "value": "3201", "assigner": {"display": "Dukcapil Kota Bogor"}},
            {"system": "urn:mrn", "value": "RM-1", "assigner": {"display": "RS Harapan Kita Bogor"}},
        ],
    }
    rp = policy.for_type("Patient")
    stored = copy.deepcopy(patient)
    encrypt_resource(stored, rp, keyring)
    text = orjson.dumps(stored).decode()
    assert "Dukcapil" not in text and "Harapan" not in text and "RM-1" in text
    report = ReadReport()
    decrypt_resource(stored, rp, keyring, ALL_GROUPS, "mask", report)
    assert stored == patient and not report.failures


def test_every_resource_in_a_searchset_is_decrypted_or_masked(keyring):
    """Matches, _include/_revinclude entries, contained resources and Parameters parts: every place R4
    allows a resource (Medplum's in-memory server returns no includes, so this is checked here)."""
    from proxy.transform.bodies import decrypt_body

    patient, obs = encrypted(PATIENT, keyring), encrypted(OBSERVATION, keyring)
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": obs, "search": {"mode": "match"}},
            {"resource": copy.deepcopy(patient), "search": {"mode": "include"}},
            {
                "resource": {
                    "resourceType": "Parameters",
                    "parameter": [{"name": "p", "part": [{"name": "r", "resource": copy.deepcopy(patient)}]}],
                }
            },
            {"resource": {"resourceType": "Organization", "contained": [copy.deepcopy(patient)]}},
        ],
    }
    report = ReadReport()
    decrypt_body(bundle, POLICY, keyring, key_holder(), report)
    assert bundle["entry"][0]["resource"] == OBSERVATION
    assert bundle["entry"][1]["resource"] == PATIENT
    assert bundle["entry"][2]["resource"]["parameter"][0]["part"][0]["resource"] == PATIENT
    assert bundle["entry"][3]["resource"]["contained"][0] == PATIENT
    assert not report.failures
    masked = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": copy.deepcopy(patient), "search": {"mode": "include"}}],
    }
    decrypt_body(masked, POLICY, keyring, unscoped(_granted("identity")), ReadReport())
    text = orjson.dumps(masked).decode()
    assert NIK in text and "Wibisono" not in text and mk.CIPHERTEXT_URL not in text


def _granted(*groups: str) -> CallerGrants:
    """Grants of a caller whose SMART scopes are not checked: exactly these groups."""
    return CallerGrants(Caller(subject="test"), frozenset(groups), (), False, False)


def test_text_naming_the_ciphertext_url_is_not_ciphertext():
    """A validator's message about fhircrypt's extension (HAPI's ``$validate`` says "Unknown extension
    https://fhircrypt.dev/…/ciphertext") is text, not an orphaned ciphertext: no integrity failure is
    reported and the message reaches the client; a real marker outside the policy is still removed."""
    from proxy.transform.bodies import serialise_for_client

    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "information", "code": "processing", "diagnostics": f"Unknown extension {mk.CIPHERTEXT_URL}"}
        ],
    }
    report = ReadReport()
    assert orjson.loads(serialise_for_client(copy.deepcopy(outcome), report, "operation")) == outcome
    assert report.failures == []
    orphan = {"resourceType": "Basic", "extension": [{"url": mk.CIPHERTEXT_URL, "valueString": "v1.x"}]}
    out = orjson.loads(serialise_for_client(orphan, report, "read"))
    assert "extension" not in out and len(report.failures) == 1
