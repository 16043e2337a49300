"""The shortcuts the core takes for speed give exactly what the plain constructions give.

The at-rest format must not change when the code gets faster: these compare each fast
path with the textbook form it replaces (the published vectors in tests/vectors/ pin
the formats themselves).
"""

from __future__ import annotations

import base64
import hmac
import os
import string
import unicodedata

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.crypto.blindindex import TOKEN_HEX_CHARS, BlindIndexer, index_key
from proxy.crypto.encoding import b64d, b64e
from proxy.crypto.envelope import RecordCipher, associated_data, group_associated_data
from proxy.keymgmt.keyring import Keyring
from proxy.transform.normalize import _SPACE, fold


@pytest.mark.parametrize("root_len", [32, 64])
def test_blind_index_tokens_are_hmac_sha256(root_len):
    root = os.urandom(root_len)
    indexer = BlindIndexer(root)
    texts = ["", "budi", "exact:Budi Santoso", "ñandú", "x" * 200]
    key = index_key(root, "Patient/name/name")
    expected = [hmac.digest(key, t.encode(), "sha256")[: TOKEN_HEX_CHARS // 2].hex() for t in texts]
    assert indexer.tokens("Patient/name/name", texts) == expected
    assert [indexer.token("Patient/name/name", t) for t in texts] == expected
    assert indexer.token("Patient/name/family", "budi") != expected[1]  # another label, another key


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_element_ciphertext_uses_the_documented_associated_data(version):
    cipher = RecordCipher.new(Keyring.generate(), "Patient", version=version)
    ct = cipher.seal("nik", "identifier[0].value", b'["3175",null]')
    raw = b64d(ct.removeprefix(f"{version}."))
    aad = associated_data("Patient", cipher.record_id, "nik", "identifier[0].value", version)
    aead = cipher._aead  # the record's AES-GCM key, used here with the documented associated data
    assert isinstance(aead, AESGCM)
    assert aead.decrypt(raw[:12], raw[12:], aad) == b'["3175",null]'
    elsewhere = associated_data("Patient", cipher.record_id, "nik", "identifier[1].value", version)
    with pytest.raises(InvalidTag):
        aead.decrypt(raw[:12], raw[12:], elsewhere)


def test_group_ciphertext_uses_the_documented_associated_data():
    cipher = RecordCipher.new(Keyring.generate(), "Patient")
    ct = cipher.seal_group("identity", b'[["3175",null]]')
    assert ct.startswith("v2.identity.")
    raw = b64d(ct.removeprefix("v2.identity."))
    aad = group_associated_data("Patient", cipher.record_id, "identity")
    assert aad == "\x1f".join(("fhircrypt/v2", "Patient", cipher.record_id, "identity")).encode()
    assert cipher._aead.decrypt(raw[:12], raw[12:], aad) == b'[["3175",null]]'
    for other in (
        group_associated_data("Patient", cipher.record_id, "demographics"),
        group_associated_data("Observation", cipher.record_id, "identity"),
    ):
        with pytest.raises(InvalidTag):
            cipher._aead.decrypt(raw[:12], raw[12:], other)


def test_nonces_of_one_record_are_all_different():
    cipher = RecordCipher.new(Keyring.generate(), "Patient")
    nonces = {b64d(cipher.seal("f", f"p{i}", b"1")[3:])[:12] for i in range(100)}
    assert len(nonces) == 100  # more than one os.urandom batch, no slice reused


def _fold_by_definition(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _SPACE.sub(" ", stripped.casefold()).strip()  # fold() as it is for non-ASCII text


@pytest.mark.parametrize(
    "text",
    [
        string.printable,
        "  Budi\tSANTOSO \n",
        "O'Brien-Smith",
        "Ştefan Çelik",
        "\uff21\uff42\uff43",
        "ﬁne",
        "straße",
        "",
    ],
)
def test_fold_ascii_shortcut_matches_the_unicode_rules(text):
    assert fold(text) == _fold_by_definition(text)


def test_base64url_encoding_is_the_standard_library_one_unpadded():
    for n in range(70):
        data = os.urandom(n)
        assert b64e(data) == base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        assert b64d(b64e(data)) == data
