"""Keyring and record envelope: published test vectors, key hygiene and tamper detection."""

from __future__ import annotations

import inspect
import json
import os
import stat

import pytest

from proxy.crypto.encoding import b64d, b64e
from proxy.crypto.envelope import IntegrityError, RecordCipher
from proxy.keymgmt.keyring import Keyring, load_keyring, save_keyring
from proxy.keymgmt.providers.base import KeyringError
from proxy.keymgmt.providers.local import LocalKeyProvider, load_local_kek, parse_kek
from tests.envelope_vectors import (
    VECTORS,
    VECTORS_V2,
    compute_vectors,
    compute_vectors_v2,
    vector_inputs,
    vector_inputs_v2,
)


@pytest.mark.parametrize(
    ("path", "inputs", "compute"),
    [(VECTORS, vector_inputs, compute_vectors), (VECTORS_V2, vector_inputs_v2, compute_vectors_v2)],
    ids=["v1", "v2"],
)
def test_published_vectors_match_this_implementation(path, inputs, compute):
    """Another implementation reproduces these bytes from the inputs in tests/vectors/envelope-v1.json and
    envelope-v2.json."""
    published = json.loads(path.read_text())
    assert published["inputs"] == inputs()
    assert compute(published["inputs"]) == published["outputs"]


def test_vectors_decrypt_back():
    published = json.loads(VECTORS.read_text())
    inputs, outputs = published["inputs"], published["outputs"]
    master = bytes.fromhex(inputs["master_key"])
    ring = Keyring("k1", {"k1": master}, os.urandom(32), os.urandom(32), {})
    cipher, mac = RecordCipher.open_envelope(ring, "Patient", outputs["envelope"])
    items = [(e["path"], ct) for e, ct in zip(inputs["elements"], outputs["ciphertexts"], strict=True)]
    cipher.verify(items, mac)
    for e, ct in zip(inputs["elements"], outputs["ciphertexts"], strict=True):
        assert cipher.open(e["field_id"], e["path"], ct) == e["plaintext"].encode()


def test_v2_vectors_decrypt_back_and_their_mac_covers_placeholders_and_groups():
    published = json.loads(VECTORS_V2.read_text())
    inputs, outputs = published["inputs"], published["outputs"]
    ring = Keyring("k1", {"k1": bytes.fromhex(inputs["master_key"])}, os.urandom(32), os.urandom(32), {})
    cipher, mac = RecordCipher.open_envelope(ring, "Patient", outputs["envelope"])
    assert cipher.version == "v2" and cipher.grouped
    groups = [("@" + g["group"], ct) for g, ct in zip(inputs["groups"], outputs["group_ciphertexts"], strict=True)]
    places = [(p["path"], f"{p['group']}\x1f{p['field_id']}") for p in inputs["placeholders"]]
    cipher.verify(sorted(places + groups), mac)
    for g, ct in zip(inputs["groups"], outputs["group_ciphertexts"], strict=True):
        assert cipher.open_group(ct) == (g["group"], g["plaintext"].encode())
    elsewhere = [("name[1]", places[1][1]), *places[:1], *groups]  # a mark moved
    regrouped = [(places[1][0], "identity\x1fname"), *places[:1], *groups]  # a mark claimed by another group
    for changed in (places[:1] + groups, places + groups[:1], elsewhere, regrouped):
        with pytest.raises(IntegrityError):
            cipher.verify(sorted(changed), mac)
    renamed = outputs["group_ciphertexts"][0].replace("v2.identity.", "v2.demographics.")
    with pytest.raises(IntegrityError):
        cipher.open_group(renamed)  # a group's ciphertext does not pass for another group's


V2_VECTOR_POLICY = """
fhircrypt-policy: 1
name: vectors
groups: {identity: {}, demographics: {}}
resources:
  Patient:
    elements:
      - {path: identifier.where(system='https://fhir.kemkes.go.id/id/nik').value, group: identity, id: nik}
      - {path: name, group: demographics, id: name}
"""


def test_a_patient_built_from_the_v2_vectors_alone_reads_back():
    """The stored form as docs/at-rest-format.md specifies it, assembled from the published bytes only."""
    from proxy.policy.compiler import compile_text
    from proxy.transform import markers as mk
    from proxy.transform.records import ALL_GROUPS, ReadReport, decrypt_resource

    published = json.loads(VECTORS_V2.read_text())
    inputs, outputs = published["inputs"], published["outputs"]
    mask = {"extension": [mk.dar_masked()]}
    stored = {
        "resourceType": "Patient",
        "id": "v",
        "identifier": [{"system": "https://fhir.kemkes.go.id/id/nik", "_value": mask}],
        "name": [mask],
        "extension": [
            *({"url": mk.GROUP_URL, "valueString": ct} for ct in outputs["group_ciphertexts"]),
            {"url": mk.ENVELOPE_URL, "valueString": outputs["envelope"]},
        ],
        "meta": {"tag": [{"system": mk.TAG_SYSTEM, "code": mk.TAG_CODE}]},
    }
    ring = Keyring("k1", {"k1": bytes.fromhex(inputs["master_key"])}, os.urandom(32), os.urandom(32), {})
    report = ReadReport()
    decrypt_resource(
        stored, compile_text(V2_VECTOR_POLICY, "v.yaml").for_type("Patient"), ring, ALL_GROUPS, "mask", report
    )
    assert not report.failures and report.decrypted == 2
    assert stored == {
        "resourceType": "Patient",
        "id": "v",
        "identifier": [{"system": "https://fhir.kemkes.go.id/id/nik", "value": "3201010101900001"}],
        "name": [{"family": "Santoso", "given": ["Budi"]}],
    }


def test_callers_cannot_choose_a_nonce():
    """seal takes no nonce: only the tests' FixedNonceCipher fixes them, and every seal draws a fresh one."""
    assert list(inspect.signature(RecordCipher.seal).parameters) == ["self", "field_id", "path", "plaintext"]
    cipher = RecordCipher.new(Keyring.generate(), "Patient")
    nonces = {cipher.seal("nik", "identifier[0].value", b"same")[3:19] for _ in range(100)}  # 12 bytes = 16 chars
    assert len(nonces) == 100


def test_ciphertext_is_bound_to_its_place_and_record():
    ring = Keyring.generate()
    a, b = RecordCipher.new(ring, "Patient"), RecordCipher.new(ring, "Patient")
    ct = a.seal("nik", "identifier[0].value", b"secret")
    assert a.open("nik", "identifier[0].value", ct) == b"secret"
    for field_id, path, cipher in (
        ("nik", "identifier[1].value", a),
        ("bpjs", "identifier[0].value", a),
        ("nik", "identifier[0].value", b),
    ):
        with pytest.raises(IntegrityError):
            cipher.open(field_id, path, ct)
    flipped = ct[:-2] + ("A" if ct[-2] != "A" else "B") + ct[-1]
    with pytest.raises(IntegrityError):
        a.open("nik", "identifier[0].value", flipped)
    with pytest.raises(IntegrityError):
        a.open("nik", "identifier[0].value", "v9." + ct[3:])


def test_record_mac_detects_removed_added_and_swapped_elements():
    cipher = RecordCipher.new(Keyring.generate(), "Patient")
    items = [("birthDate", cipher.seal("b", "birthDate", b"1")), ("name[0]", cipher.seal("n", "name[0]", b"2"))]
    mac = cipher.mac(items)
    cipher.verify(items, mac)
    for changed in (
        items[:1],
        [*items, items[0]],
        list(reversed(items)),
        [(items[0][0], items[1][1]), (items[1][0], items[0][1])],
    ):
        with pytest.raises(IntegrityError):
            cipher.verify(changed, mac)


def test_keyring_file_roundtrip_rotation_permissions_and_tamper(tmp_path):
    provider = LocalKeyProvider(os.urandom(32))
    ring = Keyring.generate()
    path = tmp_path / "ring.json"
    save_keyring(path, ring, provider)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    old = RecordCipher.new(ring, "Patient")
    ct = old.seal("f", "p", b"x")
    assert ring.rotate() == "k2"
    save_keyring(path, ring, provider)
    loaded = load_keyring(path, provider)
    assert loaded.primary_id == "k2" and loaded.key_ids == ["k1", "k2"]
    reopened, _ = RecordCipher.open_envelope(loaded, "Patient", old.envelope(b"\0" * 32))
    assert reopened.open("f", "p", ct) == b"x"
    text = path.read_text()
    assert ring.master_key("k1").hex() not in text and b64e(ring.master_key("k1")) not in text
    assert "k2" in repr(loaded) and b64e(loaded.master_key("k2")) not in repr(loaded)

    doc = json.loads(text)
    doc["primary"] = "k1"
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyringError, match="modified"):
        load_keyring(path, provider)
    with pytest.raises(KeyringError, match="wrong key-encryption key"):
        save_keyring(path, ring, provider)
        load_keyring(path, LocalKeyProvider(os.urandom(32)))


def test_kek_comes_from_env_or_file_and_is_validated(tmp_path):
    key = os.urandom(32)
    assert parse_kek(key.hex()) == key == parse_kek(b64e(key))
    with pytest.raises(KeyringError):
        parse_kek("too-short")
    assert load_local_kek(environ={"FHIRCRYPT_KEK": b64e(key)}).kek_id == LocalKeyProvider(key).kek_id
    kek_file = tmp_path / "kek"
    kek_file.write_text(b64e(key) + "\n")
    assert load_local_kek(str(kek_file), environ={}).kek_id == LocalKeyProvider(key).kek_id
    with pytest.raises(KeyringError, match="no key-encryption key"):
        load_local_kek(environ={})


def test_base64url_decoding_is_strict():
    assert b64d(b64e(b"\xff\xfe")) == b"\xff\xfe"
    for bad in ("a", "ab=c", "a+b/", "YQ=="):
        with pytest.raises(ValueError):
            b64d(bad)
