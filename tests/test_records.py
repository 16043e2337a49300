"""The pure core: round trips, the at-rest form, masking and integrity, without HTTP."""

from __future__ import annotations

import copy
import dataclasses

import orjson
import pytest

from proxy.auth.caller import Caller
from proxy.auth.decision import key_holder, unscoped
from proxy.policy.access import CallerGrants
from proxy.transform import markers as mk
from proxy.transform.records import ALL_GROUPS, ReadReport, ShapeError, decrypt_resource, encrypt_resource
from tests.conftest import sealed_groups, unit_policy

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


FORMATS = ["v1", "v2"]  # what the tests write in; the reader is always today's, which reads both


def encrypted(resource: dict, keyring, fmt: str = "v2") -> dict:
    stored = copy.deepcopy(resource)
    rp = dataclasses.replace(POLICY.for_type(resource["resourceType"]), at_rest_format=fmt)
    encrypt_resource(stored, rp, keyring)
    return orjson.loads(orjson.dumps(stored))  # what a server stores and returns


def read(stored: dict, keyring, grants=ALL_GROUPS) -> tuple[dict, ReadReport]:
    out, report = copy.deepcopy(stored), ReadReport()
    decrypt_resource(out, POLICY.for_type(out["resourceType"]), keyring, grants, POLICY.unenveloped, report)
    return out, report


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("resource", [PATIENT, OBSERVATION])
def test_round_trip_returns_exactly_what_was_written(resource, keyring, fmt):
    stored = encrypted(resource, keyring, fmt)
    back, report = read(stored, keyring)
    assert back == resource
    assert report.failures == [] and report.masked == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_at_rest_form_holds_no_plaintext_and_keeps_what_servers_need(keyring, fmt):
    stored = encrypted(PATIENT, keyring, fmt)
    text = orjson.dumps(stored).decode()
    assert not [n for n in NEEDLES if n in text]
    assert stored["identifier"][0] == PATIENT["identifier"][0]  # not covered
    nik = stored["identifier"][1]
    assert nik["system"] == "https://fhir.kemkes.go.id/id/nik" and "value" not in nik
    assert nik["_value"]["extension"][0] == mk.dar_masked()
    if fmt == "v1":  # each element its own ciphertext
        assert stored["_birthDate"]["extension"][1]["url"] == mk.CIPHERTEXT_URL and "birthDate" not in stored
    else:  # the mask marker alone; the element is in its group's ciphertext, beside the envelope
        assert stored["_birthDate"] == mk.masked_form() and "birthDate" not in stored
        assert mk.CIPHERTEXT_URL not in orjson.dumps(stored).decode()
        assert set(sealed_groups(stored)) == {"identity", "demographics", "demographics,identity"}  # the narrative
        assert [e["url"] for e in stored["extension"][-4:]] == [mk.GROUP_URL] * 3 + [mk.ENVELOPE_URL]
    assert stored["address"][0]["line"] == [None, None] and len(stored["address"][0]["_line"]) == 2
    birth_place = stored["extension"][0]  # a simple extension keeps its value[x], which holds only the markers
    assert birth_place["url"].endswith("birthPlace") and set(birth_place) == {"url", "valueAddress"}
    assert birth_place["valueAddress"]["extension"][0] == mk.dar_masked()
    assert stored["extension"][-1]["url"] == mk.ENVELOPE_URL and stored["extension"][-1]["valueString"][:2] == fmt
    assert stored["managingOrganization"]["reference"] == "Organization/o1"
    assert stored["text"]["div"] == mk.NEUTRAL_DIV
    assert stored["gender"] == "male" and stored["id"] == "p1"
    assert {"system": mk.TAG_SYSTEM, "code": mk.TAG_CODE} in stored["meta"]["tag"]
    obs = encrypted(OBSERVATION, keyring, fmt)
    assert "valueQuantity" not in obs and obs["dataAbsentReason"]["coding"][0]["code"] == "masked"
    assert obs["component"][1] == OBSERVATION["component"][1]


def test_each_write_uses_a_fresh_data_key_and_nonces(keyring):
    a, b = encrypted(PATIENT, keyring, "v1"), encrypted(PATIENT, keyring, "v1")
    assert a["_birthDate"] != b["_birthDate"] and a["extension"][-1] != b["extension"][-1]
    a, b = encrypted(PATIENT, keyring), encrypted(PATIENT, keyring)
    assert a["extension"][-1] != b["extension"][-1]
    assert all(sealed_groups(a)[g] != sealed_groups(b)[g] for g in sealed_groups(a))


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


def _swap_identifiers(stored: dict) -> None:
    ids = stored["identifier"]
    ids[0], ids[1] = ids[1], ids[0]


def _demographics(stored: dict) -> dict:
    return sealed_groups(stored)["demographics"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_changed_ciphertext_is_never_returned(keyring, fmt):
    stored = encrypted(PATIENT, keyring, fmt)
    ext = _ct_ext(stored["_birthDate"]) if fmt == "v1" else _demographics(stored)
    ext["valueString"] = ext["valueString"][:-4] + "AAAA"
    out, report = read(stored, keyring)
    _assert_nothing_returned_as_data(out, report)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ciphertext_moved_between_elements_is_never_returned(keyring, fmt):
    stored = encrypted(PATIENT, keyring, fmt)
    _swap_identifiers(stored)  # the sealed NIK now sits where the clear IHS number was, and back
    out, report = read(stored, keyring)
    _assert_nothing_returned_as_data(out, report)
    if fmt == "v1":
        stored = encrypted(PATIENT, keyring, fmt)
        line = stored["address"][0]["_line"]
        line[0], line[1] = line[1], line[0]
        out, report = read(stored, keyring)
        _assert_nothing_returned_as_data(out, report)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ciphertext_moved_between_resources_is_never_returned(keyring, fmt):
    a, b = encrypted(PATIENT, keyring, fmt), encrypted(PATIENT, keyring, fmt)
    if fmt == "v1":
        b["_birthDate"] = a["_birthDate"]
    else:
        _demographics(b)["valueString"] = _demographics(a)["valueString"]
    out, report = read(b, keyring)
    _assert_nothing_returned_as_data(out, report)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_old_versions_ciphertext_replayed_into_a_new_version_is_never_returned(keyring, fmt):
    old = encrypted(PATIENT, keyring, fmt)
    new = encrypted({**PATIENT, "meta": {"versionId": "2"}, "birthDate": "1972-02-03"}, keyring, fmt)
    if fmt == "v1":
        new["_birthDate"] = old["_birthDate"]  # same resource, same location, an earlier version's record
    else:
        _demographics(new)["valueString"] = _demographics(old)["valueString"]  # the earlier version's group
    out, report = read(new, keyring)
    _assert_nothing_returned_as_data(out, report)
    assert "1971-02-03" not in orjson.dumps(out).decode()


def _drop_group(stored: dict) -> None:
    stored["extension"].remove(_demographics(stored))


def _duplicate_group(stored: dict) -> None:
    stored["extension"].insert(0, copy.deepcopy(_demographics(stored)))


def _rename_group(stored: dict) -> None:
    ext = _demographics(stored)
    ext["valueString"] = ext["valueString"].replace("v2.demographics.", "v2.identity.")


def _swap_group_names(stored: dict) -> None:
    groups = sealed_groups(stored)
    a, b = groups["demographics"], groups["identity"]
    a["valueString"], b["valueString"] = (
        b["valueString"].replace("v2.identity.", "v2.demographics."),
        a["valueString"].replace("v2.demographics.", "v2.identity."),
    )


def _add_placeholder(stored: dict) -> None:
    stored["name"].append(mk.masked_form())  # a mark where nothing was sealed


def _move_placeholder(stored: dict) -> None:
    stored["_deceasedDateTime"] = stored.pop("_birthDate")  # not a covered element: the mark is gone


def _downgrade_envelope(stored: dict) -> None:
    stored["extension"][-1]["valueString"] = "v1" + stored["extension"][-1]["valueString"][2:]


def _drop_placeholder_of_a_primitive_item(stored: dict) -> None:
    stored["address"][0]["_line"][1] = None
    stored["address"][0]["line"][1] = None


@pytest.mark.parametrize(
    "tamper",
    [
        _drop_group,
        _duplicate_group,
        _rename_group,
        _swap_group_names,
        _add_placeholder,
        _move_placeholder,
        _downgrade_envelope,
        _drop_placeholder_of_a_primitive_item,
    ],
)
def test_v2_group_ciphertexts_and_placeholders_cannot_be_removed_moved_or_relabelled(keyring, tamper):
    stored = encrypted(PATIENT, keyring)
    tamper(stored)
    out, report = read(stored, keyring)
    _assert_nothing_returned_as_data(out, report)
    assert mk.GROUP_URL not in orjson.dumps(out).decode()


def test_a_v1_and_a_v2_record_of_one_resource_both_read_back(keyring):
    """v1 stays readable: what earlier versions wrote reads with today's reader, beside v2 records."""
    for fmt in FORMATS:
        back, report = read(encrypted(PATIENT, keyring, fmt), keyring)
        assert back == PATIENT and not report.failures


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
